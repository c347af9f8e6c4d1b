"""Shared fixtures: paths to the real corpora and a tiny untrained model bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from workers.bundle import save_bundle
from workers.features import FeatureConfig, Normalizer
from workers.model import BiLSTMCTC, ModelConfig
from workers.vad import VadConfig

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
AN4 = DATA / "an4"
FSDD = DATA / "fsdd"
#: Tests on generated tones and noise turn voice activity gating off: no detector hears speech
#: in them, so every word would be dropped and comparisons of texts would pass vacuously.
NO_VAD = VadConfig(enabled=False)
#: What a quiet command (no --verbose) must not print: Ray's internals (tests/test_ray_session.py,
#: tests/test_stream_mic.py).
NOISY = ("core_worker.cc", "Started a local Ray instance", "dashboard", "Loading the LM", "Running Dataset", "token", "Token",
         "WARNING", "ERROR", "Traceback")


def make_tiny_bundle(path: Path, seed: int = 0, hidden_size: int = 24, with_lm: bool = False) -> Path:
    """An untrained 2-layer bundle (fast); optionally with a lexicon and LM from a few sentences."""
    torch.manual_seed(seed)
    features = FeatureConfig()
    model = BiLSTMCTC(ModelConfig(input_dim=features.feature_dim, hidden_size=hidden_size, num_layers=2))
    extras = {}
    if with_lm:
        from workers.lm import build_arpa, vocabulary, write_lexicon

        texts = ["yes", "no", "go", "stop", "erase one two three", "enter", "rubout", "a b c"]
        path.parent.mkdir(parents=True, exist_ok=True)
        extras = {
            "lexicon_path": write_lexicon(vocabulary(texts), path.parent / f"{path.name}_lexicon.txt"),
            "lm_path": build_arpa(texts, order=3, path=path.parent / f"{path.name}_lm.arpa"),
        }
    return save_bundle(path, model, features, Normalizer(torch.full((40,), -5.0), torch.full((40,), 8.0)), **extras)


#: In CI (``CI=true``, set by .ci/run) the corpora and the shipped model must be there: a
#: missing one fails the run instead of quietly skipping the tests that need it.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_sessionstart(session) -> None:
    if not IN_CI:
        return
    from workers.bundle import DEFAULT_BUNDLE

    missing = [str(p) for p in (AN4, FSDD, DEFAULT_BUNDLE / "weights.pt") if not p.exists()]
    if missing:
        pytest.exit(f"CI=true but {', '.join(missing)} missing: these tests would be skipped, not run", returncode=1)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle_lm(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle_lm") / "tiny_lm", with_lm=True)


@pytest.fixture(scope="session")
def an4_root() -> Path:
    if not AN4.is_dir():
        pytest.skip(f"{AN4} not present")
    return AN4


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests run torch with one thread, as the Ray actors do: on a small, busy machine more
    threads only spin against each other (tiny LSTMs ran up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The corpora of ``an4_as_librispeech_and_folder`` (tests/test_train_data.py, tests/test_distributed_training.py).
TRAIN_SPEAKERS = 6
UTTS_PER_SPEAKER = 4


def _by_speaker(an4_root: Path) -> dict[str, list]:
    from workers.corpus import read_an4

    speakers: dict[str, list] = {}
    for u in read_an4(an4_root).utterances:
        speakers.setdefault(u.speaker, []).append(u)
    return speakers


def an4_as_librispeech_and_folder(an4_root: Path, root: Path) -> tuple[Path, Path, set[str]]:
    """Real AN4 recordings laid out as other corpora: (a LibriSpeech-layout training corpus of
    ``TRAIN_SPEAKERS`` speakers x ``UTTS_PER_SPEAKER`` utterances, ``SPEAKER/CHAPTER/*.flac`` +
    ``*.trans.txt`` in upper case; a plain dev folder of two other speakers, ``SPEAKER/N.wav`` +
    ``N.txt``; the training words)."""
    import soundfile as sf

    from workers.audio import read_audio
    speakers = sorted(_by_speaker(an4_root).items())
    train_words: set[str] = set()
    libri = root / "LibriSpeech" / "train-clean-an4"
    for k, (_, utts) in enumerate(speakers[:TRAIN_SPEAKERS]):
        speaker_id, chapter = str(100 + k), "7"
        chapter_dir = libri / speaker_id / chapter
        chapter_dir.mkdir(parents=True)
        lines = []
        for n, u in enumerate(utts[:UTTS_PER_SPEAKER]):
            uid = f"{speaker_id}-{chapter}-{n:04d}"
            audio, rate = read_audio(u.audio)
            sf.write(chapter_dir / f"{uid}.flac", audio[:, 0], rate)
            lines.append(f"{uid} {u.text.upper()}")
            train_words |= set(u.text.split())
        (chapter_dir / f"{speaker_id}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    folder = root / "dev_folder"
    for name, utts in speakers[TRAIN_SPEAKERS : TRAIN_SPEAKERS + 2]:
        (folder / name).mkdir(parents=True)
        for n, u in enumerate(utts[:4]):
            audio, rate = read_audio(u.audio)
            sf.write(folder / name / f"{n}.wav", audio[:, 0], rate, subtype="PCM_16")
            (folder / name / f"{n}.txt").write_text(u.text + "\n")
    return libri.parent, folder, train_words
