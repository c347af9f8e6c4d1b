"""Training features through Ray Data (for `asr train --workers N`; not yet wired into the Ray Train loop).

``feature_dataset``: the training utterances (audio path, text, position) as a Ray Data dataset whose
``map_batches`` (CPU workers) reads, resamples, speed-perturbs and computes the un-normalised MFCC of
each utterance. ``global_cmvn``: one pass over that dataset that sums frames, squared frames and the
frame count per batch, aggregated in the driver into the ``Normalizer`` the bundle stores (the same
statistics as ``Normalizer.from_frames`` on the in-memory features).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from workers.corpus import Utterance
from workers.features import FeatureConfig, Normalizer


class RawMfcc:
    """map_batches callable: {"audio", "text", "index"} -> the same plus "mfcc" (frames_10ms, n_mfcc) float32 and "frames"."""

    def __init__(self, features: dict, speed: float) -> None:
        from workers.features import MfccExtractor

        self.config = FeatureConfig(**features)
        self.speed = speed
        self.extractor = MfccExtractor(self.config)

    def __call__(self, batch: dict) -> dict:
        import torchaudio

        from workers.audio import load_audio

        rate = self.config.sample_rate_hz
        mfcc = []
        for path in batch["audio"]:
            wave = load_audio(str(path), rate)
            if self.speed != 1.0:
                wave = torchaudio.functional.resample(wave, int(round(rate * self.speed)), rate)
            mfcc.append(self.extractor.raw_mfcc(wave).numpy().astype(np.float32))
        return {"audio": batch["audio"], "text": batch["text"], "index": batch["index"], "mfcc": mfcc,
                "frames": np.array([m.shape[0] for m in mfcc], dtype=np.int64)}


def _frame_sums(batch: dict) -> dict:
    frames = [np.asarray(m, dtype=np.float64) for m in batch["mfcc"]]
    total = np.concatenate(frames) if frames else np.zeros((0, 1))
    return {"sum": [total.sum(0)], "sumsq": [(total**2).sum(0)], "count": np.array([total.shape[0]], dtype=np.int64)}


def feature_dataset(utts: list[Utterance], features: FeatureConfig, speed: float = 1.0, batch_size: int = 16):
    """A Ray Data dataset of the utterances' raw MFCC at ``speed`` (lazy: computed as it is consumed)."""
    import ray.data

    rows = [{"audio": u.audio, "text": u.text, "index": i} for i, u in enumerate(utts)]
    return ray.data.from_items(rows).map_batches(RawMfcc, fn_constructor_args=(asdict(features), speed), batch_size=batch_size,
                                                 concurrency=1, batch_format="numpy")


def global_cmvn(dataset) -> Normalizer:
    """Mean and (unbiased) std of all frames of a ``feature_dataset``: per-batch sums aggregated in the driver."""
    total, sq, count = None, None, 0
    for row in dataset.map_batches(_frame_sums, batch_format="numpy").iter_rows():
        total = row["sum"] if total is None else total + row["sum"]
        sq = row["sumsq"] if sq is None else sq + row["sumsq"]
        count += int(row["count"])
    if not count:
        raise ValueError("no frames to compute normalisation statistics from")
    mean = total / count
    var = np.maximum((sq - count * mean**2) / max(1, count - 1), 0.0)
    return Normalizer(torch.tensor(mean, dtype=torch.float32), torch.tensor(np.sqrt(var), dtype=torch.float32).clamp_min(1e-5))
