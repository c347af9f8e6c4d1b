"""Training of the BiLSTM-CTC model on CPU or GPU, resumable, with chunk-aware passes.

Features are computed once per (utterance, speed factor) and cached on disk; batches
are bucketed by length; each batch is run either full-utterance or as latency-controlled
chunks with a randomly drawn chunk size and lookahead, so that the exported model
streams at any latency without a large loss against offline decoding.

``TrainLoop`` runs an epoch's steps (the single-process ``Trainer`` and every Ray Train worker
of ``pipeline.training.distributed``); the examples, the feature cache and the epoch plans it runs are
in ``workers.training.epochs``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchaudio
from torch import nn

from workers.audio.reader import load_audio
from workers.data.augment import Augmenter
from workers.data.corpus import Utterance
from workers.features.mfcc import FeatureConfig, MfccExtractor, Normalizer
from workers.model.bilstm import BiLSTMCTC, ModelConfig
from workers.model.bundle import save_bundle
from workers.model.tokens import BLANK_ID, decode_ids
from workers.training.config import TrainConfig  # noqa: F401  (re-exported)
from workers.training.epochs import (
    Example,
    PlannedBatch,
    collate,
    compute_raw_features,
    epoch_speed,
    length_buckets,
    make_examples,
    plan_epoch,
)


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0
    best_wer: float = math.inf
    history: list[dict] = field(default_factory=list)
    averaged: dict | None = None  # dev WER of the averaged weights, once computed
    resumes: list[int] = field(default_factory=list)  # the epochs after which the run was resumed from a checkpoint


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the floating-point tensors of several saved state dicts."""
    if not paths:
        raise ValueError("no state dicts to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, value in state.items():
            if name not in total:
                total[name] = value.clone().double() if value.is_floating_point() else value.clone()
            elif value.is_floating_point():
                total[name] += value.double()
    return {n: (v / len(paths)).float() if v.is_floating_point() else v for n, v in total.items()}


class SpecAugment(nn.Module):
    """Frequency masks on the MFCC axis (shared by the stacked sub-frames) and time masks, via torchaudio."""

    def __init__(self, stack_frames: int, freq_mask_param: int, time_mask_param: int, num_time_masks: int) -> None:
        super().__init__()
        self.stack = stack_frames
        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask_param, iid_masks=True)
        self.time = torchaudio.transforms.TimeMasking(time_mask_param * stack_frames, iid_masks=True)
        self.num_time_masks = num_time_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, stack * n_mfcc) -> same shape, masked. Time masks count 10 ms frames."""
        b, t, d = x.shape
        n_mfcc = d // self.stack
        # (B, 1, n_mfcc, T * stack): the time axis in 10 ms frames, so a frequency mask covers all sub-frames.
        spec = x.reshape(b, t, self.stack, n_mfcc).permute(0, 3, 1, 2).reshape(b, 1, n_mfcc, t * self.stack)
        spec = self.freq(spec)
        for _ in range(self.num_time_masks):
            spec = self.time(spec)
        return spec.reshape(b, n_mfcc, t, self.stack).permute(0, 2, 3, 1).reshape(b, t, d)


def greedy_texts(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """(B, T, V) log-probs -> greedy CTC transcripts."""
    best = log_probs.argmax(-1)
    texts = []
    for b in range(best.shape[0]):
        ids = torch.unique_consecutive(best[b, : lengths[b]]).tolist()
        texts.append(decode_ids([i for i in ids if i != BLANK_ID]))
    return texts


def evaluate_greedy(model: BiLSTMCTC, examples: list[Example], device: torch.device, chunk: int | None, rc: int) -> float:
    """Greedy WER (fraction) of ``examples`` in offline (chunk=None) or chunked mode."""
    import jiwer

    model.eval()
    hyps, refs = [], []
    with torch.no_grad():
        for idx in length_buckets([e.features.shape[0] for e in examples], 4000, 32):
            batch = [examples[i] for i in idx]
            x, lengths, _, _ = collate(batch)
            hyps += greedy_texts(model(x.to(device), lengths, chunk, rc).cpu(), lengths)
            refs += [e.text for e in batch]
    model.train()
    return jiwer.wer(refs, hyps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def new_model(model_config: ModelConfig, seed: int) -> BiLSTMCTC:
    """Freshly initialised weights, the same for a given seed in every process."""
    torch.manual_seed(seed)
    return BiLSTMCTC(model_config)


@dataclass
class EpochStats:
    loss: float
    steps: int
    chunked_batches: int
    whole_batches: int


#: One step's input: the batch's examples, chunk frames (None: whole utterances), lookahead frames,
#: and the utterances' loss weights (None: the batch mean; ``PlannedBatch.loss_weights``).
StepInput = tuple[list[Example], int | None, int, tuple[float, ...] | None]


class TrainLoop:
    """Optimiser, LR schedule and progress of one run, and what every epoch does with them: the
    training steps, dev evaluation, best-epoch export, snapshots, averaging, checkpoint state.

    Ray-free: the single-process ``Trainer`` and the Ray Train loop (pipeline/training/distributed.py) both run
    their epochs through it. ``model`` may be wrapped (DDP): ``module`` is the bare model used for
    evaluation, export and state. ``rank``/``world`` describe data parallelism: only rank 0
    evaluates, exports and writes files; ``steps_per_epoch`` is this worker's number of steps per
    epoch (the LR schedule spans ``steps_per_epoch * epochs`` steps). With ``world`` > 1 every worker
    runs every step of the plan on its share of the batch (``workers.training.epochs.shard_plan``).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, features: FeatureConfig, normalizer: Normalizer,
                 device: torch.device, steps_per_epoch: int, rank: int = 0, world: int = 1,
                 log: Callable[[str], None] = print) -> None:
        self.model = model
        self.cfg = cfg
        self.features = features
        self.normalizer = normalizer
        self.device = device
        self.rank, self.world = rank, world
        self.log = log
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ctc = nn.CTCLoss(blank=BLANK_ID, zero_infinity=True, reduction="none")
        self.augment = SpecAugment(features.stack_frames, cfg.freq_mask_param, cfg.time_mask_param, cfg.num_time_masks)
        self.progress = Progress()

    @property
    def module(self) -> BiLSTMCTC:
        return getattr(self.model, "module", self.model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup_steps:
            return (step + 1) / self.cfg.warmup_steps
        frac = (step - self.cfg.warmup_steps) / max(1, self.total_steps - self.cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def seed_epoch(self) -> None:
        """Seed SpecAugment, dropout and augmentation draws from (seed, epoch, rank): a resumed or
        restarted run draws what the uninterrupted one did."""
        seed = self.cfg.seed + 7919 * (self.progress.epoch + 1) + 104_729 * self.rank
        torch.manual_seed(seed)
        random.seed(seed)

    # ---- training steps ---------------------------------------------------------------
    def train_step(self, examples: list[Example], chunk: int | None, rc: int,
                   loss_weights: tuple[float, ...] | None = None) -> float:
        """One optimiser step on ``examples``. The loss is the sum of each utterance's CTC loss per label
        times its weight (None: 1 / batch size, ``nn.CTCLoss``'s "mean"); returns it."""
        x, lengths, targets, target_lengths = collate(examples)
        x = self.augment(x.to(self.device))
        use_bf16 = self.cfg.bf16 and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            log_probs = self.model(x, lengths, chunk, rc)
        per_label = self.ctc(log_probs.float().transpose(0, 1), targets.to(self.device), lengths, target_lengths)
        per_label = per_label / target_lengths.to(self.device).clamp(min=1)
        weights = (torch.tensor(loss_weights, dtype=per_label.dtype, device=self.device) if loss_weights is not None
                   else torch.full_like(per_label, 1.0 / len(examples)))
        loss = (per_label * weights).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        return loss.item()

    def train_steps(self, steps: Iterable[StepInput], total: int | None = None, show_progress: bool = False) -> EpochStats:
        """Run the steps of one epoch (this worker's share of each); the mean loss and the step counts of
        the epoch (with several workers: each step's loss summed over its shares, then averaged)."""
        from tqdm import tqdm

        self.model.train()
        loss_sum, count, chunked = 0.0, 0, 0
        bar = tqdm(steps, total=total, desc=f"epoch {self.progress.epoch + 1}/{self.cfg.epochs}",
                   disable=not show_progress, mininterval=5)
        for examples, chunk, rc, weights in bar:
            loss_sum += self.train_step(examples, chunk, rc, weights)
            count += 1
            chunked += chunk is not None
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = torch.tensor([loss_sum, count, chunked], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(sums)
            # every worker ran every step: the step counts are one worker's, the shares' losses add up
            loss_sum, count, chunked = sums[0].item() / self.world, int(sums[1].item()) // self.world, int(sums[2].item()) // self.world
        return EpochStats(loss_sum / max(count, 1), count, chunked, count - chunked)

    # ---- evaluation, export, snapshots ------------------------------------------------
    def evaluate(self, dev: list[Example]) -> tuple[float, float]:
        """Greedy dev WER offline and at the streaming setting (nan without dev data)."""
        if not dev:
            return math.nan, math.nan
        cfg = self.cfg
        return (evaluate_greedy(self.module, dev, self.device, None, 0),
                evaluate_greedy(self.module, dev, self.device, cfg.eval_chunk_frames, cfg.eval_right_context_frames))

    def export(self, export_dir: Path, info: dict, export_extras: Callable[[], dict] | None) -> None:
        extras = export_extras() if export_extras else {}
        precision = "bf16" if self.cfg.bf16 and self.device.type == "cuda" else "fp32"
        info = {**info, "train_device": str(self.device), "train_precision": precision}
        save_bundle(export_dir, self.module, self.features, self.normalizer, info=info, **extras)

    def end_epoch(self, stats: EpochStats, t0: float, dev: list[Example], export_dir: Path,
                  snapshot_dir: Path | None = None, export_extras: Callable[[], dict] | None = None,
                  bundle_info: dict | None = None, extra: dict | None = None) -> dict:
        """Count the epoch done; on rank 0 evaluate on dev, log the record (with ``extra``) as a JSON line,
        export the model if its streaming dev WER (or, without dev data, its loss) is the best so far, and
        keep a weights snapshot for averaging."""
        wer, wer_stream = self.evaluate(dev) if self.is_main else (math.nan, math.nan)
        self.progress.epoch += 1
        record = {"epoch": self.progress.epoch, "loss": round(stats.loss, 4)}
        if not math.isnan(wer_stream):  # without dev data no record speaks of WER
            record.update(dev_wer_greedy=round(wer, 4), dev_wer_greedy_streaming=round(wer_stream, 4))
        record.update(epoch_s=round(time.time() - t0, 1), steps=stats.steps, chunked_batches=stats.chunked_batches,
                      whole_batches=stats.whole_batches)
        if self.world > 1:
            record["workers"] = self.world
        record.update(extra or {})
        self.progress.history.append(record)
        if not self.is_main:
            return record
        self.log(json.dumps(record))
        score = wer_stream if not math.isnan(wer_stream) else stats.loss
        if score < self.progress.best_wer or not (export_dir / "config.json").exists():
            self.progress.best_wer = min(score, self.progress.best_wer)
            self.export(export_dir, {**(bundle_info or {}), **record}, export_extras)
        if snapshot_dir is not None:
            self.save_snapshot(snapshot_dir)
        return record

    def save_snapshot(self, snapshot_dir: Path) -> None:
        keep = self.cfg.average_last_epochs
        if keep < 2 or not self.is_main:
            return
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        path = snapshot_dir / f"epoch_{self.progress.epoch:03d}.pt"
        torch.save(self.module.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        for old in sorted(snapshot_dir.glob("epoch_*.pt"))[:-keep]:
            old.unlink()

    def averaging_pending(self) -> bool:
        done = self.progress.averaged and self.progress.averaged.get("after_epoch") == self.progress.epoch
        return self.cfg.average_last_epochs > 1 and not done

    def try_averaged(self, dev: list[Example], snapshot_dir: Path, export_dir: Path,
                     export_extras: Callable[[], dict] | None = None, bundle_info: dict | None = None) -> None:
        """Average the last epochs' weights; export them if their streaming dev WER beats the best epoch's.
        The model keeps the last epoch's weights (for --resume with more epochs)."""
        paths = sorted(snapshot_dir.glob("epoch_*.pt"))[-self.cfg.average_last_epochs :]
        if len(paths) < 2 or not dev or not self.is_main:
            return
        trained = {n: v.clone() for n, v in self.module.state_dict().items()}
        self.module.load_state_dict(average_state_dicts(paths))
        epochs = [int(p.stem.split("_")[1]) for p in paths]
        wer, wer_stream = self.evaluate(dev)
        record = {"after_epoch": self.progress.epoch, "averaged_epochs": [epochs[0], epochs[-1]],
                  "dev_wer_greedy": round(wer, 4), "dev_wer_greedy_streaming": round(wer_stream, 4)}
        record["exported"] = record["dev_wer_greedy_streaming"] < self.progress.best_wer
        self.log(json.dumps(record))
        if record["exported"]:
            self.progress.best_wer = record["dev_wer_greedy_streaming"]
            self.export(export_dir, {**(bundle_info or {}), **record, "epoch": self.progress.epoch}, export_extras)
        self.module.load_state_dict(trained)
        self.progress.averaged = record

    # ---- checkpoint state -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(self.progress),
            "rng": {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())},
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        torch.set_rng_state(state["rng"]["torch"])
        py = json.loads(state["rng"]["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))


class Trainer(TrainLoop):
    """Single-process training of one run directory: the data (features cached in memory and on disk,
    speed perturbation, waveform augmentation), checkpoints in ``last.pt``, the epochs of ``TrainLoop``."""

    def __init__(
        self,
        run_dir: str | Path,
        train_utts: list[Utterance],
        dev_utts: list[Utterance],
        features: FeatureConfig,
        model_config: ModelConfig,
        train: TrainConfig,
        log: Callable[[str], None] = print,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if train.num_threads > 0:
            torch.set_num_threads(train.num_threads)
        device = resolve_device(train.device)
        random.seed(train.seed)
        torch.manual_seed(train.seed)
        cache_dir = self.run_dir.parent / "feature_cache"
        raw_train = compute_raw_features(train_utts, features, train.speed_factors, cache_dir, log)
        raw_dev = compute_raw_features(dev_utts, features, (1.0,), cache_dir, log)[1.0]
        # Global statistics from the training speakers' unperturbed audio only.
        normalizer = Normalizer.from_frames(raw_train[1.0])
        extractor = MfccExtractor(features, normalizer)
        self.train_sets = {s: make_examples(raw_train[s], train_utts, extractor) for s in train.speed_factors}
        self.dev = make_examples(raw_dev, dev_utts, extractor)
        self.train_texts = [u.text for u in train_utts]
        self.extractor = extractor
        self.waves: list[torch.Tensor] = []
        self.augmenter: Augmenter | None = None
        if train.augment_prob > 0:
            # Waveforms stay in memory (float32, ~230 MB per hour) and are degraded afresh each epoch.
            self.waves = [load_audio(u.audio, features.sample_rate_hz) for u in train_utts]
            self.augmenter = Augmenter(train.augment_config, features.sample_rate_hz, self.waves, seed=train.seed)
        model = new_model(model_config, train.seed).to(device)
        steps_per_epoch = len(length_buckets([e.features.shape[0] for e in self.train_sets[1.0]], train.max_batch_frames,
                                             train.max_batch_utterances))
        super().__init__(model, train, features, normalizer, device, steps_per_epoch, log=log)
        if train.init_from:
            self._init_from(train.init_from, model_config)
        log(
            f"train: {len(self.train_sets[1.0])} utterances x {len(train.speed_factors)} speeds, dev: {len(self.dev)}, "
            f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters, device {self.device}, "
            f"{torch.get_num_threads()} threads, {steps_per_epoch} steps/epoch"
        )

    def _init_from(self, bundle_dir: str, model_config: ModelConfig) -> None:
        from workers.model.bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        if bundle.model_config != model_config:
            raise ValueError(f"train.init_from: {bundle_dir} has model config {bundle.model_config}, this run {model_config}")
        self.model.load_state_dict(bundle.model.state_dict())
        self.log(f"weights initialised from {bundle_dir}")

    def augmented(self, example: Example, speed: float) -> Example:
        """The example recomputed from its waveform at ``speed`` through a random degradation chain."""
        assert self.augmenter is not None
        rate = self.features.sample_rate_hz
        wave = self.waves[example.index]
        if speed != 1.0:
            wave = torchaudio.functional.resample(wave, int(round(rate * speed)), rate)
        x = self.extractor(self.augmenter(wave))
        return Example(x, example.targets, example.text, example.index) if x.shape[0] >= example.targets.numel() else example

    def _batch_examples(self, examples: list[Example], idx, speed: float) -> list[Example]:
        batch = [examples[i] for i in idx]
        if self.augmenter is None:
            return batch
        return [self.augmented(e, speed) if random.random() < self.cfg.augment_prob else e for e in batch]

    # ---- checkpoints ----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def snapshot_dir(self) -> Path:
        """Model weights of the last ``average_last_epochs`` epochs, one file each."""
        return self.run_dir / "epochs"

    def save_checkpoint(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(self.checkpoint_path)

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        self.load_state_dict(torch.load(self.checkpoint_path, map_location=self.device, weights_only=True))
        self.progress.resumes.append(self.progress.epoch)
        self.log(f"resumed from {self.checkpoint_path} after epoch {self.progress.epoch}")
        return True

    # ---- training -------------------------------------------------------------------
    def epoch_plan(self, max_steps: int | None = None) -> tuple[float, list[PlannedBatch]]:
        """(speed factor, batches) of the next epoch."""
        speed = epoch_speed(self.cfg, self.progress.epoch)
        plan = plan_epoch([e.features.shape[0] for e in self.train_sets[speed]], self.cfg, self.progress.epoch)
        return speed, plan[:max_steps] if max_steps is not None else plan

    def train_epoch(self, max_steps: int | None = None, show_progress: bool = True) -> EpochStats:
        self.seed_epoch()
        speed, plan = self.epoch_plan(max_steps)
        examples = self.train_sets[speed]
        steps = ((self._batch_examples(examples, b.indices, speed), b.chunk_frames, b.right_context_frames, b.loss_weights)
                 for b in plan)
        return self.train_steps(steps, len(plan), show_progress)

    def run(self, resume: bool = False, export_dir: Path | None = None, max_steps_per_epoch: int | None = None,
            show_progress: bool = True, export_extras: Callable[[Path], dict] | None = None,
            bundle_info: dict | None = None) -> Progress:
        """Train to ``cfg.epochs``; checkpoint every epoch; export the best-dev-WER model as a bundle."""
        if resume:
            self.load_checkpoint()
        export_dir = export_dir or self.run_dir / "bundle"
        extras = (lambda: export_extras(self.run_dir)) if export_extras else None
        while self.progress.epoch < self.cfg.epochs:
            t0 = time.time()
            stats = self.train_epoch(max_steps_per_epoch, show_progress)
            self.end_epoch(stats, t0, self.dev, export_dir, self.snapshot_dir, extras, bundle_info)
            self.save_checkpoint()
        if self.averaging_pending() and self.dev:
            self._try_averaged(export_dir, export_extras, bundle_info)
        return self.progress

    def _try_averaged(self, export_dir: Path, export_extras: Callable[[Path], dict] | None, bundle_info: dict | None) -> None:
        """Average the last epochs' weights; export them if their streaming dev WER beats the best epoch's."""
        extras = (lambda: export_extras(self.run_dir)) if export_extras else None
        self.try_averaged(self.dev, self.snapshot_dir, export_dir, extras, bundle_info)
        self.save_checkpoint()
