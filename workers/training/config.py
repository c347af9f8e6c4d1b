"""``TrainConfig`` and ``AugmentConfig``: the training recipe's settings, torch-free
(``pipeline.config`` reads them without loading torch; the trainer is ``workers.training.trainer``,
the degradations ``workers.data.augment``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentConfig:
    """How often and how strongly each degradation is drawn for a training utterance."""

    gain_db_range: tuple[float, float] = (-40.0, 10.0)  # input level, clipped to [-1, 1] after
    band_limit_prob: float = 0.25  # telephone band (8 kHz sampling)
    noise_prob: float = 0.5
    noise_snr_db_range: tuple[float, float] = (0.0, 30.0)
    babble_share: float = 0.5  # of the noisy utterances, the share with babble rather than coloured noise
    babble_talkers: tuple[int, int] = (3, 7)
    reverb_prob: float = 0.3
    reverb_rt60_s_range: tuple[float, float] = (0.2, 0.9)
    rir_pool_size: int = 48  # simulated rooms, drawn once per run
    # Lead-in and tail: some utterances get stretches of faint background noise before and after them,
    # as a stream's utterance has once the endpointer cut it with its pre-roll (a model trained on
    # tightly cut files took faint noise before an utterance badly: issue 25).
    pad_prob: float = 0.0
    pad_s_range: tuple[float, float] = (0.0, 1.0)  # drawn for the lead-in and for the tail
    pad_noise_dbfs_range: tuple[float, float] = (-80.0, -45.0)  # the background's level (before the gain)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    max_batch_frames: int = 2400  # model frames per batch (after stacking), padding included
    max_batch_utterances: int = 16
    learning_rate: float = 1.5e-3
    warmup_steps: int = 300
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    seed: int = 1234
    speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1)
    freq_mask_param: int = 8  # SpecAugment, in MFCC coefficients
    time_mask_param: int = 5  # SpecAugment, in model frames
    num_time_masks: int = 2
    full_utterance_prob: float = 0.25  # share of batches run without chunking
    chunk_frames_range: tuple[int, int] = (4, 20)  # drawn per batch, inclusive
    right_context_frames_range: tuple[int, int] = (2, 10)
    eval_chunk_frames: int = 10  # dev WER is also reported at this streaming setting
    eval_right_context_frames: int = 5
    average_last_epochs: int = 0  # >1: also try the mean weights of the last N epochs, export it if better on dev
    bf16: bool = False  # bfloat16 autocast of the forward pass on CUDA (ignored on CPU)
    num_threads: int = 0  # 0: all cores
    device: str = "auto"
    init_from: str = ""  # a model bundle whose weights start the run (warm start); "" starts from random weights
    # Waveform augmentation, drawn afresh every epoch (workers/data/augment.py); augment_prob 0 turns it off.
    augment_prob: float = 0.0  # share of training utterances degraded in an epoch
    augment_gain_db_range: tuple[float, float] = (-40.0, 10.0)  # input level, then clipped to [-1, 1]
    augment_band_limit_prob: float = 0.25  # telephone band (8 kHz sampling)
    augment_noise_prob: float = 0.5  # coloured noise or babble of other training utterances
    augment_noise_snr_db_range: tuple[float, float] = (0.0, 30.0)
    augment_babble_share: float = 0.5
    augment_reverb_prob: float = 0.3  # simulated room (pyroomacoustics)
    augment_reverb_rt60_s_range: tuple[float, float] = (0.2, 0.9)
    augment_rir_pool_size: int = 48  # simulated rooms, drawn once per run from the seed
    augment_pad_prob: float = 0.0  # faint-noise lead-in and tail (AugmentConfig.pad_*)
    augment_pad_s_range: tuple[float, float] = (0.0, 1.0)
    augment_pad_noise_dbfs_range: tuple[float, float] = (-80.0, -45.0)
    # `asr train --workers N` only (pipeline/training/distributed.py): "ray_data" streams each worker's share of an
    # epoch through Ray Data (no process holds the corpus's features); "shared" puts the raw MFCC of the
    # whole corpus in the object store (every worker can read all of it; same batches as single-process).
    data_feed: str = "ray_data"
    feed_batch_utterances: int = 16  # ray_data: utterances per Ray Data batch (a worker holds ~2 + a training batch)

    def __post_init__(self) -> None:
        if self.data_feed not in ("ray_data", "shared"):
            raise ValueError(f"train.data_feed must be ray_data or shared, got {self.data_feed!r}")
        if self.feed_batch_utterances < 1:
            raise ValueError(f"train.feed_batch_utterances must be >= 1, got {self.feed_batch_utterances}")
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.full_utterance_prob <= 1:
            raise ValueError(f"train.full_utterance_prob must be in [0, 1], got {self.full_utterance_prob}")
        if self.chunk_frames_range[0] < 1 or self.chunk_frames_range[0] > self.chunk_frames_range[1]:
            raise ValueError(f"train.chunk_frames_range must be 1 <= lo <= hi, got {self.chunk_frames_range}")
        if self.average_last_epochs < 0:
            raise ValueError(f"train.average_last_epochs must be >= 0, got {self.average_last_epochs}")
        for name in ("augment_prob", "augment_band_limit_prob", "augment_noise_prob", "augment_babble_share", "augment_reverb_prob",
                     "augment_pad_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("augment_gain_db_range", "augment_noise_snr_db_range", "augment_reverb_rt60_s_range", "augment_pad_s_range",
                     "augment_pad_noise_dbfs_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"train.{name} must be [lo, hi] with lo <= hi, got {getattr(self, name)}")
        if self.augment_pad_s_range[0] < 0:
            raise ValueError(f"train.augment_pad_s_range must be >= 0, got {self.augment_pad_s_range}")
        if self.augment_reverb_rt60_s_range[0] <= 0:
            raise ValueError(f"train.augment_reverb_rt60_s_range must be > 0, got {self.augment_reverb_rt60_s_range}")

    @property
    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(
            gain_db_range=self.augment_gain_db_range,
            band_limit_prob=self.augment_band_limit_prob,
            noise_prob=self.augment_noise_prob,
            noise_snr_db_range=self.augment_noise_snr_db_range,
            babble_share=self.augment_babble_share,
            reverb_prob=self.augment_reverb_prob,
            reverb_rt60_s_range=self.augment_reverb_rt60_s_range,
            rir_pool_size=self.augment_rir_pool_size,
            pad_prob=self.augment_pad_prob,
            pad_s_range=self.augment_pad_s_range,
            pad_noise_dbfs_range=self.augment_pad_noise_dbfs_range,
        )
