"""Model bundle: save/load round trip, and refusal (BundleError naming the file) of bad bundles."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from workers.features.mfcc import FeatureConfig, MfccExtractor, Normalizer
from workers.model.bilstm import BiLSTMCTC, ModelConfig
from workers.model.bundle import BundleError, load_bundle, save_bundle
from workers.model.bundle_config import check_bundle
from workers.model.tokens import TOKENS

FEATURES = FeatureConfig(n_mels=8, n_mfcc=4, stack_frames=3)  # feature_dim 12




def tiny_model(hidden_size: int = 16, seed: int = 0) -> BiLSTMCTC:
    torch.manual_seed(seed)
    return BiLSTMCTC(ModelConfig(input_dim=FEATURES.feature_dim, hidden_size=hidden_size, num_layers=2)).eval()


def normalizer() -> Normalizer:
    return Normalizer(mean=torch.tensor([1.0, -2.0, 3.0, 0.5]), std=torch.tensor([2.0, 0.5, 1.5, 3.0]))


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return save_bundle(tmp_path / "bundle", tiny_model(), FEATURES, normalizer(), info={"epochs": 3})


def expect_refusal(path: Path, file_name: str, *words: str) -> str:
    with pytest.raises(BundleError) as exc_info:
        load_bundle(path)
    message = str(exc_info.value)
    assert str(path / file_name) in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


# ---- round trip -------------------------------------------------------------------------


def test_round_trip_gives_same_outputs(tmp_path: Path) -> None:
    model = tiny_model()
    lexicon = tmp_path / "words.txt"
    lexicon.write_text("yes y e s |\n")
    path = save_bundle(tmp_path / "bundle", model, FEATURES, normalizer(), lexicon_path=lexicon, info={"epochs": 3})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "lexicon.txt", "tokens.txt", "weights.pt"]
    assert not (tmp_path / "bundle.tmp").exists()
    bundle = load_bundle(path)
    assert bundle.path == path
    assert bundle.features == FEATURES
    assert bundle.model_config == model.config
    assert bundle.info == {"epochs": 3}
    assert bundle.lexicon_path == path / "lexicon.txt" and bundle.lm_path is None
    assert bundle.tokens_path.read_text().split() == list(TOKENS)
    assert not bundle.model.training
    torch.testing.assert_close(bundle.normalizer.mean, normalizer().mean)
    torch.testing.assert_close(bundle.normalizer.std, normalizer().std)
    x = torch.randn(2, 15, FEATURES.feature_dim)
    lengths = torch.tensor([15, 9])
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x, lengths), model(x, lengths), atol=0, rtol=0)
        torch.testing.assert_close(bundle.model(x, lengths, 4, 2), model(x, lengths, 4, 2), atol=0, rtol=0)
    # the whole front end agrees too
    wave = torch.randn(8000)
    torch.testing.assert_close(
        MfccExtractor(bundle.features, bundle.normalizer)(wave), MfccExtractor(FEATURES, normalizer())(wave)
    )


def test_save_replaces_existing_bundle(tmp_path: Path) -> None:
    path = save_bundle(tmp_path / "b", tiny_model(seed=1), FEATURES, normalizer())
    (path / "lm.arpa").write_text("stale")
    save_bundle(path, tiny_model(seed=2), FEATURES, normalizer())
    assert not (path / "lm.arpa").exists()
    x = torch.randn(1, 6, FEATURES.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(load_bundle(path).model(x, torch.tensor([6])), tiny_model(seed=2)(x, torch.tensor([6])))


# ---- refusals ------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no_such_bundle"
    with pytest.raises(BundleError, match="not found") as exc_info:
        load_bundle(path)
    assert str(path) in str(exc_info.value)


@pytest.mark.parametrize("name", ["weights.pt", "config.json", "tokens.txt"])
def test_missing_file(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).unlink()
    expect_refusal(bundle_dir, name, "missing")


def test_corrupt_weights(bundle_dir: Path) -> None:
    (bundle_dir / "weights.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    expect_refusal(bundle_dir, "weights.pt", "cannot be loaded")


def test_truncated_weights(bundle_dir: Path) -> None:
    data = (bundle_dir / "weights.pt").read_bytes()
    (bundle_dir / "weights.pt").write_bytes(data[: len(data) // 2])
    expect_refusal(bundle_dir, "weights.pt")


class Payload:
    """An arbitrary object: unpickling it would run code (write ``marker``); weights_only must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_of_object_is_refused_by_weights_only(bundle_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, bundle_dir / "weights.pt")
    expect_refusal(bundle_dir, "weights.pt", "cannot be loaded")
    assert not marker.exists()
    with (bundle_dir / "weights.pt").open("wb") as f:  # a plain pickle, not even a torch zip
        pickle.dump(Payload(marker), f, protocol=2)
    expect_refusal(bundle_dir, "weights.pt")
    assert not marker.exists()
    # the payload itself works: only the refusal kept the marker from being written
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("payload", [[1, 2, 3], "weights", 42, {"normalizer.mean": 1, "normalizer.std": 2}])
def test_weights_that_are_not_a_tensor_dict(bundle_dir: Path, payload: object) -> None:
    """Plain containers pass weights_only; they must still be refused with BundleError."""
    torch.save(payload, bundle_dir / "weights.pt")
    expect_refusal(bundle_dir, "weights.pt")


