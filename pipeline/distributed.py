"""Data-parallel training over Ray Train workers (TorchTrainer, DDP; gloo on CPU, NCCL on GPU): the Ray wiring only.

Everything a training epoch does (epoch plans with chunk draws, speed perturbation, SpecAugment,
AdamW with weight decay, the LR schedule, dev WER, best-epoch export, averaging, checkpoint
state) is ``workers.training.TrainLoop``, the same code the single-process ``Trainer`` runs. Here:

- the driver computes the raw MFCC of every (utterance, speed factor) once (cached on disk like
  the single-process trainer's) and the global normalisation statistics, and puts them in the
  object store as numpy arrays: the workers read them zero-copy from shared memory and normalise
  the batches they train on only;
- each worker runs its shard of the epoch's plan (``shard_plan``: every worker the same number of
  steps, so the LR schedule spans ``steps_per_worker * epochs`` steps);
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from workers.corpus import Utterance
from workers.features import FeatureConfig, MfccExtractor, Normalizer
from workers.model import ModelConfig
from workers.training import TrainConfig

RUN_NAME = "asr_train"
MAX_FAILURES = 2


def _train_loop(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from workers.training import (
        LazyExamples,
        TrainLoop,
        epoch_speed,
        new_model,
        plan_epoch,
        shard_plan,
        steps_per_worker,
    )

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
    train_sets = {float(s): LazyExamples(raw, data["texts"], extractor) for s, raw in data["train"].items()}
    dev_set = LazyExamples(data["dev"], data["dev_texts"], extractor) if rank == 0 else None
    dev = [dev_set[i] for i in range(len(dev_set))] if dev_set is not None else []

    device = ray.train.torch.get_device()
    module = new_model(ModelConfig(**loop_config["model"]), cfg.seed)
    model = ray.train.torch.prepare_model(module)
    steps = steps_per_worker(len(plan_epoch(train_sets[1.0].lengths, cfg, 0)), world)
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
    max_steps = loop_config.get("max_steps_per_epoch")

    def report(record: dict) -> None:
        ckpt = None
        if rank == 0:
            torch.save(loop.state_dict(), work / "state.tmp")
            (work / "state.tmp").replace(work / "state.pt")
            ckpt = ray.train.Checkpoint.from_directory(work)
        ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))}, checkpoint=ckpt)

    while loop.progress.epoch < cfg.epochs:
        if pid_dir:
            Path(pid_dir, f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "epoch": loop.progress.epoch}))
        t0 = time.time()
        loop.seed_epoch()
        examples = train_sets[epoch_speed(cfg, loop.progress.epoch)]
        plan = shard_plan(plan_epoch(examples.lengths, cfg, loop.progress.epoch), rank, world)[:max_steps]
        stats = loop.train_steps((([examples[i] for i in b.indices], b.chunk_frames, b.right_context_frames) for b in plan),
                                 len(plan))
        record = loop.end_epoch(stats, t0, dev, work / "bundle", work / "epochs", extras, info)
        report(record)
    if loop.averaging_pending():
        loop.try_averaged(dev, work / "epochs", work / "bundle", extras, info)
        report(loop.progress.averaged or {"epoch": loop.progress.epoch})


def _shared_data(train: list[Utterance], dev: list[Utterance], features: FeatureConfig, cfg: TrainConfig,
                 cache_dir: Path | None, log) -> dict[str, Any]:
    """Raw MFCC of the training set (every speed factor) and dev, and the global statistics, as numpy arrays."""
    from workers.training import compute_raw_features

    raw_train = compute_raw_features(train, features, cfg.speed_factors, cache_dir, log)
    raw_dev = compute_raw_features(dev, features, (1.0,), cache_dir, log)[1.0] if dev else []
    normalizer = Normalizer.from_frames(raw_train[1.0])
    return {
        "train": {s: [r.numpy() for r in raw] for s, raw in raw_train.items()},
        "texts": [u.text for u in train],
        "dev": [r.numpy() for r in raw_dev],
        "dev_texts": [u.text for u in dev],
        "mean": normalizer.mean.numpy(),
        "std": normalizer.std.numpy(),
    }


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

    from pipeline.ray_session import connect_ray

    connect_ray(verbose=True)  # Ray Train reports progress through Ray's logs: keep them
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= num_workers
    storage = Path(storage_path or tempfile.mkdtemp(prefix="asr_ray_train_")).resolve()
    if not resume and (storage / RUN_NAME).exists():
        shutil.rmtree(storage / RUN_NAME)
    dev = dev or []
    data = _shared_data(utterances, dev, features, train, Path(cache_dir) if cache_dir else None, log)
    lm_texts = {}
    if lm_files:
        lm_texts = {"lexicon.txt": Path(lm_files["lexicon_path"]).read_text(), "lm.arpa": Path(lm_files["lm_path"]).read_text()}
    log(f"ray train: {num_workers} workers ({'GPU, nccl' if use_gpu else 'CPU, gloo'}), {len(data['texts'])} train utterances x "
        f"{len(train.speed_factors)} speeds, dev {len(data['dev_texts'])}, storage {storage / RUN_NAME}"
        + (" (resuming)" if resume else ""))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "features": asdict(features),
            "model": asdict(model),
            "train": asdict(train),
            "data": ray.put(data),
            "lm_files": lm_texts,
            "bundle_info": bundle_info or {},
            "max_steps_per_epoch": max_steps_per_epoch,
            "pid_dir": str(pid_dir) if pid_dir else None,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
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

