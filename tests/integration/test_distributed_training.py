"""`asr train --workers N` (pipeline/training/distributed.py) runs the single-process trainer's epochs
(workers.training.trainer.TrainLoop) on Ray Train: same weights with one worker, a loadable bundle with
lexicon and LM from two (on real audio in the LibriSpeech layout, features streamed through Ray
Data, surviving a killed worker)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import AN4, REPO, TRAIN_SPEAKERS, UTTS_PER_SPEAKER, an4_as_librispeech_and_folder
from workers.model.bundle import load_bundle

pytestmark = pytest.mark.skipif(not AN4.is_dir(), reason=f"{AN4} not present")
ray = pytest.importorskip("ray")


#: Idle worker processes kept (Ray's default kills any idle beyond one per CPU after a second, and
#: here the Ray Train actors alone fill that): the Ray Data feature tasks of a restarted worker
#: group, and of each test, then reuse warm processes instead of importing torch again (-8 s).
KEEP_IDLE_WORKERS = {"num_workers_soft_limit": 12, "idle_worker_killing_time_threshold_ms": 600_000}


@pytest.fixture(scope="module")
def ray_cpus():
    # never a `ray start` cluster of the machine
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _system_config=KEEP_IDLE_WORKERS)
    yield
    ray.shutdown()


def _config(*extra: str):
    from pipeline.config import load_config

    return load_config(str(REPO / "configs/tiny.yaml"), [f"data.an4_root={AN4}", "data.use_fsdd=false", *extra])


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} while it does not exist or is being written (Ray Train
    rewrites its checkpoint snapshot in place, so a poll can see it empty or half-written)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _weights(bundle) -> dict[str, torch.Tensor]:
    return bundle.model.state_dict()


def _max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - v).abs().max().item() for n, v in b.items())


def _train_both_ways(tmp_path: Path, workers: int, steps: int, *overrides: str):
    """The same config (10 AN4 utterances, batches of up to 3, 2 epochs of ``steps`` steps, speed
    perturbation in epoch 2, the ``shared`` feed) trained in-process and on ``workers`` Ray Train
    workers. Returns (config, the in-process Trainer, its Progress, the Ray run's history, the
    exported Ray bundle's path, the weights of the Ray run's last checkpoint)."""
    from pipeline.training.distributed import train_distributed
    from pipeline.training.run import build_split
    from workers.training.trainer import Trainer

    config = _config("data.max_train_utterances=10", "data.max_dev_utterances=3", "train.epochs=2",
                     "train.speed_factors=[1.0, 1.1]", "train.full_utterance_prob=0.3",
                     "train.max_batch_utterances=3", "train.data_feed=shared", *overrides)
    train, dev, _ = build_split(config)
    trainer = Trainer(tmp_path / "single", train, dev, config.features, config.model, config.train, log=lambda _: None)
    single = trainer.run(max_steps_per_epoch=steps, show_progress=False)
    out = train_distributed(train, config.features, config.model, config.train, workers, tmp_path / "ray" / "bundle", use_gpu=False,
                            storage_path=tmp_path / "ray" / "ray_train", dev=dev, max_steps_per_epoch=steps, log=lambda _: None)
    history = json.loads((tmp_path / "ray" / "history.json").read_text())
    last = sorted((tmp_path / "ray" / "ray_train" / "asr_train").glob("checkpoint_2*"))[-1] / "state.pt"
    return config, trainer, single, history, out, torch.load(last, weights_only=True)["model"]


def test_one_ray_train_worker_equals_the_single_process_trainer(tmp_path, ray_cpus):
    """Same seed, same epoch plans (batches and chunk draws), speed perturbation in epoch 2:
    the weights after 2 x 3 steps agree to 1e-5 (max abs difference). The ``shared`` feed: the same
    features and statistics as the single-process trainer (the ray_data feed's CMVN is summed in
    another order, ~1e-7 apart)."""
    from workers.training.trainer import new_model

    config, trainer, single, history, out, got = _train_both_ways(tmp_path, 1, 3)
    assert [h["steps"] for h in history] == [h["steps"] for h in single.history] == [3, 3]
    for key in ("chunked_batches", "whole_batches", "dev_wer_greedy", "dev_wer_greedy_streaming"):
        assert [h[key] for h in history] == [h[key] for h in single.history], key
    assert sum(h["chunked_batches"] for h in history) > 0  # chunk-aware batches on both paths
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single.history], abs=1e-4)
    # the last epoch's weights (the last checkpoints) and the exported best epoch's (the bundles)
    assert _max_abs_difference(got, trainer.module.state_dict()) < 1e-5
    assert _max_abs_difference(_weights(load_bundle(out)), _weights(load_bundle(tmp_path / "single" / "bundle"))) < 1e-5
    # and the model did move away from its initial weights
    assert _max_abs_difference(got, new_model(config.model, config.train.seed).state_dict()) > 1e-3


def test_two_ray_train_workers_take_the_single_process_trainers_steps(tmp_path, ray_cpus):
    """Data parallelism keeps the recipe: 2 workers run every step of the plan on half of each batch
    (batches of 1 to 3 utterances, so shares of 2, 1 and an empty share filled at weight 0), and
    after 2 x 4 steps with chunk draws and speed perturbation their weights equal the single-process
    trainer's to 1e-5 (max abs difference; gloo sums in another order). Dropout and SpecAugment are
    off: their draws depend on which worker holds an utterance."""
    from workers.training.epochs import plan_epoch

    config, trainer, single, history, _, got = _train_both_ways(tmp_path, 2, 4, "model.dropout=0.0", "train.freq_mask_param=0",
                                                                "train.num_time_masks=0")
    first = plan_epoch([e.features.shape[0] for e in trainer.train_sets[1.0]], config.train, 0)[:4]
    assert sorted(len(b.indices) for b in first) == [1, 3, 3, 3]  # shares of 2 + 1, and 1 + empty
    assert [h["steps"] for h in history] == [h["steps"] for h in single.history] == [4, 4]
    for key in ("chunked_batches", "whole_batches"):
        assert [h[key] for h in history] == [h[key] for h in single.history], key
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single.history], abs=1e-4)
    assert _max_abs_difference(got, trainer.module.state_dict()) < 1e-5


def test_shard_plan_splits_every_batch_and_weights_the_shares_to_the_batch_mean():
    """Every worker gets every step; the shares partition the batch; the weights of a batch's
    utterances sum to ``world`` over the workers (DDP divides by it); an empty share is a weight-0 repeat."""
    from workers.training.epochs import PlannedBatch, shard_plan

    plan = [PlannedBatch((0, 1, 2, 3, 4), 4, 2), PlannedBatch((5,), None, 0), PlannedBatch((6, 7), 6, 3)]
    assert shard_plan(plan, 0, 1) == plan
    for world in (2, 3):
        shards = [shard_plan(plan, rank, world) for rank in range(world)]
        assert all(len(s) == len(plan) for s in shards)
        for step, batch in enumerate(plan):
            shares = [s[step] for s in shards]
            assert {(b.chunk_frames, b.right_context_frames) for b in shares} == {(batch.chunk_frames, batch.right_context_frames)}
            weighted = sorted(i for b in shares for i, w in zip(b.indices, b.loss_weights) if w > 0)
            assert weighted == sorted(batch.indices)
            assert sum(sum(b.loss_weights) for b in shares) == pytest.approx(world)
            assert all(len(b.indices) >= 1 for b in shares)
    assert shard_plan(plan, 1, 2)[1] == PlannedBatch((5,), None, 0, (0.0,))


def test_ray_data_features_and_global_cmvn_equal_the_in_memory_ones(ray_cpus):
    from pipeline.training.data import feature_dataset, global_cmvn
    from pipeline.training.run import build_split
    from workers.features.mfcc import Normalizer
    from workers.training.epochs import compute_raw_features

    config = _config("data.max_train_utterances=6")
    train, _, _ = build_split(config)
    raw = compute_raw_features(train, config.features, (1.0, 1.1), None, log=lambda _: None)
    for speed in (1.0, 1.1):
        rows = sorted(feature_dataset(train, config.features, speed, batch_size=4).take_all(), key=lambda r: r["index"])
        assert [r["text"] for r in rows] == [u.text for u in train]
        for row, expected in zip(rows, raw[speed]):
            assert row["frames"] == expected.shape[0]
            assert torch.equal(torch.tensor(row["mfcc"]), expected)
    normalizer = global_cmvn(feature_dataset(train, config.features, 1.0, batch_size=4))
    reference = Normalizer.from_frames(raw[1.0])
    assert torch.allclose(normalizer.mean, reference.mean, atol=1e-4) and torch.allclose(normalizer.std, reference.std, rtol=1e-4)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path, set[str]]:
    return an4_as_librispeech_and_folder(AN4, tmp_path_factory.mktemp("corpora"))


def test_two_workers_train_other_layouts_through_ray_data_survive_a_killed_worker_and_export_a_bundle(
        tmp_path, ray_cpus, capsys, corpora):
    """``asr train --workers 2 --train LIBRISPEECH --dev FOLDER`` on the default ``ray_data`` feed:
    2 workers x 2 epochs (the second speed-perturbed) on real AN4 audio laid out as LibriSpeech,
    features streamed per worker through Ray Data. Rank 1 is SIGKILLed once Ray Train has a
    checkpoint of epoch 1, mid-epoch 2 (the workers pause after its first step until then): a new
    worker takes its place, the run resumes from the checkpoint and finishes. Equal steps on both workers, dev WER and chunked batches logged per
    epoch, waveform augmentation (``train.augment_prob``) in the feed's tasks, no worker held more than the window (< its share of the corpus); the bundle's
    normaliser is the global CMVN of the training set, its lexicon the training words, and
    ``asr eval`` and ``asr transcribe`` load it."""
    from pipeline.cli import main
    from pipeline.training.run import build_split, run_training_distributed
    from workers.features.mfcc import Normalizer
    from workers.training.epochs import compute_raw_features, plan_epoch, trainable

    libri, folder, words = corpora
    sources = {"train_sources": [str(libri)], "dev_sources": [str(folder)]}
    config = _config("train.epochs=2", "train.speed_factors=[1.0, 1.1]", "train.max_batch_utterances=3", "train.feed_batch_utterances=2",
                     "train.augment_prob=0.5", "train.augment_rir_pool_size=2")
    assert config.train.data_feed == "ray_data"
    lines: list[str] = []
    errors: list[BaseException] = []
    pids = tmp_path / "pids"
    pids.mkdir()
    (pids / "hold").touch()  # the workers wait after the first step of epoch 2 while this exists
    result: list[Path] = []

    def run() -> None:
        try:
            result.append(run_training_distributed(config, tmp_path / "run", 2, log=lines.append, use_gpu=False, pid_dir=pids, **sources))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    killed = None
    snapshot = tmp_path / "run" / "ray_train" / "asr_train" / "checkpoint_manager_snapshot.json"
    while thread.is_alive() and time.time() < deadline:
        # Kill rank 1 mid-epoch 2 (it stops after that epoch's first step until "hold" goes), once Ray
        # Train has registered epoch 1's checkpoint.
        state = _read_json(pids / "rank1.json")
        if _read_json(snapshot).get("latest_checkpoint_result") and state.get("epoch") == 1:
            os.kill(state["pid"], signal.SIGKILL)
            killed = state["pid"]
            (pids / "hold").unlink()
            break
        time.sleep(0.01)
    thread.join(timeout=300)
    assert not errors, errors
    assert killed is not None, "the run finished before a worker could be killed"
    assert _read_json(pids / "rank1.json")["pid"] != killed  # a new worker took rank 1's place
    resumed = [line for line in lines if line.startswith("resumed from a checkpoint after epoch")]
    assert resumed and int(resumed[0].split()[-1]) == 1
    out = result[0]
    assert any("feed ray_data" in line for line in lines)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    records = {r["epoch"]: r for r in (json.loads(line) for line in lines if line.startswith('{"epoch"'))}
    assert sorted(records) == [1, 2]
    train, dev, _ = build_split(config, lambda _: None, **sources)
    assert len(train) == TRAIN_SPEAKERS * UTTS_PER_SPEAKER and len(dev) == 8
    # the statistics and lengths of the training set, in memory (that Ray Data's pass gives the
    # same is test_ray_data_features_and_global_cmvn_equal_the_in_memory_ones)
    raw = compute_raw_features(train, config.features, (1.0,), None, log=lambda _: None)[1.0]
    normalizer = Normalizer.from_frames(raw)
    frames = [r.shape[0] for r in raw]
    plan = plan_epoch(trainable(frames, [u.text for u in train], config.features.stack_frames)[1], config.train, 0)
    for r in records.values():
        assert 0 <= r["dev_wer_greedy"] and 0 <= r["dev_wer_greedy_streaming"] and r["workers"] == 2
        assert r["chunked_batches"] + r["whole_batches"] == r["steps"] == len(plan)  # each worker ran every step, on its share
        assert 0 < r["feed_max_utterances_held"] <= r["feed_window"] == 2 * 2 + 3 < len(train) // 2
        assert 0 < r["augmented_utterances"] < 3 * r["steps"]  # waveform augmentation in the feed: some, not all
    assert sum(r["chunked_batches"] for r in records.values()) > 0
    bundle = load_bundle(out)
    assert torch.allclose(bundle.normalizer.mean, normalizer.mean, atol=1e-4)
    assert torch.allclose(bundle.normalizer.std, normalizer.std, atol=1e-4)
    assert bundle.info["ray_train_workers"] == 2 and bundle.info["train_utterances"] == len(train)
    assert bundle.lm_path is not None and bundle.lexicon_path is not None
    assert {line.split("\t")[0] for line in bundle.lexicon_path.read_text().splitlines()} == words
    capsys.readouterr()
    assert main(["eval", str(folder), "--model", str(out), "--config", str(REPO / "configs/tiny.yaml"), "--decoder", "beam"]) == 0
    assert "WER" in capsys.readouterr().out.upper()
    assert main(["transcribe", "--local", "--model", str(out), str(REPO / "examples" / "ex01_yes.wav")]) == 0
    assert "ex01_yes.wav:" in capsys.readouterr().out


def test_lengths_at_every_speed_follow_from_the_sample_count(tmp_path):
    """The ray_data feed plans epochs from lengths computed from one pass at speed 1.0: equal to the
    frame counts of the speed-perturbed MFCC."""
    from pipeline.training.run import build_split
    from workers.audio.reader import load_audio
    from workers.features.mfcc import MfccExtractor
    from workers.training.epochs import compute_raw_features, mfcc_frames, resampled_samples

    config = _config("data.max_train_utterances=6")
    train, _, _ = build_split(config, lambda _: None)
    speeds = (0.9, 1.0, 1.1)
    raw = compute_raw_features(train, config.features, speeds, None, log=lambda _: None)
    rate = config.features.sample_rate_hz
    for i, u in enumerate(train):
        n = load_audio(u.audio, rate).numel()
        for s in speeds:
            assert mfcc_frames(resampled_samples(n, rate, s), config.features) == raw[s][i].shape[0]
    extractor = MfccExtractor(config.features)
    for n in (1, 399, 400, 401, 16000, 123457):  # lengths no utterance has
        assert mfcc_frames(n, config.features) == extractor.raw_mfcc(torch.zeros(n)).shape[0]


def test_streamed_steps_form_the_plan_batches_in_order_within_the_window():
    """``StreamedSteps`` (Ray-free) turns a stream of row batches in plan order into the plan's steps,
    holding one row batch and one training batch; an out-of-order stream is an error."""
    from workers.features.mfcc import FeatureConfig, MfccExtractor
    from workers.training.epochs import PlannedBatch, StreamedSteps

    features = FeatureConfig()
    extractor = MfccExtractor(features)
    texts = ["A", "BB", "CCC", "DD", "E"]
    keep = [0, 1, 2, 4]
    plan = [PlannedBatch((0, 1), 4, 2), PlannedBatch((3,), None, 0), PlannedBatch((2, 0), 6, 3)]
    order = StreamedSteps.plan_utterances(plan, keep)
    assert order == [0, 1, 4, 2, 0]
    raw = {i: torch.randn(30 + i, features.n_mfcc) for i in range(5)}
    rows = [{"index": list(range(n, min(n + 2, 5))), "mfcc": [raw[order[j]].numpy() for j in range(n, min(n + 2, 5))]}
            for n in range(0, 5, 2)]
    streamed = StreamedSteps(plan, keep, texts, extractor, rows, prefetched_rows=2)
    steps = list(streamed)
    assert len(streamed) == 3 and [(c, rc) for _, c, rc, _ in steps] == [(4, 2), (None, 0), (6, 3)]
    assert [[e.index for e in ex] for ex, _, _, _ in steps] == [[0, 1], [4], [2, 0]]
    assert torch.equal(steps[2][0][0].features, extractor.features_from_raw(raw[2]))
    assert streamed.max_held == 4  # row batch [0, 1] + the 2 rows the stream may have fetched ahead
    long_plan = plan * 4
    rows = [{"index": list(range(n, n + 2)), "mfcc": [raw[0].numpy()] * 2} for n in range(0, 20, 2)]
    streamed = StreamedSteps(long_plan, [0] * 5, texts, extractor, rows, prefetched_rows=2)
    assert len(list(streamed)) == 12 and streamed.max_held <= 2 + 1 + 2  # bounded however long the plan
    with pytest.raises(RuntimeError, match="out of order"):
        list(StreamedSteps(plan, keep, texts, extractor, [{"index": [1], "mfcc": [raw[0].numpy()]}]))
