"""Data-parallel training over Ray Train workers (TorchTrainer, DDP; gloo on CPU, NCCL on GPU): the Ray wiring only.

Everything a training epoch does (epoch plans with chunk draws, speed perturbation, SpecAugment,
AdamW with weight decay, the LR schedule, dev WER, best-epoch export, averaging, checkpoint
state) is ``workers.training.trainer.TrainLoop``, the same code the single-process ``Trainer`` runs. Here:

- the data, by ``train.data_feed``:

  - ``ray_data`` (the default): the driver makes one Ray Data pass over the unperturbed training
    audio (``pipeline/training/data.py``: read -> resample -> MFCC in ``map_batches`` tasks) that
    sums the global CMVN statistics and keeps each utterance's sample count; the frame counts at
    every speed factor follow from it (``resampled_samples``, ``mfcc_frames``), so every worker
    draws the same epoch plans without seeing any features. Per epoch each worker takes its shard
    of the plan and streams the raw MFCC of exactly those utterances, at the epoch's speed, in plan
    order, from its own Ray Data dataset (``feature_dataset(..., ordered=True)``, tasks of half a
    CPU on the cluster's CPUs: with fewer than workers + 1 CPUs the workers reserve less than one
    each so that the feature tasks can run). ``StreamedSteps`` forms the planned batches from the
    stream, holding one Ray Data batch (``train.feed_batch_utterances``), one prefetched batch and
    one training batch: no process holds the corpus's features; the epoch record reports
    ``feed_max_utterances_held`` (the largest count on any worker) and ``feed_window``;
  - ``shared``: the driver computes the raw MFCC of every (utterance, speed factor) once (cached on
    disk like the single-process trainer's) and the global statistics, and puts them in the object
    store as numpy arrays: the workers read them zero-copy from shared memory (every worker can
    read all of it) and normalise the batches they train on only. Same features and statistics as
    the single-process ``Trainer`` (tests/test_distributed_training.py compares the weights);

- every worker runs every step of the epoch's plan on its share of the step's batch
  (``shard_plan``: every ``world``-th utterance, losses weighted so that DDP's mean gradient is the
  whole batch's): N workers take the single-process trainer's steps (same batch size, learning
  rate and schedule), each computing 1/N of every batch. ``train.max_batch_frames`` and
  ``train.max_batch_utterances`` are the global batch: raise them with the worker count to give
  each GPU more work (and scale the learning rate as for any larger batch);
- rank 0 evaluates on dev, exports the best bundle (with lexicon and LM) into its work dir and
  reports that dir as a Ray Train checkpoint every epoch (``state.pt``: model, optimiser,
  scheduler, progress; ``bundle/``; ``epochs/`` snapshots for averaging);
- a worker (re)started by Ray Train (``FailureConfig(max_failures)``) or a run continued with
  ``--resume`` (same run name and storage path: Ray Train V2 restores its checkpoint manager)
  starts from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from workers.data.corpus import Utterance
from workers.features.mfcc import FeatureConfig, MfccExtractor, Normalizer
from workers.model.bilstm import ModelConfig
from workers.training.trainer import TrainConfig

RUN_NAME = "asr_train"
MAX_FAILURES = 2


def _train_loop(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from workers.training.epochs import LazyExamples, StreamedSteps, epoch_speed, plan_epoch, shard_plan, trainable
    from workers.training.trainer import TrainLoop, new_model

    features = FeatureConfig(**loop_config["features"])
    cfg = TrainConfig(**loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)

    def log(line: str) -> None:
        print(line, flush=True)

    data = loop_config["data"]
    data = ray.get(data) if isinstance(data, ray.ObjectRef) else data
    normalizer = Normalizer(torch.tensor(data["mean"]), torch.tensor(data["std"]))
    extractor = MfccExtractor(features, normalizer)
    dev_data = ray.get(loop_config["dev"]) if rank == 0 else None  # only rank 0 evaluates: only it fetches dev
    dev_set = LazyExamples(dev_data["dev"], dev_data["dev_texts"], extractor) if dev_data is not None else None
    dev = [dev_set[i] for i in range(len(dev_set))] if dev_set is not None else []
    max_steps = loop_config.get("max_steps_per_epoch")
    if data["feed"] == "shared":
        train_sets = {float(s): LazyExamples(raw, data["texts"], extractor) for s, raw in data["train"].items()}
        lengths_1 = train_sets[1.0].lengths

        def epoch_steps(epoch: int):
            examples = train_sets[epoch_speed(cfg, epoch)]
            plan = shard_plan(plan_epoch(examples.lengths, cfg, epoch), rank, world)[:max_steps]
            return (([examples[i] for i in b.indices], b.chunk_frames, b.right_context_frames, b.loss_weights) for b in plan), len(plan)
    else:
        from pipeline.training.data import augment_spec, feature_dataset

        utts, texts, k = data["utterances"], data["texts"], features.stack_frames
        trainable_sets = {float(s): trainable(frames, texts, k) for s, frames in data["frames"].items()}
        lengths_1 = trainable_sets[1.0][1]
        feed_batch = cfg.feed_batch_utterances

        def epoch_steps(epoch: int):
            """This worker's share of the epoch's plan, its utterances' features streamed in plan order through Ray Data."""
            speed = epoch_speed(cfg, epoch)
            keep, lengths = trainable_sets[speed]
            plan = shard_plan(plan_epoch(lengths, cfg, epoch), rank, world)[:max_steps]
            order = [utts[i] for i in StreamedSteps.plan_utterances(plan, keep)]
            augment = augment_spec(cfg, epoch, features.sample_rate_hz, data["rirs"]) if data["rirs"] is not None else None
            ds = feature_dataset(order, features, speed, batch_size=feed_batch, num_cpus=loop_config["feed_task_cpus"],
                                 ordered=True, augment=augment)
            rows = ds.iter_batches(batch_size=feed_batch, batch_format="numpy", prefetch_batches=1)
            streamed = StreamedSteps(plan, keep, texts, extractor, rows, prefetched_rows=feed_batch)
            return streamed, len(streamed)

    device = ray.train.torch.get_device()
    module = new_model(ModelConfig(**loop_config["model"]), cfg.seed)
    model = ray.train.torch.prepare_model(module)
    steps = len(plan_epoch(lengths_1, cfg, 0))  # every worker runs every step (on its share of the batch)
    loop = TrainLoop(model, cfg, features, normalizer, device, steps, rank, world, log)

    work = Path(tempfile.mkdtemp(prefix=f"asr_train_rank{rank}_"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            shutil.copytree(ckpt, work, dirs_exist_ok=True)
        loop.load_state_dict(torch.load(work / "state.pt", map_location=device, weights_only=True))
        loop.progress.resumes.append(loop.progress.epoch)
        if rank == 0:
            log(f"resumed from Ray Train checkpoint after epoch {loop.progress.epoch}")
    extras = None
    if rank == 0 and loop_config["lm_files"]:
        (work / "lm").mkdir(exist_ok=True)
        for name, text in loop_config["lm_files"].items():
            (work / "lm" / name).write_text(text)
        extras = lambda: {"lexicon_path": work / "lm" / "lexicon.txt", "lm_path": work / "lm" / "lm.arpa"}  # noqa: E731
    info = {**loop_config["bundle_info"], "ray_train_workers": world}
    pid_dir = loop_config.get("pid_dir")

    def report(record: dict) -> None:
        ckpt = None
        if rank == 0:
            torch.save(loop.state_dict(), work / "state.tmp")
            (work / "state.tmp").replace(work / "state.pt")
            ckpt = ray.train.Checkpoint.from_directory(work)
        ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))}, checkpoint=ckpt)

    while loop.progress.epoch < cfg.epochs:
        if pid_dir:
            partial = Path(pid_dir, f"rank{rank}.json.tmp")  # written whole, then renamed: a reader never sees half
            partial.write_text(json.dumps({"pid": os.getpid(), "epoch": loop.progress.epoch}))
            partial.replace(partial.with_suffix(""))
        t0 = time.time()
        loop.seed_epoch()
        feed, total = epoch_steps(loop.progress.epoch)
        steps = _held_after_first_step(feed, Path(pid_dir, "hold")) if pid_dir and loop.progress.epoch >= 1 else feed
        stats = loop.train_steps(steps, total)
        extra = {}
        if isinstance(feed, StreamedSteps):  # the most utterances' features any worker held at once
            held = torch.tensor([feed.max_held], dtype=torch.float64, device=device)
            augmented = torch.tensor([feed.augmented], dtype=torch.float64, device=device)
            if world > 1:
                torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
                torch.distributed.all_reduce(augmented)
            extra = {"feed_max_utterances_held": int(held.item()), "feed_window": 2 * feed_batch + cfg.max_batch_utterances,
                     "augmented_utterances": int(augmented.item())}
        record = loop.end_epoch(stats, t0, dev, work / "bundle", work / "epochs", extras, info, extra)
        report(record)
    if loop.averaging_pending():
        loop.try_averaged(dev, work / "epochs", work / "bundle", extras, info)
        report(loop.progress.averaged or {"epoch": loop.progress.epoch})


