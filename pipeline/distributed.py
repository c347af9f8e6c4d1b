"""Data-parallel training over Ray Train workers (TorchTrainer, DDP; gloo on CPU, NCCL on GPU).

Every worker computes the same global normalisation statistics, trains on its shard of
length-bucketed batches, and rank 0 reports a checkpoint holding an exported bundle.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from workers.corpus import Utterance
from workers.features import FeatureConfig, MfccExtractor, Normalizer
from workers.model import BiLSTMCTC, ModelConfig
from workers.training import TrainConfig


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch import nn

    from workers.bundle import save_bundle
    from workers.tokens import BLANK_ID
    from workers.training import SpecAugment, collate, compute_raw_features, length_buckets, make_examples

    features = FeatureConfig(**loop_config["features"])
    train_cfg = TrainConfig(**loop_config["train"])
    utts = [Utterance(**u) for u in loop_config["utterances"]]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed + rank)
    raw = compute_raw_features(utts, features, (1.0,), None, log=lambda _: None)[1.0]
    normalizer = Normalizer.from_frames(raw)
    examples = make_examples(raw, utts, MfccExtractor(features, normalizer))
    module = BiLSTMCTC(ModelConfig(**loop_config["model"]))
    model = ray.train.torch.prepare_model(module)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate)
    ctc = nn.CTCLoss(blank=BLANK_ID, zero_infinity=True)
    augment = SpecAugment(features.stack_frames, train_cfg.freq_mask_param, train_cfg.time_mask_param, train_cfg.num_time_masks)
    batches = length_buckets([e.features.shape[0] for e in examples], train_cfg.max_batch_frames, train_cfg.max_batch_utterances)
    # Every rank must run the same number of steps (DDP all-reduces each one).
    steps = max(1, math.ceil(len(batches) / world))
    for epoch in range(train_cfg.epochs):
        rng = random.Random(train_cfg.seed + epoch)
        order = batches[:]
        rng.shuffle(order)
        shard = [order[(rank + world * i) % len(order)] for i in range(steps)]
        total = 0.0
        for idx in shard:
            x, lengths, targets, target_lengths = collate([examples[i] for i in idx])
            log_probs = model(augment(x.to(device)), lengths)
            loss = ctc(log_probs.transpose(0, 1), targets.to(device), lengths, target_lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            total += loss.item()
        metrics = {"epoch": epoch + 1, "loss": total / steps}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_bundle(Path(tmp) / "bundle", module, features, normalizer, info={"ray_train_workers": world, **metrics})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_distributed(
    utterances: list[Utterance],
    features: FeatureConfig,
    model: ModelConfig,
    train: TrainConfig,
    num_workers: int,
    export_dir: str | Path,
    use_gpu: bool | None = None,
    storage_path: str | Path | None = None,
) -> Path:
    """Train with ``num_workers`` Ray Train workers; copy the final bundle to ``export_dir``."""
    import shutil

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_session import connect_ray

    connect_ray(verbose=True)  # Ray Train reports progress through Ray's logs: keep them
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= num_workers
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "features": asdict(features),
            "model": asdict(model),
            "train": asdict(train),
            "utterances": [asdict(u) for u in utterances],
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(Path(storage_path or tempfile.mkdtemp(prefix="asr_ray_train_")).resolve())),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    export_dir = Path(export_dir)
    with result.checkpoint.as_directory() as ckpt:
        if export_dir.exists():
            shutil.rmtree(export_dir)
        shutil.copytree(Path(ckpt) / "bundle", export_dir)
    return export_dir
