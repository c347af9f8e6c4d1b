"""Training data and epoch plans: examples (normalised features + target ids), their on-disk
feature cache, length buckets, and the plan of an epoch (batches and their chunk draws, the
same on every data-parallel worker), with the feeds that turn a plan into steps: all in memory
(``make_examples`` / ``LazyExamples``) or streamed from row batches (``StreamedSteps``).
The trainer that runs the steps is ``workers.training.trainer``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchaudio
from torch import nn

from workers.audio.reader import load_audio
from workers.data.corpus import Utterance
from workers.features.mfcc import FeatureConfig, MfccExtractor
from workers.model.tokens import encode

if TYPE_CHECKING:
    from workers.training.config import TrainConfig


@dataclass
class Example:
    """One cached training example: normalised stacked features (frames, dim) and target ids."""

    features: torch.Tensor
    targets: torch.Tensor
    text: str
    index: int = -1  # position in the training utterance list (for on-the-fly augmentation)



def _cache_key(utts: list[Utterance], features: FeatureConfig, speeds: tuple[float, ...]) -> str:
    h = hashlib.sha1(json.dumps([asdict(features), list(speeds), [u.audio for u in utts]]).encode())
    return h.hexdigest()[:16]


def compute_raw_features(
    utts: list[Utterance], features: FeatureConfig, speeds: tuple[float, ...], cache_dir: Path | None, log: Callable[[str], None] = print
) -> dict[float, list[torch.Tensor]]:
    """Un-normalised MFCC (frames_10ms, n_mfcc) per utterance per speed factor, cached on disk."""
    cache = cache_dir / f"mfcc_{_cache_key(utts, features, speeds)}.pt" if cache_dir else None
    if cache and cache.is_file():
        return torch.load(cache, weights_only=True)
    extractor = MfccExtractor(features)
    out: dict[float, list[torch.Tensor]] = {s: [] for s in speeds}
    t0 = time.time()
    for i, u in enumerate(utts):
        wave = load_audio(u.audio, features.sample_rate_hz)
        for s in speeds:
            w = wave if s == 1.0 else torchaudio.functional.resample(wave, int(round(features.sample_rate_hz * s)), features.sample_rate_hz)
            out[s].append(extractor.raw_mfcc(w))
        if (i + 1) % 500 == 0:
            log(f"features: {i + 1}/{len(utts)} utterances ({time.time() - t0:.0f} s)")
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # per process: runs sharing a cache folder never collide
        torch.save(out, tmp)
        tmp.replace(cache)
    return out


def make_examples(raw: list[torch.Tensor], utts: list[Utterance], extractor: MfccExtractor) -> list[Example]:
    examples = []
    for i, (feats, u) in enumerate(zip(raw, utts)):
        x = extractor.features_from_raw(feats)
        y = torch.tensor(encode(u.text), dtype=torch.long)
        if x.shape[0] >= max(1, y.numel()):  # CTC needs at least one frame per label
            examples.append(Example(x, y, u.text, i))
    return examples


def length_buckets(lengths: list[int], max_frames: int, max_utts: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_frames or len(current) >= max_utts:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> x (B, T, D), lengths (B,), targets (sum of target lengths,), target_lengths (B,)."""
    lengths = torch.tensor([e.features.shape[0] for e in examples])
    x = nn.utils.rnn.pad_sequence([e.features for e in examples], batch_first=True)
    targets = torch.cat([e.targets for e in examples])
    target_lengths = torch.tensor([e.targets.numel() for e in examples])
    return x, lengths, targets, target_lengths