def test_mismatched_tokens(bundle_dir: Path) -> None:
    tokens = list(TOKENS)
    tokens[3], tokens[4] = tokens[4], tokens[3]
    (bundle_dir / "tokens.txt").write_text("\n".join(tokens) + "\n")
    expect_refusal(bundle_dir, "tokens.txt", "token list")


def test_tokens_for_a_different_output_layer(bundle_dir: Path) -> None:
    (bundle_dir / "tokens.txt").write_text("\n".join(TOKENS[:-1]) + "\n")
    expect_refusal(bundle_dir, "tokens.txt", "token list")


@pytest.mark.parametrize("section", ["model", "features"])
def test_unknown_config_key(bundle_dir: Path, section: str) -> None:
    edit_config(bundle_dir, lambda c: c[section].update(surprise=1))
    expect_refusal(bundle_dir, "config.json", "surprise", section)


def test_bad_json(bundle_dir: Path) -> None:
    (bundle_dir / "config.json").write_text('{"version": 1, "model": {')
    expect_refusal(bundle_dir, "config.json", "json")


@pytest.mark.parametrize(
    "text", ["[1, 2]", '"a string"', "null", '{"version": 1, "model": [1, 2]}', '{"version": 1, "features": 5}']
)
def test_json_of_the_wrong_shape(bundle_dir: Path, text: str) -> None:
    (bundle_dir / "config.json").write_text(text)
    expect_refusal(bundle_dir, "config.json")


def test_wrong_version(bundle_dir: Path) -> None:
    edit_config(bundle_dir, lambda c: c.update(version=99))
    expect_refusal(bundle_dir, "config.json", "version")


def test_invalid_model_value(bundle_dir: Path) -> None:
    edit_config(bundle_dir, lambda c: c["model"].update(combine="max"))
    expect_refusal(bundle_dir, "config.json", "combine")


def test_input_dim_mismatch(bundle_dir: Path) -> None:
    edit_config(bundle_dir, lambda c: c["features"].update(stack_frames=2))  # feature dim 8, model wants 12
    expect_refusal(bundle_dir, "config.json", "input_dim")


def test_weights_of_a_different_hidden_size(tmp_path: Path) -> None:
    path = save_bundle(tmp_path / "b", tiny_model(), FEATURES, normalizer())
    other = save_bundle(tmp_path / "other", tiny_model(hidden_size=8), FEATURES, normalizer())
    (path / "weights.pt").write_bytes((other / "weights.pt").read_bytes())
    expect_refusal(path, "weights.pt", "do not match")


def test_weights_with_missing_or_extra_keys(bundle_dir: Path) -> None:
    state = torch.load(bundle_dir / "weights.pt", weights_only=True)
    state.pop("output.bias")
    torch.save(state, bundle_dir / "weights.pt")
    expect_refusal(bundle_dir, "weights.pt", "do not match")
    state["output.bias"] = torch.zeros(29)
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, bundle_dir / "weights.pt")
    expect_refusal(bundle_dir, "weights.pt", "do not match")


def test_missing_or_misshapen_normalizer(bundle_dir: Path) -> None:
    state = torch.load(bundle_dir / "weights.pt", weights_only=True)
    state["normalizer.std"] = torch.ones(5)
    torch.save(state, bundle_dir / "weights.pt")
    expect_refusal(bundle_dir, "weights.pt", "normalisation")
    del state["normalizer.std"]
    torch.save(state, bundle_dir / "weights.pt")
    expect_refusal(bundle_dir, "weights.pt")


def test_check_bundle_sees_without_torch_what_the_stream_driver_needs(bundle_dir: Path) -> None:
    """``check_bundle`` (torch-free: the stream drivers use it) reads the features, files and info,
    and refuses what it can see without loading the weights, naming the file."""
    files = check_bundle(bundle_dir)
    assert files.features == FEATURES and files.info == {"epochs": 3} and files.lexicon_path is None
    edit_config(bundle_dir, lambda c: c["features"].update(stack_frames=2))
    with pytest.raises(BundleError, match="input_dim"):
        check_bundle(bundle_dir)
    (bundle_dir / "weights.pt").unlink()
    with pytest.raises(BundleError, match=str(bundle_dir / "weights.pt")):
        check_bundle(bundle_dir)
