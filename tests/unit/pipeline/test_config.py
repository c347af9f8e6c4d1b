"""Configuration: YAML sections -> frozen dataclasses, overrides, and errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import CONFIG_DIR, AppConfig, ConfigError, build_config, load_config, parse_overrides

DEFAULT_YAML = CONFIG_DIR / "default.yaml"


def write_yaml(tmp_path: Path, data: object, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_load_default_yaml() -> None:
    config = load_config()
    assert config == load_config(DEFAULT_YAML) == load_config("default")
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    # derived and coerced values
    assert config.model.input_dim == config.features.feature_dim == config.features.n_mfcc * config.features.stack_frames
    assert isinstance(config.streaming.chunk_ms, float)
    assert isinstance(config.data.an4_dev_speakers, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.hidden_size = 1  # type: ignore[misc]


def test_empty_config_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, "")) == build_config(None) == AppConfig()


def test_overrides() -> None:
    config = load_config(overrides=["model.hidden_size=128", "model.bidirectional=false", "streaming.chunk_ms=200"])
    assert config.model.hidden_size == 128
    assert config.model.bidirectional is False
    assert config.streaming.chunk_ms == 200.0 and isinstance(config.streaming.chunk_ms, float)
    assert config.model.num_layers == load_config().model.num_layers  # untouched keys kept
    # lists and mappings are parsed as YAML too
    config = load_config(overrides=["data.an4_dev_speakers=[fash, mcfl]", "streaming.acoustic_resources={node2: 1}"])
    assert config.data.an4_dev_speakers == ("fash", "mcfl")
    assert config.streaming.acoustic_resources == {"node2": 1}


def test_feature_override_updates_model_input_dim() -> None:
    config = load_config(overrides=["features.stack_frames=2", "features.n_mfcc=13"])
    assert config.features.feature_dim == 26 and config.model.input_dim == 26


def test_override_into_section_absent_or_empty_in_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\nfeatures:\n  n_mfcc: 20\n")
    assert load_config(path, ["model.hidden_size=64"]).model.hidden_size == 64
    assert load_config(path, ["decoder.kind=greedy"]).decoder.kind == "greedy"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"modle": {"hidden_size": 3}}, "modle"),
        ({"model": {"hidden_sise": 3}}, "model.hidden_sise"),
        ({"features": {"n_mfcc": 40, "colour": "red"}}, "features.colour"),
    ],
)
def test_unknown_section_or_key(tmp_path: Path, data: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(write_yaml(tmp_path, data))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.hidden_size=abc", "model.hidden_size"),
        ("model.hidden_size=1.5", "model.hidden_size"),
        ("model.hidden_size=true", "model.hidden_size"),
        ("model.bidirectional=1", "model.bidirectional"),
        ("model.combine=3", "model.combine"),
        ("features.hop_ms=fast", "features.hop_ms"),
        ("streaming.chunk_ms=[1, 2]", "streaming.chunk_ms"),
        ("data.an4_dev_speakers=fash", "data.an4_dev_speakers"),
        ("data.an4_dev_speakers=[1, 2]", "data.an4_dev_speakers"),
        ("streaming.acoustic_resources=3", "streaming.acoustic_resources"),
        ("train.chunk_frames_range=[4]", "train.chunk_frames_range"),
        ("train.chunk_frames_range=[4, 8, 12]", "train.chunk_frames_range"),
        ("train.speed_factors=[0.9, x]", "train.speed_factors"),
        ("nosection.key=1", "nosection"),
        ("model.nokey=1", "model.nokey"),
    ],
)
def test_wrong_type_or_name_raises_naming_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.combine=max", "model.combine"),
        ("model.hidden_size=0", "model.hidden_size"),
        ("decoder.kind=fancy", "decoder.kind"),
        ("data.lm_order=0", "data.lm_order"),
        ("data.dictionary_max_words=-1", "data.dictionary_max_words"),
    ],
)
def test_invalid_value_raises_naming_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(overrides=[override])


def test_int_is_accepted_for_float_but_not_bool_for_int() -> None:
    config = build_config({"features": {"hop_ms": 10}, "train": {"speed_factors": [1, 1.1]}})
    assert isinstance(config.features.hop_ms, float)
    assert config.train.speed_factors == (1.0, 1.1) and all(isinstance(v, float) for v in config.train.speed_factors)
    with pytest.raises(ConfigError, match=r"features\.n_mfcc"):
        build_config({"features": {"n_mfcc": True}})


def test_exponent_without_dot_is_a_float() -> None:
    # YAML 1.1 reads "2e-3" as a string; a float field still takes it, and a word is still an error.
    assert load_config(overrides=["train.learning_rate=2e-3"]).train.learning_rate == pytest.approx(0.002)
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(overrides=["train.learning_rate=fast"])


@pytest.mark.parametrize("bad", ["model.hidden_size", "hidden_size=3", "=3"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([bad])


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as exc_info:
        load_config(path)
    assert str(path) in str(exc_info.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("model: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping"), ("model: 3\n", "model")],
)
def test_bad_file_contents(tmp_path: Path, text: str, reason: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=reason):
        load_config(path)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_words_file_becomes_the_decoders_extra_words(tmp_path) -> None:
    """``--words FILE`` on every recognising command: its words (comments dropped, lower-cased,
    deduplicated) are ``decoder.extra_words``; a missing file or an unspellable word is a usage
    error naming the file."""
    import pytest

    from pipeline.cli import build_parser
    from pipeline.config import load_config

    words = tmp_path / "words.txt"
    words.write_text("Zebra giraffe  # animals\n\nzebra okapi\n")
    parser = build_parser()
    for command in (["transcribe", "x"], ["stream", "--file", "x"], ["serve"], ["eval", "x"]):
        args = parser.parse_args([*command, "--words", str(words), "--set", "decoder.beam_size=8"])
        config = load_config(None, args.overrides)
        assert config.decoder.extra_words == ("zebra", "giraffe", "okapi") and config.decoder.beam_size == 8
    bad = tmp_path / "bad.txt"
    bad.write_text("caf\u00e9\n")
    for path in (bad, tmp_path / "missing.txt"):
        with pytest.raises(SystemExit):
            parser.parse_args(["transcribe", "x", "--words", str(path)])