def _held_after_first_step(feed: Iterable, hold: Path, max_hold_s: float = 120.0) -> Iterator:
    """A test hook (``pid_dir``): ``feed``'s steps, pausing after the first while the file ``hold``
    exists, so that a test can kill a worker mid-epoch at a known point."""
    for k, step in enumerate(feed):
        yield step
        held_until = time.time() + max_hold_s
        while k == 0 and hold.exists() and time.time() < held_until:
            time.sleep(0.05)


def _shared_data(train: list[Utterance], dev: list[Utterance], features: FeatureConfig, cfg: TrainConfig,
                 cache_dir: Path | None, log) -> dict[str, Any]:
    """Raw MFCC of the training set (every speed factor) and dev, and the global statistics, as numpy arrays."""
    from workers.training.epochs import compute_raw_features

    raw_train = compute_raw_features(train, features, cfg.speed_factors, cache_dir, log)
    raw_dev = compute_raw_features(dev, features, (1.0,), cache_dir, log)[1.0] if dev else []
    normalizer = Normalizer.from_frames(raw_train[1.0])
    return {
        "feed": "shared",
        "train": {s: [r.numpy() for r in raw] for s, raw in raw_train.items()},
        "texts": [u.text for u in train],
        "dev": [r.numpy() for r in raw_dev],
        "dev_texts": [u.text for u in dev],
        "mean": normalizer.mean.numpy(),
        "std": normalizer.std.numpy(),
    }


