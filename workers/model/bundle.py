"""Model bundle: one directory holding everything needed to recognise speech.

```
config.json    feature + model config, frame rate, training provenance
weights.pt     state dict (tensors only; loaded with torch.load(weights_only=True)),
               including the normalisation statistics under "normalizer.mean/std"
tokens.txt     the CTC token list, one per line (workers.model.tokens.TOKENS)
lexicon.txt    optional: word -> spelling, for beam search
lm.arpa        optional: word n-gram LM in ARPA form
```

``load_bundle`` validates every part and raises ``BundleError`` naming the file and the
problem for a corrupt or mismatched bundle.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workers.features.mfcc import FeatureConfig, Normalizer
from workers.model.bilstm import QUANTIZE_MODES, BiLSTMCTC, ModelConfig, quantize_model
from workers.model.bundle_config import (  # noqa: F401  (DEFAULT_BUNDLE re-exported)
    BUNDLE_VERSION,
    DEFAULT_BUNDLE,
    BundleError,
    check_bundle,
    check_tokens,
    dataclass_from,
    optional_file,
    read_bundle_config,
)
from workers.model.tokens import TOKENS


@dataclass
class Bundle:
    path: Path
    features: FeatureConfig
    model_config: ModelConfig
    model: BiLSTMCTC
    normalizer: Normalizer
    lexicon_path: Path | None = None
    lm_path: Path | None = None
    info: dict = field(default_factory=dict)
    quantize: str = "none"  # what ``load_bundle`` applied to ``model``: "none", "int8" or "bf16"

    @property
    def tokens_path(self) -> Path:
        return self.path / "tokens.txt"


def save_bundle(
    path: str | Path,
    model: BiLSTMCTC,
    features: FeatureConfig,
    normalizer: Normalizer,
    lexicon_path: Path | None = None,
    lm_path: Path | None = None,
    info: dict | None = None,
) -> Path:
    """Write a bundle directory atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state["normalizer.mean"] = normalizer.mean.clone()
    state["normalizer.std"] = normalizer.std.clone()
    torch.save(state, tmp / "weights.pt")
    (tmp / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    for src, name in ((lexicon_path, "lexicon.txt"), (lm_path, "lm.arpa")):
        if src is not None:
            shutil.copyfile(src, tmp / name)
    config = {
        "version": BUNDLE_VERSION,
        "features": asdict(features),
        "model": asdict(model.config),
        "info": info or {},
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_bundle(path: str | Path | None = None, device: str | torch.device = "cpu", quantize: str = "none") -> Bundle:
    """Load and validate a bundle (default: the shipped ``models/default``).

    ``quantize="int8"``: dynamic int8 quantisation of the LSTMs and the output layer;
    ``"bf16"``: bfloat16 autocast (``workers.model.bilstm.quantize_model``), for CPU inference.
    Both exist only on the CPU, so on a CUDA device they are ignored with a warning and the
    float model is used."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    checked = check_bundle(path)
    path, features, config = checked.path, checked.features, read_bundle_config(checked.path)
    model_config = dataclass_from(ModelConfig, config.get("model", {}), f"{path / 'config.json'} [model]")
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle refused, truncated file...
        raise BundleError(f"{path / 'weights.pt'}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
    # weights_only still admits plain containers (lists, strings, dicts of ints)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BundleError(f"{path / 'weights.pt'}: not a state dict of named tensors")
    try:
        normalizer = Normalizer(state.pop("normalizer.mean"), state.pop("normalizer.std"))
        if normalizer.mean.shape != (features.n_mfcc,) or normalizer.std.shape != (features.n_mfcc,):
            raise BundleError(f"{path / 'weights.pt'}: normalisation statistics do not have shape ({features.n_mfcc},)")
        model = BiLSTMCTC(model_config)
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise BundleError(f"{path / 'weights.pt'}: weights do not match the config ({exc})") from exc
    model.to(device).eval()
    if quantize != "none" and torch.device(device).type != "cpu":
        warnings.warn(f"quantize={quantize!r} ignored on {device}: it runs on the CPU only", stacklevel=2)
        quantize = "none"
    model = quantize_model(model, quantize)
    return Bundle(
        path=path,
        features=features,
        model_config=model_config,
        model=model,
        normalizer=normalizer,
        lexicon_path=optional_file(path, "lexicon.txt"),
        lm_path=optional_file(path, "lm.arpa"),
        info=config.get("info", {}),
        quantize=quantize,
    )


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") or CUDA when available, else CPU."""
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
