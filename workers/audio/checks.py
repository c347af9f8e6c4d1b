"""``AudioError`` and the checks of incoming samples, torch-free (the Ray ingest actor uses
them without loading torch; files are read by ``workers.audio.reader``, which re-exports these)."""

from __future__ import annotations

import numpy as np


class AudioError(Exception):
    """Input that cannot become a model-rate waveform. ``str()`` names file and reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


#: Streamed float chunks louder than this are refused: a file can be scaled as a whole, a
#: stream cannot, and such values are nearly always integers sent as floats.
MAX_STREAM_PEAK = 2.0


def validate_samples(samples: np.ndarray, source: str, max_peak: float | None = MAX_STREAM_PEAK) -> None:
    """Reject empty or non-finite signals, and (``max_peak``) float samples far outside [-1, 1]."""
    if samples.size == 0:
        raise AudioError(source, "no audio samples (header only or truncated)")
    if not np.all(np.isfinite(samples)):
        raise AudioError(source, "NaN or infinite samples")
    if max_peak is not None and np.issubdtype(samples.dtype, np.floating):
        peak = float(np.abs(samples).max())
        if peak > max_peak:
            raise AudioError(source, f"float samples reach {peak:.4g}, far outside [-1, 1] (integer PCM sent as floats? "
                                     "scale to full scale 1.0, e.g. divide 16-bit values by 32768)")
