"""Configuration: one frozen dataclass per section, loaded from ``configs/*.yaml``.

Command-line overrides are ``section.key=value`` strings (value parsed as YAML). An
unknown section or key, or a value of the wrong type, raises ``ConfigError`` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workers.audio.vad_gate import VadConfig
from workers.decoding.decoder import DecoderConfig
from workers.features.config import FeatureConfig
from workers.model.config import QUANTIZE_MODES, ModelConfig
from workers.training.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


@dataclass(frozen=True)
class AudioConfig:
    sample_rate_hz: int = 16000  # model rate; inputs are resampled to it
    raw_sample_rate_hz: int = 16000  # headerless .raw/.pcm input
    raw_sample_width_bytes: int = 2
    raw_big_endian: bool = True


@dataclass(frozen=True)
class StreamingConfig:
    chunk_ms: float = 300.0  # latency-controlled chunk
    lookahead_ms: float = 150.0  # right context of each chunk
    ingest_chunk_ms: float = 100.0  # audio is cut into pieces of this size on intake
    # non-speech that ends an utterance (each starts from a clean state: workers/audio/endpoint.py); 0: the
    # stream is one utterance. On the dev speakers' 105 utterances joined with 0.3-3 s pauses
    # (asr eval --continuous, vad.start_ms 96): 700 ms split 2-4, 900 ms merged 5-9; 800 ms (start_ms
    # 128) split or merged 0-2.
    endpoint_silence_ms: float = 800.0
    max_batch_wait_ms: float = 10.0  # how long the acoustic actor waits to fill a batch
    max_batch_streams: int = 64
    max_inflight_chunks: int = 8  # per stream: backpressure bound
    # how long a push waits for the other open streams' pushes to share its chain (no wait once
    # every open stream has one queued); 15 rather than 5: websocket clients on one tick reach the
    # server spread over more than 5 ms, and chains of a few streams each cost every stage more
    max_submit_wait_ms: float = 15.0
    acoustic_num_gpus: float = -1  # -1: one GPU when the cluster has one, else 0
    acoustic_actors: int = 0  # streams are spread over this many acoustic actors; 0: one with a GPU, else 2
    acoustic_num_threads: int = 1  # torch intra-op threads of the acoustic actor; on 2 cores 2 threads gave a worse p95 (OpenMP spin-waits)
    decoder_actors: int = 2  # streams are spread over this many decoder actors, which decode in parallel
    feature_actors: int = 0  # streams are spread over this many feature actors (MFCC + VAD); 0: one per 4 CPUs of the cluster
    acoustic_resources: dict = field(default_factory=dict)
    decoder_resources: dict = field(default_factory=dict)
    # Crash recovery: the driver keeps each stream's audio (from its start while it fits, else
    # since its last final) and replays it on the restarted actors when a stage actor dies.
    replay_buffer_s: float = 60.0  # seconds of audio kept per stream; a stream with more since its last final is lost in a crash
    recovery_timeout_s: float = 60.0  # longest wait for a crashed actor to come back (and for any chain's results)
    max_streams: int = 0  # asr serve: connections served at once (more are refused); 0: 8 per CPU + 64 per GPU of the cluster

    def __post_init__(self) -> None:
        """Every numeric setting range-checked here, so a bad one fails before Ray starts."""
        positive = ("chunk_ms", "ingest_chunk_ms", "replay_buffer_s", "recovery_timeout_s")
        at_least_one = ("max_batch_streams", "max_inflight_chunks", "decoder_actors")
        non_negative = ("lookahead_ms", "endpoint_silence_ms", "max_batch_wait_ms", "max_submit_wait_ms",
                        "acoustic_actors", "acoustic_num_threads", "feature_actors", "max_streams")
        for name in positive:  # written as "not >" so that NaN fails too
            if not getattr(self, name) > 0 or getattr(self, name) == math.inf:
                raise ValueError(f"streaming.{name} must be > 0 and finite, got {getattr(self, name)}")
        for name in at_least_one:
            if not getattr(self, name) >= 1:
                raise ValueError(f"streaming.{name} must be >= 1, got {getattr(self, name)}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                hint = " (0: automatic)" if name in ("acoustic_actors", "feature_actors", "max_streams") else ""
                raise ValueError(f"streaming.{name} must be >= 0{hint}, got {getattr(self, name)}")
        if self.acoustic_num_gpus != -1 and self.acoustic_num_gpus < 0:
            raise ValueError(f"streaming.acoustic_num_gpus must be -1 (automatic) or >= 0, got {self.acoustic_num_gpus}")


@dataclass(frozen=True)
class InferenceConfig:
    """How the bundle's model runs at inference (eval, transcribe, stream, bench). Not in
    ``model``: that section is the training recipe; a bundle's architecture is its own."""

    quantize: str = "none"  # "int8": dynamic int8 LSTMs + output layer; "bf16": bfloat16 autocast; CPU only (ignored, with a warning, on CUDA)

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"inference.quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")