# ---- the plan of an epoch: batches and their chunk draws, the same on every worker ----------
@dataclass(frozen=True)
class PlannedBatch:
    """One step: positions in the epoch's example list, and the chunking it runs with (None: whole utterance)."""

    indices: tuple[int, ...]
    chunk_frames: int | None
    right_context_frames: int
    #: Per-utterance weights of the CTC loss (each utterance's loss is first divided by its label
    #: count, as ``nn.CTCLoss(reduction="mean")`` does). None: the mean over ``indices``. A worker's
    #: share of a batch (``shard_plan``) carries ``world / batch size`` so that DDP's gradient mean
    #: over the workers equals the whole batch's mean; a repeat that fills an empty share carries 0.
    loss_weights: tuple[float, ...] | None = None


def epoch_speed(cfg: TrainConfig, epoch: int) -> float:
    """The speed factor of (0-based) ``epoch``: the first epoch runs unperturbed, then they rotate."""
    return cfg.speed_factors[epoch % len(cfg.speed_factors)] if epoch > 0 else 1.0


def draw_chunking(rng: random.Random, cfg: TrainConfig) -> tuple[int | None, int]:
    """(chunk_frames, right_context_frames) of one batch; (None, 0) runs it as whole utterances."""
    if rng.random() < cfg.full_utterance_prob:
        return None, 0
    return rng.randint(*cfg.chunk_frames_range), rng.randint(*cfg.right_context_frames_range)


