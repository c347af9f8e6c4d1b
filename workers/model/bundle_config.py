"""A model bundle's settings and decoder files, read without torch.

``workers.model.bundle.load_bundle`` loads the whole bundle (the model too, with torch); the
decoder actors need only the frame duration and the lexicon / LM / token files, which
``load_bundle_files`` gives from ``config.json`` and the directory listing. Both share the
checks here, so a bad bundle fails the same way (``BundleError`` naming the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from workers.features.config import FeatureConfig
from workers.model.tokens import TOKENS

BUNDLE_VERSION = 1
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "default"


class BundleError(Exception):
    """A model bundle that is missing, corrupt or inconsistent."""


def dataclass_from(cls: type, values: Any, where: str) -> Any:
    """``cls(**values)`` for a JSON object; ``BundleError`` naming ``where`` for unknown keys or bad values."""
    if not isinstance(values, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise BundleError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: {exc}") from exc


def read_bundle_config(path: Path, required: tuple[str, ...] = ("config.json", "tokens.txt")) -> dict:
    """The checked ``config.json`` of the bundle directory ``path`` (a JSON object of this
    ``BUNDLE_VERSION``); the files ``required`` must exist."""
    if not path.is_dir():
        raise BundleError(f"{path}: model bundle directory not found")
    for name in required:
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing from the model bundle")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path / 'config.json'}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise BundleError(f"{path / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    if config.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path / 'config.json'}: bundle version {config.get('version')!r}, expected {BUNDLE_VERSION}")
    return config


def check_tokens(path: Path, num_tokens: int = len(TOKENS)) -> None:
    """``BundleError`` unless the bundle's ``tokens.txt`` lists ``workers.model.tokens.TOKENS`` and
    the model's output (``num_tokens``) has one column per token."""
    tokens = (path / "tokens.txt").read_text().split("\n")[:-1]
    if tuple(tokens) != TOKENS or num_tokens != len(TOKENS):
        raise BundleError(f"{path / 'tokens.txt'}: token list does not match this version's {len(TOKENS)} tokens")


def optional_file(path: Path, name: str) -> Path | None:
    """``path / name`` when that file exists, else None (the lexicon and LM are optional)."""
    return path / name if (path / name).is_file() else None


@dataclass(frozen=True)
class BundleFiles:
    """What a bundle holds besides its model: feature settings (``features.frame_ms`` is what
    the decoders need), the decoder's files and the training info. Duck-types the fields of
    ``workers.model.bundle.Bundle`` that ``workers.decoding.decoder.build_decoder`` reads."""

    path: Path
    features: FeatureConfig
    lexicon_path: Path | None = None
    lm_path: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def tokens_path(self) -> Path:
        return self.path / "tokens.txt"


def load_bundle_files(path: str | Path) -> BundleFiles:
    """Read and check a bundle's ``config.json`` and ``tokens.txt``; no model, no torch."""
    path = Path(path)
    config = read_bundle_config(path)
    features = dataclass_from(FeatureConfig, config.get("features", {}), f"{path / 'config.json'} [features]")
    check_tokens(path)
    return BundleFiles(path, features, optional_file(path, "lexicon.txt"), optional_file(path, "lm.arpa"), config.get("info", {}))


def check_bundle(path: str | Path | None = None) -> BundleFiles:
    """What can be checked of a whole bundle (default: the shipped ``models/default``) without
    torch: ``config.json`` (features, model shape), ``tokens.txt`` against the model's output, and
    that ``weights.pt`` exists. The weights themselves are checked where the model is loaded
    (``workers.model.bundle.load_bundle``): a stream driver that starts stage actors stays torch-free."""
    from workers.model.config import ModelConfig

    path = Path(path) if path is not None else DEFAULT_BUNDLE
    config = read_bundle_config(path, ("config.json", "weights.pt", "tokens.txt"))
    features = dataclass_from(FeatureConfig, config.get("features", {}), f"{path / 'config.json'} [features]")
    model_config = dataclass_from(ModelConfig, config.get("model", {}), f"{path / 'config.json'} [model]")
    check_tokens(path, model_config.num_tokens)
    if model_config.input_dim != features.feature_dim:
        raise BundleError(f"{path / 'config.json'}: model.input_dim {model_config.input_dim} != feature dim {features.feature_dim}")
    return BundleFiles(path, features, optional_file(path, "lexicon.txt"), optional_file(path, "lm.arpa"), config.get("info", {}))