def _ray_data_feed(train: list[Utterance], dev: list[Utterance], features: FeatureConfig, cfg: TrainConfig,
                   cache_dir: Path | None, log) -> dict[str, Any]:
    """The ``ray_data`` feed's data: one Ray Data pass over the unperturbed training audio for the global
    statistics and each utterance's length (the frame counts at every speed follow from it, so every
    worker draws the same epoch plans), the utterance list, and dev's raw MFCC (rank 0 evaluates on it)."""
    from pipeline.training.data import feature_dataset, room_pool, training_stats
    from workers.training.epochs import compute_raw_features, mfcc_frames, resampled_samples

    t0 = time.time()
    normalizer, samples = training_stats(feature_dataset(train, features, 1.0, batch_size=cfg.feed_batch_utterances))
    rate = features.sample_rate_hz
    frames = {s: [mfcc_frames(resampled_samples(samples[i], rate, s), features) for i in range(len(train))]
              for s in cfg.speed_factors}
    frames.setdefault(1.0, [mfcc_frames(samples[i], features) for i in range(len(train))])
    log(f"ray data: global CMVN and lengths of {len(train)} training utterances in one pass ({time.time() - t0:.1f} s)")
    raw_dev = compute_raw_features(dev, features, (1.0,), cache_dir, log)[1.0] if dev else []
    rirs = None
    if cfg.augment_prob > 0:  # simulated once here, not in every feature task
        t0 = time.time()
        rirs = room_pool(cfg, rate)
        log(f"waveform augmentation on {cfg.augment_prob:.0%} of the utterances per epoch: {len(rirs)} simulated rooms "
            f"({time.time() - t0:.1f} s)")
    return {
        "feed": "ray_data",
        "rirs": rirs,
        "utterances": list(train),
        "texts": [u.text for u in train],
        "frames": frames,
        "dev": [r.numpy() for r in raw_dev],
        "dev_texts": [u.text for u in dev],
        "mean": normalizer.mean.numpy(),
        "std": normalizer.std.numpy(),
    }


def keep_idle_workers(num_workers: int, cpus: int | None = None) -> dict[str, int]:
    """Ray system config for a local Ray that trains: keep idle worker processes for 10 minutes.

    Ray keeps at most ``num_workers_soft_limit`` (default: the node's CPU count) worker processes
    and kills idle ones beyond it after a second; on a small machine the Ray Train actors alone
    fill that, so every Ray Data feature task started a new process that imported torch,
    torchaudio and the augmentation libraries again (a new process every 4-9 s on 2 cores, about
    half the CPU; the epoch took 212 s where the in-process trainer takes ~40 s). A cluster
    started with ``ray start`` has its own setting (``--system-config``); with a few CPUs per
    training worker the default already keeps them."""
    cpus = cpus if cpus is not None else os.cpu_count() or 1
    return {"num_workers_soft_limit": cpus + num_workers + 4, "idle_worker_killing_time_threshold_ms": 600_000}


