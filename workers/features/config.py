"""``FeatureConfig``: the MFCC settings a model bundle records, torch-free (the decoder actors
read a bundle's frame duration without loading torch; the extractor is ``workers.features.mfcc``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureConfig:
    """MFCC settings. Output frame rate is ``1000 / (hop_ms * stack_frames)`` Hz."""

    sample_rate_hz: int = 16000
    window_ms: float = 25.0
    hop_ms: float = 10.0
    n_mels: int = 40
    n_mfcc: int = 40
    stack_frames: int = 3  # adjacent 10 ms frames concatenated into one model frame
    cmn_prior_frames: float = 0.0  # 0: global mean; >0: causal running mean, the global mean weighted as this many 10 ms frames
    log_floor: float = 1e-6  # added to mel energies before the log (torchaudio's MFCC: 1e-6, which quiet input reaches)
    cmn_max_frames: float = 1000.0  # causal mean: past this many frames (10 s) it forgets with this time constant
    cmn_silence_std: float = 5.5  # causal mean: frames with c0 this many stds below the global mean (digital silence) don't move it

    def __post_init__(self) -> None:
        for name in ("sample_rate_hz", "n_mels", "n_mfcc", "stack_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"features.{name} must be >= 1, got {getattr(self, name)}")
        if self.window_ms <= 0 or self.hop_ms <= 0:
            raise ValueError(f"features.window_ms and hop_ms must be > 0, got {self.window_ms}, {self.hop_ms}")
        if self.cmn_prior_frames < 0:
            raise ValueError(f"features.cmn_prior_frames must be >= 0, got {self.cmn_prior_frames}")
        if self.cmn_max_frames < 1 or self.cmn_max_frames <= self.cmn_prior_frames or self.cmn_silence_std < 0:
            raise ValueError(f"features.cmn_max_frames must be > max(1, cmn_prior_frames) and cmn_silence_std >= 0, "
                             f"got {self.cmn_max_frames}, {self.cmn_silence_std}")
        if not 0 < self.log_floor < 1:
            raise ValueError(f"features.log_floor must be in (0, 1), got {self.log_floor}")

    @property
    def window_samples(self) -> int:
        return int(round(self.sample_rate_hz * self.window_ms / 1000))

    @property
    def hop_samples(self) -> int:
        return int(round(self.sample_rate_hz * self.hop_ms / 1000))

    @property
    def frame_ms(self) -> float:
        """Duration of one model frame (after stacking) in milliseconds."""
        return self.hop_ms * self.stack_frames

    @property
    def feature_dim(self) -> int:
        return self.n_mfcc * self.stack_frames

    @property
    def min_samples(self) -> int:
        """Shortest signal that yields one model frame."""
        return self.window_samples + (self.stack_frames - 1) * self.hop_samples


def frames_for_ms(ms: float, frame_ms: float) -> int:
    """Milliseconds -> whole model frames (rounded)."""
    return int(round(ms / frame_ms))
