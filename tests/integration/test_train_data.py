"""``asr train --train DATA [--dev DATA]``: training on corpora other than the default AN4 +
FSDD split, built here from real AN4 recordings in the LibriSpeech layout and as a plain
folder of audio with ``.txt`` transcripts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TRAIN_SPEAKERS, UTTS_PER_SPEAKER, an4_as_librispeech_and_folder

from workers.data.corpus import read_corpus
from workers.model.bundle import load_bundle


@pytest.fixture(scope="module")
def corpora(an4_root: Path, tmp_path_factory) -> tuple[Path, Path, set[str]]:
    return an4_as_librispeech_and_folder(an4_root, tmp_path_factory.mktemp("corpora"))


def _train(capsys, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``asr train --config configs/tiny.yaml --run-dir RUN_DIR --set train.epochs=2 ARGS``, in this
    process (what is checked is the run and what it wrote, not its process: no second python +
    torch import); returns its exit code and output as a finished command."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["train", "--config", str(REPO / "configs/tiny.yaml"), "--run-dir", str(run_dir), "--set", "train.epochs=2", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["asr", "train", *args], code, out, err)


def test_the_layouts_read_as_expected(corpora) -> None:
    libri, folder, _ = corpora
    train, dev = read_corpus(libri).utterances, read_corpus(folder).utterances
    assert len(train) == TRAIN_SPEAKERS * UTTS_PER_SPEAKER and len({u.speaker for u in train}) == TRAIN_SPEAKERS
    assert len(dev) == 8 and len({u.speaker for u in dev}) == 2
    assert all(u.text == u.text.lower() and u.text for u in train)  # LibriSpeech's upper case normalised


def test_train_on_librispeech_layout_with_a_folder_as_dev(corpora, tmp_path: Path, capsys) -> None:
    libri, folder, train_words = corpora
    run = _train(capsys, tmp_path / "run", "--train", str(libri), "--dev", str(folder))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["dev_wer_greedy"]) and np.isfinite(h["loss"]) for h in history)
    bundle = load_bundle(tmp_path / "run" / "bundle")
    assert bundle.lexicon_path is not None and bundle.lm_path is not None
    lexicon = {line.split("\t")[0] for line in bundle.lexicon_path.read_text().splitlines()}
    assert lexicon == train_words  # the LM and lexicon come from the training transcripts only
    info = bundle.info
    assert len(info["train_speakers"]) == TRAIN_SPEAKERS and len(info["dev_speakers"]) == 2
    assert not set(info["train_speakers"]) & set(info["dev_speakers"])
    manifest = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert len(manifest) == TRAIN_SPEAKERS * UTTS_PER_SPEAKER and all(m["audio"].endswith(".flac") for m in manifest)


def test_train_on_a_folder_without_dev(corpora, tmp_path: Path, capsys) -> None:
    _, folder, _ = corpora
    run = _train(capsys, tmp_path / "run", "--train", str(folder), "--set", "train.epochs=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no --dev data" in run.stdout + run.stderr
    assert load_bundle(tmp_path / "run" / "bundle").info["train_utterances"] == 8


def _train_in_process(run_dir: Path, *args: str) -> int:
    from pipeline.cli import main

    return main(["train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *args])


@pytest.mark.parametrize("workers", ["0", "2"])
def test_speakers_shared_by_train_and_dev_are_refused(corpora, tmp_path: Path, capsys, workers: str) -> None:
    libri, folder, _ = corpora
    assert _train_in_process(tmp_path / "run", "--train", str(libri), str(folder), "--dev", str(folder), "--workers", workers) == 2
    err = capsys.readouterr().err
    assert "share 2 speaker(s)" in err, err
    assert not (tmp_path / "run" / "bundle").exists()


def test_workers_refuse_a_recipe_they_cannot_follow(tmp_path: Path, capsys) -> None:
    """Waveform augmentation is only in the ray_data feed: with the shared feed, a clear error, not another recipe."""
    assert _train_in_process(tmp_path / "run", "--workers", "2", "--set", "train.augment_prob=0.5",
                             "--set", "train.data_feed=shared") == 2
    err = capsys.readouterr().err
    assert "augment_prob=0.5" in err and "ray_data" in err, err
    assert not (tmp_path / "run").exists()


def test_unreadable_train_data_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert _train_in_process(tmp_path / "run", "--train", str(tmp_path / "nowhere")) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--use-gpu"], True)])
def test_use_gpu_asks_every_worker_for_a_gpu(tmp_path: Path, monkeypatch, flag: list[str], expected) -> None:
    """`asr train --workers N --use-gpu` reaches Ray Train as use_gpu=True (the workers wait for GPU
    nodes); without it the choice is left to the cluster's GPUs at the start (None)."""
    import pipeline.training.run as training

    seen = {}

    def fake(config, run_dir, workers, **kwargs):
        seen.update(kwargs, workers=workers)
        return Path(run_dir) / "bundle"

    monkeypatch.setattr(training, "run_training_distributed", fake)
    assert _train_in_process(tmp_path / "run", "--workers", "2", "--set", "train.augment_prob=0", *flag) == 0
    assert seen["workers"] == 2 and seen["use_gpu"] is expected
