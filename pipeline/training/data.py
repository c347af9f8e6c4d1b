"""Training features through Ray Data (the ``ray_data`` feed of `asr train --workers N`, pipeline/training/distributed.py).

``feature_dataset``: utterances (audio path, text, position) as a Ray Data dataset whose ``map_batches``
(CPU tasks) reads, resamples, speed-perturbs and computes the un-normalised MFCC of each utterance.
``training_stats``: one pass over that dataset that sums frames, squared frames and the frame count
per batch (and keeps each utterance's sample count), aggregated in the driver into the ``Normalizer``
the bundle stores (the same statistics as ``Normalizer.from_frames`` on the in-memory features) and
the utterance lengths the epoch plans are drawn from. Nothing holds more than a batch of features.
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import asdict

import numpy as np
import torch

from workers.data.corpus import Utterance
from workers.features.mfcc import FeatureConfig, Normalizer


@functools.lru_cache(maxsize=4)
def _extractor(features_json: str):
    from workers.features.mfcc import MfccExtractor

    return MfccExtractor(FeatureConfig(**json.loads(features_json)))


def augment_spec(cfg, epoch: int, rate_hz: int, rirs: list | None = None) -> dict | None:
    """What ``raw_mfcc_batch`` needs to degrade a share of an epoch's utterances as the single-process
    trainer does (``train.augment_*``): None when ``cfg.augment_prob`` is 0. ``rirs``: the room pool,
    simulated once per run (``room_pool``) rather than in every task."""
    if cfg.augment_prob <= 0:
        return None
    return {"config": asdict(cfg.augment_config), "prob": cfg.augment_prob, "seed": cfg.seed, "epoch": epoch,
            "rirs": rirs if rirs is not None else room_pool(cfg, rate_hz)}


def room_pool(cfg, rate_hz: int) -> list[np.ndarray]:
    """The simulated rooms of a run: the pool the single-process trainer's ``Augmenter`` draws from the same seed."""
    from workers.data.augment import Augmenter

    return [r.numpy() for r in Augmenter(cfg.augment_config, rate_hz, [], seed=cfg.seed).rirs]


def utterance_seed(seed: int, epoch: int, audio: str) -> int:
    """The random draws of one utterance in one epoch: the same on any worker, in any order."""
    return seed * 1_000_003 + epoch * 7919 + zlib.crc32(str(audio).encode())


def _augmenter(spec: dict, rate_hz: int, pool: list[torch.Tensor]):
    from workers.data.augment import AugmentConfig, Augmenter

    config = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    return Augmenter(config, rate_hz, pool, seed=spec["seed"], rirs=[torch.tensor(r) for r in spec["rirs"]])  # a copy: Ray hands over read-only arrays


def raw_mfcc_batch(batch: dict, features_json: str, speed: float, augment: dict | None = None) -> dict:
    """map_batches function: {"audio", "text", "index"} -> the same plus "mfcc" (frames_10ms, n_mfcc) float32,
    "frames", "samples" (the unperturbed wave's length at the model rate) and "augmented".

    With ``augment`` (``augment_spec``) each utterance is degraded with probability ``prob`` by a random
    chain (``workers.data.augment.Augmenter``) after the speed perturbation, drawn from ``utterance_seed``;
    babble comes from the batch's other utterances."""
    import random

    import torchaudio

    from workers.audio.reader import load_audio

    extractor = _extractor(features_json)
    rate = extractor.config.sample_rate_hz
    waves, samples = [], []
    for path in batch["audio"]:
        wave = load_audio(str(path), rate)
        samples.append(wave.numel())
        if speed != 1.0:
            wave = torchaudio.functional.resample(wave, int(round(rate * speed)), rate)
        waves.append(wave)
    augmented = np.zeros(len(waves), dtype=bool)
    if augment is not None:
        augmenter = _augmenter(augment, rate, [])
        for i, path in enumerate(batch["audio"]):
            seed = utterance_seed(augment["seed"], augment["epoch"], path)
            if random.Random(seed).random() < augment["prob"]:
                augmenter.babble_pool = [w for j, w in enumerate(waves) if j != i] or [waves[i]]
                augmenter.reseed(seed + 1)
                waves[i] = augmenter(waves[i])
                augmented[i] = True
    mfcc = [extractor.raw_mfcc(w).numpy().astype(np.float32) for w in waves]
    return {"audio": batch["audio"], "text": batch["text"], "index": batch["index"], "mfcc": mfcc,
            "frames": np.array([m.shape[0] for m in mfcc], dtype=np.int64), "samples": np.array(samples, dtype=np.int64),
            "augmented": augmented}


def _frame_sums(batch: dict) -> dict:
    frames = [np.asarray(m, dtype=np.float64) for m in batch["mfcc"]]
    total = np.concatenate(frames) if frames else np.zeros((0, 1))
    return {"sum": [total.sum(0)], "sumsq": [(total**2).sum(0)], "count": np.array([total.shape[0]], dtype=np.int64),
            "index": [np.asarray(batch["index"], dtype=np.int64)], "samples": [np.asarray(batch["samples"], dtype=np.int64)]}


def feature_dataset(utts: list[Utterance], features: FeatureConfig, speed: float = 1.0, batch_size: int = 16,
                    num_cpus: float = 1.0, concurrency: int | None = None, ordered: bool = False,
                    augment: dict | None = None):
    """A Ray Data dataset of the utterances' raw MFCC at ``speed`` (lazy: computed as it is consumed).
    Row ``index`` is the utterance's position in ``utts``; ``ordered`` keeps the rows in that order;
    ``augment`` (``augment_spec``) degrades a share of them."""
    import ray.data

    rows = [{"audio": u.audio, "text": u.text, "index": i} for i, u in enumerate(utts)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    if ordered:
        ds.context.execution_options.preserve_order = True
    return ds.map_batches(raw_mfcc_batch, fn_kwargs={"features_json": json.dumps(asdict(features)), "speed": speed, "augment": augment},
                          batch_size=batch_size, num_cpus=num_cpus, concurrency=concurrency, batch_format="numpy")


def training_stats(dataset) -> tuple[Normalizer, dict[int, int]]:
    """(mean and unbiased std of all frames, sample count by row ``index``) of a ``feature_dataset``:
    per-batch sums aggregated in the driver."""
    total, sq, frames = None, None, 0
    samples: dict[int, int] = {}
    for row in dataset.map_batches(_frame_sums, batch_format="numpy").iter_rows():
        total = row["sum"] if total is None else total + row["sum"]
        sq = row["sumsq"] if sq is None else sq + row["sumsq"]
        frames += int(row["count"])
        for i, n in zip(row["index"], row["samples"]):
            samples[int(i)] = int(n)
    if not frames:
        raise ValueError("no frames to compute normalisation statistics from")
    mean = total / frames
    var = np.maximum((sq - frames * mean**2) / max(1, frames - 1), 0.0)
    normalizer = Normalizer(torch.tensor(mean, dtype=torch.float32), torch.tensor(np.sqrt(var), dtype=torch.float32).clamp_min(1e-5))
    return normalizer, samples


def global_cmvn(dataset) -> Normalizer:
    """Mean and (unbiased) std of all frames of a ``feature_dataset``."""
    return training_stats(dataset)[0]
