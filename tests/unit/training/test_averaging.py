"""Checkpoint averaging: the mean of the last epochs' weights, exported when it is better on dev."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import load_config
from tests.conftest import AN4
from workers.model.bundle import load_bundle
from workers.training.trainer import TrainConfig, Trainer, average_state_dicts


def test_average_state_dicts_is_the_elementwise_mean(tmp_path):
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(5)}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    mean = average_state_dicts([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0]))
    assert mean["w"].dtype == torch.float32
    assert mean["steps"].item() == 3  # integer buffers are taken from the first, not averaged
    with pytest.raises(ValueError, match="no state dicts"):
        average_state_dicts([])


def test_negative_average_last_epochs_is_rejected():
    with pytest.raises(ValueError, match="average_last_epochs"):
        TrainConfig(average_last_epochs=-1)


@pytest.mark.skipif(not AN4.is_dir(), reason=f"{AN4} not present")
def test_training_keeps_last_snapshots_and_exports_the_average_when_better(tmp_path):
    from pipeline.training.run import build_split

    config = load_config("configs/tiny.yaml", [f"data.an4_root={AN4}", "data.use_fsdd=false", "data.max_train_utterances=16",
                                                "data.max_dev_utterances=4", "train.average_last_epochs=3"])
    train, dev, _ = build_split(config)
    run_dir = tmp_path / "run"
    trainer = Trainer(run_dir, train, dev, config.features, config.model, config.train, log=lambda _: None)
    progress = trainer.run(show_progress=False)

    snapshots = sorted((run_dir / "epochs").glob("epoch_*.pt"))
    assert [p.name for p in snapshots] == ["epoch_002.pt", "epoch_003.pt", "epoch_004.pt"]
    assert torch.equal(torch.load(snapshots[-1], weights_only=True)["output.weight"], trainer.model.output.weight)
    assert progress.averaged["after_epoch"] == 4 and progress.averaged["averaged_epochs"] == [2, 4]
    # the recorded WER is that of the mean of the three snapshots, recomputed here
    from workers.training.trainer import average_state_dicts, evaluate_greedy

    trained = {n: v.clone() for n, v in trainer.model.state_dict().items()}
    trainer.model.load_state_dict(average_state_dicts(snapshots))
    cfg = trainer.cfg
    expected = evaluate_greedy(trainer.model, trainer.dev, trainer.device, cfg.eval_chunk_frames, cfg.eval_right_context_frames)
    trainer.model.load_state_dict(trained)
    assert progress.averaged["dev_wer_greedy_streaming"] == round(expected, 4)

    # Force the average to win: the bundle then holds the averaged weights, and the
    # trainer (and last.pt) keep the last epoch's, so that --resume trains on from there.
    last_epoch = {n: v.clone() for n, v in trainer.model.state_dict().items()}
    trainer.progress.best_wer, trainer.progress.averaged = float("inf"), None
    trainer._try_averaged(run_dir / "bundle", None, None)
    assert trainer.progress.averaged["exported"] is True
    bundle = load_bundle(run_dir / "bundle")
    mean = average_state_dicts(snapshots)
    for name, value in bundle.model.state_dict().items():
        assert torch.allclose(value, mean[name]), name
    assert bundle.info["averaged_epochs"] == [2, 4]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, last_epoch[name]), name
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert torch.equal(saved["model"]["output.weight"], last_epoch["output.weight"])
    assert json.loads(json.dumps(saved["progress"]["averaged"]))["exported"] is True
