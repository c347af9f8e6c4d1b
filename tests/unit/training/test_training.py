"""End-to-end training on a few real AN4 utterances: export, resume after a kill, warm start and augmentation.

Ray Train (`asr train --workers N`): tests/test_distributed_training.py."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import AN4, REPO
from workers.model.bundle import load_bundle

pytestmark = pytest.mark.skipif(not AN4.is_dir(), reason=f"{AN4} not present")


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
            "--set", f"data.an4_root={AN4}", "--set", f"data.fsdd_root={AN4.parent / 'fsdd'}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_train_kill_resume_matches_uninterrupted_run(tmp_path, capsys, monkeypatch):
    # Reference: an uninterrupted run, beside the run to interrupt (one thread each, two cores). In a
    # folder of its own: a run caches features in RUN_DIR/../feature_cache, and two runs writing the
    # same cache file at once race on its .tmp (the second one's rename failed: FileNotFoundError).
    ref_dir = tmp_path / "reference" / "ref"
    ref = subprocess.Popen(_train_cmd(ref_dir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    # Interrupted: SIGKILL as soon as the first checkpoint exists, then --resume.
    run_dir = tmp_path / "run"
    with (tmp_path / "run.err").open("w") as err:
        proc = subprocess.Popen(_train_cmd(run_dir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 240
    while not (run_dir / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "last.pt").is_file(), (tmp_path / "run.err").read_text()[-3000:]  # it was killed, it did not fail
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    ref_history = json.loads((ref_dir / "history.json").read_text())
    assert [h["epoch"] for h in ref_history] == [1, 2, 3, 4]
    ref_bundle = load_bundle(ref_dir / "bundle")
    assert not (run_dir / "history.json").exists(), "the run finished before it could be interrupted"
    epochs_done = torch.load(run_dir / "last.pt", weights_only=True)["progress"]["epoch"]
    assert 1 <= epochs_done < 4
    # The resume in this process (what is checked is the resumed run, not its process; no second torch import).
    from pipeline.cli import main

    monkeypatch.chdir(REPO)
    capsys.readouterr()
    assert main(_train_cmd(run_dir, "--resume")[3:]) == 0
    out = capsys.readouterr()
    assert f"resumed from {run_dir / 'last.pt'} after epoch {epochs_done}" in out.out + out.err
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # Same data order, augmentation and dropout draws: the resumed run ends where the uninterrupted one did.
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    bundle = load_bundle(run_dir / "bundle")
    for name, value in ref_bundle.model.state_dict().items():
        assert torch.equal(value, bundle.model.state_dict()[name]), name
    assert bundle.lexicon_path is not None and bundle.lm_path is not None
    assert bundle.info["epoch"] >= 1


def test_augmented_warm_started_epoch(tmp_path, monkeypatch):
    """train.init_from starts from a bundle's weights; with augment_prob=1 every example of an
    epoch is recomputed from its degraded waveform (same targets, new features)."""
    from pipeline.config import load_config
    from pipeline.training.run import build_split
    from workers.model.bundle import save_bundle
    from workers.training.trainer import TrainConfig, Trainer

    # 4 simulated rooms instead of 48 (as tests/test_perturb.py): each Augmenter built here
    # simulated 96 rooms, ~90 % of this test's time; what is checked does not depend on the pool size.
    augment_config = TrainConfig.augment_config.fget
    monkeypatch.setattr(TrainConfig, "augment_config", property(lambda self: dataclasses.replace(augment_config(self), rir_pool_size=4)))

    config = load_config("configs/tiny.yaml", [f"data.an4_root={AN4}", "data.use_fsdd=false", "data.max_train_utterances=6",
                                                "data.max_dev_utterances=2", "features.cmn_prior_frames=50"])
    train, dev, _ = build_split(config)
    first = Trainer(tmp_path / "a", train, dev, config.features, config.model, config.train, log=lambda _: None)
    start = save_bundle(tmp_path / "start", first.model, config.features, first.normalizer)
    cfg = dataclasses.replace(config.train, init_from=str(start), augment_prob=1.0, epochs=1, seed=5)
    trainer = Trainer(tmp_path / "b", train, dev, config.features, config.model, cfg, log=lambda _: None)
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
    assert len(trainer.augmenter.rirs) == 4
    clean = trainer.train_sets[1.0]
    augmented = trainer._batch_examples(clean, list(range(len(clean))), 1.0)
    for before, after in zip(clean, augmented):
        assert torch.equal(before.targets, after.targets) and before.index == after.index
        assert after.features.shape[1] == before.features.shape[1]
        assert abs(after.features.shape[0] - before.features.shape[0]) <= 1
        assert not torch.equal(after.features, before.features)
    assert trainer.run(show_progress=False).epoch == 1
    with pytest.raises(ValueError, match="init_from"):
        bad = dataclasses.replace(config.model, hidden_size=config.model.hidden_size + 1)
        Trainer(tmp_path / "c", train, dev, config.features, bad, cfg, log=lambda _: None)


def test_split_with_speechocean_holds_out_whole_speakers_of_every_corpus():
    """data.use_speechocean adds speechocean762 (Kaldi data dirs): its 20 dev speakers join AN4's in
    the dev set that picks the epoch, FSDD's held-out speaker is the extra dev set, and no dev
    speaker has an utterance in train."""
    from pipeline.config import load_config
    from pipeline.training.run import _split_sources, build_split

    ocean = AN4.parent / "speechocean762"
    if not ocean.is_dir():
        pytest.skip("speechocean762 not present")
    config = load_config(None, [f"data.an4_root={AN4}", f"data.fsdd_root={AN4.parent / 'fsdd'}",
                                f"data.speechocean_root={ocean}", "data.use_speechocean=true"])
    train, dev, extra = build_split(config, log=lambda _: None)
    sets = _split_sources(config, lambda _: None, None, None)[1]  # the dev sets by corpus
    assert {u.speaker for u in sets["speechocean"]} == set(config.data.speechocean_dev_speakers)
    assert len(dev) == len(sets["an4"]) + len(sets["speechocean"]) and len(extra) == len(sets["fsdd"])
    assert not {u.speaker for u in train} & {u.speaker for u in dev + extra}
    assert sum(u.duration_s for u in train) / 3600 > 5.0  # AN4 + FSDD + speechocean762's other 205 speakers
    assert any(u.audio.endswith(".opus") for u in train)


def test_train_input_is_skipped_and_counted_or_strict_stops_it(tmp_path):
    """`asr train --train FOLDER`: an unusable line is skipped and counted by reason (the run goes on
    and, with no --dev, no line speaks of WER); with --strict it is one clear error, exit 2."""
    import numpy as np
    import soundfile as sf

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, word in enumerate(["yes", "no", "stop", "go"]):
        sf.write(data / f"u{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        (data / f"u{i}.txt").write_text(word)
    (data / "empty.wav").write_bytes(b"")
    (data / "empty.txt").write_text("nothing")
    strict = subprocess.run(_train_cmd(tmp_path / "strict", "--train", str(data), "--strict"), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert strict.returncode == 2, strict.stderr[-2000:]
    assert "1 unusable (1 audio file empty)" in strict.stderr and "empty.wav" in strict.stderr and "Traceback" not in strict.stderr
    run = subprocess.run(_train_cmd(tmp_path / "lenient", "--train", str(data), "--set", "train.epochs=1"), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout + run.stderr
    assert "skipped 1 (1 audio file empty)" in out
    assert "WER" not in out and "dev_wer" not in out
    assert (tmp_path / "lenient" / "bundle" / "config.json").is_file()