def _resources(num_workers: int, use_gpu: bool, feed: str, cluster_cpus: float) -> tuple[dict, float]:
    """(resources of a Ray Train worker, CPUs of a Ray Data feature task). With the ray_data feed the
    workers leave at least one CPU of the cluster to the feature tasks (each asks for half a CPU):
    otherwise trainers that wait for their features in an all-reduce would hold every CPU."""
    per_worker = 1.0
    if feed == "ray_data" and cluster_cpus < num_workers + 1:
        per_worker = max(0.01, (cluster_cpus - 1) / num_workers)
    resources = {"CPU": per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return resources, 0.5


def train_distributed(
    utterances: list[Utterance],
    features: FeatureConfig,
    model: ModelConfig,
    train: TrainConfig,
    num_workers: int,
    export_dir: str | Path,
    use_gpu: bool | None = None,
    storage_path: str | Path | None = None,
    *,
    dev: list[Utterance] | None = None,
    resume: bool = False,
    lm_files: dict[str, Path] | None = None,
    bundle_info: dict | None = None,
    max_steps_per_epoch: int | None = None,
    cache_dir: str | Path | None = None,
    pid_dir: str | Path | None = None,
    log=print,
) -> Path:
    """Train with ``num_workers`` Ray Train workers; copy the best bundle to ``export_dir``.

    Checkpoints go to ``storage_path/asr_train``; ``resume`` continues the run found there (without it,
    a previous run there is removed first). ``lm_files`` (``lexicon_path``, ``lm_path``) go into the
    bundle. The run's epoch records are logged as JSON lines and written to ``history.json`` next to
    ``storage_path``.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster.session import connect_ray

    # Ray Train reports progress through Ray's logs: keep them. A local Ray keeps the feed's idle
    # worker processes (see keep_idle_workers).
    connect_ray(verbose=True, _system_config=keep_idle_workers(num_workers))
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= num_workers
    storage = Path(storage_path or tempfile.mkdtemp(prefix="asr_ray_train_")).resolve()
    if not resume and (storage / RUN_NAME).exists():
        shutil.rmtree(storage / RUN_NAME)
    dev = dev or []
    if train.augment_prob > 0 and train.data_feed != "ray_data":
        raise ValueError(f"train.augment_prob={train.augment_prob:g} (waveform augmentation) needs train.data_feed=ray_data, "
                         f"got {train.data_feed!r}")
    cache = Path(cache_dir) if cache_dir else None
    feed = _ray_data_feed if train.data_feed == "ray_data" else _shared_data
    data = feed(utterances, dev, features, train, cache, log)
    resources, feed_task_cpus = _resources(num_workers, use_gpu, train.data_feed, ray.cluster_resources().get("CPU", 0))
    lm_texts = {}
    if lm_files:
        lm_texts = {"lexicon.txt": Path(lm_files["lexicon_path"]).read_text(), "lm.arpa": Path(lm_files["lm_path"]).read_text()}
    log(f"ray train: {num_workers} workers ({'GPU, nccl' if use_gpu else 'CPU, gloo'}; {resources}), {len(data['texts'])} train "
        f"utterances x {len(train.speed_factors)} speeds, feed {train.data_feed}, dev {len(data['dev_texts'])}, storage {storage / RUN_NAME}"
        + (" (resuming)" if resume else ""))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "features": asdict(features),
            "model": asdict(model),
            "train": asdict(train),
            "data": ray.put({k: v for k, v in data.items() if k not in ("dev", "dev_texts")}),
            "dev": ray.put({"dev": data["dev"], "dev_texts": data["dev_texts"]}),
            "lm_files": lm_texts,
            "bundle_info": bundle_info or {},
            "max_steps_per_epoch": max_steps_per_epoch,
            "pid_dir": str(pid_dir) if pid_dir else None,
            "feed_task_cpus": feed_task_cpus,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(storage), failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    del data
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    export_dir = Path(export_dir)
    with result.checkpoint.as_directory() as ckpt:
        if export_dir.exists():
            shutil.rmtree(export_dir)
        shutil.copytree(Path(ckpt) / "bundle", export_dir)
        progress = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=True)["progress"]
    for record in progress["history"]:
        log(json.dumps(record))
    if progress["averaged"]:
        log(json.dumps(progress["averaged"]))
    for epoch in progress["resumes"]:
        log(f"resumed from a checkpoint after epoch {epoch}")
    (storage.parent / "history.json").write_text(json.dumps(progress["history"], indent=1))
    return export_dir