def plan_epoch(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[PlannedBatch]:
    """All batches of ``epoch`` with their chunk draws, from ``cfg.seed`` and ``epoch`` only (so every
    data-parallel worker, and a resumed run, draws the same plan). The first epoch runs shortest-first,
    which leaves the all-blank stage sooner; later ones in a shuffled order."""
    batches = length_buckets(lengths, cfg.max_batch_frames, cfg.max_batch_utterances)
    rng = random.Random(cfg.seed * 100_003 + epoch)
    if epoch > 0:
        rng.shuffle(batches)
    return [PlannedBatch(tuple(b), *draw_chunking(rng, cfg)) for b in batches]


def shard_plan(plan: list[PlannedBatch], rank: int, world: int) -> list[PlannedBatch]:
    """Worker ``rank``'s share of every batch of an epoch plan (data parallelism that keeps the recipe).

    Every worker runs every step of the plan on every ``world``-th utterance of its batch (the
    batches are length-sorted, so the shares have similar lengths) with the batch's chunk draw, and
    weights its utterances' losses by ``world / batch size``: the gradient DDP averages over the
    workers is the whole batch's, so N workers take the single-process trainer's steps, with its
    batch size, learning rate and schedule. A batch with fewer utterances than workers gives the
    workers left without one a repeat of its first utterance at weight 0 (DDP needs every worker
    in every step's all-reduce)."""
    if world == 1:
        return list(plan)
    shards = []
    for b in plan:
        share = b.indices[rank::world]
        weights = (world / len(b.indices),) * len(share)
        if not share:
            share, weights = b.indices[:1], (0.0,)
        shards.append(PlannedBatch(share, b.chunk_frames, b.right_context_frames, weights))
    return shards


def resampled_samples(samples: int, rate_hz: int, speed: float) -> int:
    """Length of ``torchaudio.functional.resample(wave, round(rate_hz * speed), rate_hz)`` for a wave of
    ``samples`` (speed perturbation), computed as torchaudio does, without resampling."""
    if speed == 1.0:
        return samples
    orig = int(round(rate_hz * speed))
    gcd = math.gcd(orig, rate_hz)
    return int(torch.ceil(torch.as_tensor(rate_hz // gcd * samples / (orig // gcd))).item())


def mfcc_frames(samples: int, features: FeatureConfig) -> int:
    """Frames (10 ms) of ``MfccExtractor.raw_mfcc`` of a wave of ``samples`` (no centring; 0 if shorter than a window)."""
    if samples < features.window_samples:
        return 0
    return 1 + (samples - features.window_samples) // features.hop_samples


def trainable(frames: list[int], texts: list[str], stack_frames: int) -> tuple[list[int], list[int]]:
    """(kept utterance positions, their model-frame lengths): utterances with at least one model frame
    per label (CTC), as ``make_examples`` and ``LazyExamples`` keep them."""
    keep = [i for i, (f, t) in enumerate(zip(frames, texts)) if f // stack_frames >= max(1, len(encode(t)))]
    return keep, [frames[i] // stack_frames for i in keep]


class StreamedSteps:
    """The training steps of one worker's epoch plan from a stream of raw-MFCC row batches (dicts of
    equal-length columns "index" and "mfcc"), in plan order: row ``n`` of the stream is the ``n``-th
    utterance of the plan (``plan_utterances``). Only the current row batch and the current training
    batch are held; ``max_held`` records the most utterances whose features were held at once (the
    current row batch, the current training batch's examples, and up to ``prefetched_rows`` of the
    remaining rows that the stream may hold ahead: an upper bound)."""

    def __init__(self, plan: list[PlannedBatch], keep: list[int], texts: list[str], extractor: MfccExtractor,
                 row_batches: Iterable[dict], prefetched_rows: int = 0) -> None:
        self.plan, self.keep, self.texts, self.extractor = plan, keep, texts, extractor
        self.row_batches = row_batches
        self.prefetched_rows = prefetched_rows
        self.max_held = 0
        self.augmented = 0  # utterances whose rows say they were degraded (waveform augmentation)

    @staticmethod
    def plan_utterances(plan: list[PlannedBatch], keep: list[int]) -> list[int]:
        """Utterance positions (in the training list) of the plan's batches, in step order (repeats included)."""
        return [keep[j] for b in plan for j in b.indices]

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        batches = iter(self.row_batches)
        rows: dict = {"index": []}
        taken, n, received = 0, 0, 0
        total = sum(len(b.indices) for b in self.plan)
        for b in self.plan:
            examples = []
            for j in b.indices:
                if taken == len(rows["index"]):
                    rows, taken = next(batches), 0  # the previous row batch is dropped here
                    received += len(rows["index"])
                i = self.keep[j]
                if int(rows["index"][taken]) != n:
                    raise RuntimeError(f"feature stream out of order: row {int(rows['index'][taken])}, expected {n}")
                raw = torch.as_tensor(rows["mfcc"][taken]).float()
                self.augmented += bool(rows["augmented"][taken]) if "augmented" in rows else 0
                examples.append(Example(self.extractor.features_from_raw(raw), torch.tensor(encode(self.texts[i]), dtype=torch.long),
                                        self.texts[i], i))
                taken += 1
                n += 1
                ahead = min(self.prefetched_rows, total - received)  # what the stream may have fetched ahead
                earlier = len(examples) - min(taken, len(examples))  # this step's examples from earlier row batches
                self.max_held = max(self.max_held, len(rows["index"]) + earlier + ahead)
            yield examples, b.chunk_frames, b.right_context_frames, b.loss_weights


class LazyExamples:
    """Training examples normalised on access from raw MFCC (a list of (frames_10ms, n_mfcc) tensors or
    arrays, e.g. views of shared memory): same positions and lengths as ``make_examples`` on the same data,
    without holding a normalised copy of the corpus."""

    def __init__(self, raw: list, texts: list[str], extractor: MfccExtractor) -> None:
        self.raw, self.texts, self.extractor = raw, texts, extractor
        k = extractor.config.stack_frames
        self.keep = [i for i, (r, t) in enumerate(zip(raw, texts)) if r.shape[0] // k >= max(1, len(encode(t)))]
        self.lengths = [raw[i].shape[0] // k for i in self.keep]

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, j: int) -> Example:
        i = self.keep[j]
        raw = self.raw[i] if isinstance(self.raw[i], torch.Tensor) else torch.tensor(self.raw[i])  # a copy of read-only memory
        x = self.extractor.features_from_raw(raw.float())
        return Example(x, torch.tensor(encode(self.texts[i]), dtype=torch.long), self.texts[i], i)