@dataclass(frozen=True)
class DataConfig:
    an4_root: str = "../shared/data/an4"
    fsdd_root: str = "../shared/data/fsdd"
    an4_dev_speakers: tuple[str, ...] = ("fbbh", "ftal", "mcfl", "mdxs", "mgah", "mmkw", "mrcb", "mtos")
    fsdd_dev_speakers: tuple[str, ...] = ("theo",)
    speechocean_root: str = "../shared/data/speechocean762"
    # 20 whole speakers of speechocean762's test partition held out for dev (never trained on):
    # 10 children aged 6-15 and 10 adults, about half of each gender (spk2age, spk2gender)
    speechocean_dev_speakers: tuple[str, ...] = (
        "0044", "0049", "0122", "1061", "1422", "2007", "3014", "5017", "5432", "8584",
        "0024", "0461", "0567", "1039", "1181", "1334", "2116", "2355", "2488", "9622",
    )
    use_fsdd: bool = True
    use_speechocean: bool = False  # configs/default.yaml turns it on (the shipped model's recipe)
    use_an4: bool = True  # False: FSDD only (e.g. leave-one-speaker-out runs); no AN4 dev set, so the best epoch is picked by loss
    max_train_utterances: int = 0  # 0: all; a small number makes smoke-test runs
    max_dev_utterances: int = 0
    lm_order: int = 3  # word n-gram order of the LM estimated from the training transcripts
    # "cmudict": the bundle's lexicon also spells the CMU dictionary's English words, each
    # with the LM's unigram floor (workers/decoding/english.py); "": the training words only
    dictionary: str = ""
    # with "cmudict": keep its N most frequent words (wordfreq); 0: all ~125,000 (about 190 MB per decoder)
    dictionary_max_words: int = 0

    def __post_init__(self) -> None:
        if self.lm_order < 1:
            raise ValueError(f"data.lm_order must be >= 1, got {self.lm_order}")
        if self.dictionary not in ("", "cmudict"):
            raise ValueError(f"data.dictionary must be 'cmudict' or '' (training words only), got {self.dictionary!r}")
        if self.dictionary_max_words < 0:
            raise ValueError(f"data.dictionary_max_words must be >= 0 (0: all), got {self.dictionary_max_words}")
        if not (self.use_an4 or self.use_fsdd or self.use_speechocean):
            raise ValueError("data.use_an4, data.use_fsdd and data.use_speechocean are all false: no training data")


@dataclass(frozen=True)
class AppConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if not args or args[-1] is Ellipsis:  # tuple[X, ...]: any length
            inner = args[0] if args else Any
            return tuple(_coerce(v, inner, where) for v in value)
        if len(value) != len(args):  # tuple[X, Y]: exactly that many items
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(v, h, where) for v, h in zip(value, args))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _build_section(cls: type, values: dict, section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}]: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{key} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


def build_config(raw: dict | None) -> AppConfig:
    raw = raw or {}
    sections = {f.name: f for f in dataclasses.fields(AppConfig)}
    for name in raw:
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r} (known: {', '.join(sections)})")
    hints = typing.get_type_hints(AppConfig)
    built = {name: _build_section(hints[name], raw.get(name) or {}, name) for name in sections}
    config = AppConfig(**built)
    if config.model.input_dim != config.features.feature_dim:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, input_dim=config.features.feature_dim))
    return config


def parse_overrides(overrides: list[str]) -> dict:
    """``["model.hidden_size=128", ...]`` -> nested dict."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} is not section.key=value")
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Read a YAML file (default ``configs/default.yaml``) and apply overrides."""
    path = Path(path) if path else CONFIG_DIR / "default.yaml"
    if not path.is_file() and not path.suffix and (CONFIG_DIR / f"{path}.yaml").is_file():
        path = CONFIG_DIR / f"{path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for section, values in parse_overrides(overrides or []).items():
        if raw.get(section) is None:  # absent, or written as an empty `section:` line
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: section {section} must be a mapping")
        raw[section].update(values)
    return build_config(raw)


class WordsFileAction(argparse.Action):
    """``--words FILE``: the file's words (``workers.decoding.english.read_word_list``) become the
    override ``decoder.extra_words``, so every mode's decoder spells them; a missing file or a word
    the model cannot spell is a usage error naming the file."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, path: Any, option_string: str | None = None) -> None:
        from workers.decoding.english import read_word_list

        try:
            words = read_word_list(str(path))
        except (OSError, ValueError) as exc:
            parser.error(f"{option_string} {path}: {exc}" if isinstance(exc, OSError) else f"{option_string} {exc}")
        overrides = list(getattr(namespace, "overrides", None) or [])
        namespace.overrides = [*overrides, f"decoder.extra_words={json.dumps(list(words))}"]


def add_words_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--words", action=WordsFileAction, metavar="FILE",
                        help="more words to recognise (one or more per line, # comments): added to the model's lexicon, "
                             "scored at the LM's floor for unseen words")
