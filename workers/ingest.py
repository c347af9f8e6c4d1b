"""Streaming audio intake, torch-free: chunks of any size, rate, sample type and channel
count in, fixed-size mono float32 chunks at the model rate out.

Resampling uses libsamplerate (the ``samplerate`` package; ``samplerate.Resampler``), one
resampler per stream that runs on across input chunks, so a stream's output does not depend
on how its audio was cut (no edge effects at chunk boundaries), and at the stream's end equals
``samplerate.resample`` of the whole signal. Its band-limited sinc filter holds back a few
milliseconds of output (``max_resample_lag_ms``: about 6 ms at 8 kHz). Audio already at the
model rate never meets a resampler: it comes out sample for sample. Whole files are read and
resampled by ``workers.audio`` (torchaudio's sinc filter), so 8 kHz audio gives slightly
different samples offline than streamed; both are band-limited resamplings of the same signal.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import samplerate

from workers.audio_checks import AudioError, validate_samples

#: libsamplerate's converter for streamed audio: "sinc_medium" (97 dB SNR, 90 % bandwidth)
#: holds back about 6 ms at 8 -> 16 kHz; "sinc_best" would hold back 18 ms.
RESAMPLE_CONVERTER = "sinc_medium"
_FLUSH_S = 0.05  # zeros fed at a stream's end to push the filter's held-back tail out


def as_samples(samples: Any, source: str) -> np.ndarray:
    """A pushed chunk as a numpy array of its own dtype: (samples,) or (samples, channels).
    Torch tensors are taken apart by duck typing (``detach().cpu().numpy()``), so this module
    never imports torch. Any other shape raises ``AudioError`` naming ``source``."""
    if hasattr(samples, "detach"):
        samples = samples.detach().cpu().numpy()
    arr = np.asarray(samples)
    if arr.ndim not in (1, 2):
        raise AudioError(source, f"samples must have shape (samples,) or (samples, channels), got {arr.shape}")
    return arr


def downmix(arr: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) float -> mono float32 (samples,): the channels' mean."""
    arr = arr.astype(np.float32, copy=False)
    return arr.mean(axis=1) if arr.ndim == 2 else arr


@lru_cache(maxsize=64)
def max_resample_lag_ms(rate_hz: int, target_rate_hz: int) -> float:
    """The most output a stream's resampler holds back at any moment, in ms: 0 at the model
    rate. Measured once per rate pair on 3 s of silence fed 1 ms at a time."""
    if rate_hz == target_rate_hz:
        return 0.0
    stream = _Resampler(rate_hz, target_rate_hz)
    step = max(1, rate_hz // 1000)
    lag = 0
    for _ in range(3000):
        stream.push(np.zeros(step, np.float32))
        lag = max(lag, stream.expected_samples() - stream.out_samples)
    return 1000.0 * lag / target_rate_hz


class _Resampler:
    """One stream's libsamplerate resampler from ``rate_hz`` to ``target_rate_hz``, counting
    samples so that ``finish`` ends the output at round(input samples x ratio), as
    ``samplerate.resample`` of the whole input would."""

    def __init__(self, rate_hz: int, target_rate_hz: int) -> None:
        self.rate_hz = rate_hz
        self.ratio = target_rate_hz / rate_hz
        self.state = samplerate.Resampler(RESAMPLE_CONVERTER, channels=1)
        self.in_samples = self.out_samples = 0

    def expected_samples(self) -> int:
        return round(self.in_samples * self.ratio)

    def push(self, mono: np.ndarray) -> np.ndarray:
        """(samples,) float32 at ``rate_hz`` -> what the filter releases, (samples,) float32."""
        self.in_samples += len(mono)
        out = self.state.process(np.ascontiguousarray(mono, dtype=np.float32), self.ratio, end_of_input=False)
        self.out_samples += len(out)
        return out.astype(np.float32, copy=False)

    def finish(self) -> np.ndarray:
        """The held-back tail, cut so the stream's output has ``expected_samples()`` in all."""
        tail = self.state.process(np.zeros(int(_FLUSH_S * self.rate_hz) + 64, np.float32), self.ratio, end_of_input=True)
        tail = tail[: max(0, self.expected_samples() - self.out_samples)]
        self.out_samples += len(tail)
        return tail.astype(np.float32, copy=False)


class StreamingIngest:
    """Accepts chunks of any size and rate; emits fixed-size model-rate chunks.

    ``push`` returns the complete chunks, each float32 (out_chunk_samples,); ``flush`` the
    rest. Input at another rate than ``target_rate_hz`` runs through this stream's libsamplerate
    resampler, which holds back a few ms (its filter delay) until ``flush``; a change of input rate
    mid-stream flushes the running resampler and starts another. At the model rate the
    output is the input, sample-exact.
    """

    def __init__(self, target_rate_hz: int = 16000, out_chunk_samples: int = 1600) -> None:
        self.target_rate_hz = target_rate_hz
        self.out_chunk_samples = out_chunk_samples
        self._pending = np.zeros(0, np.float32)
        self._rate_hz: float | None = None  # rate of the audio pushed last
        self._resampler: _Resampler | None = None  # None at the model rate

    def push(self, samples: Any, rate_hz: int, source: str = "<stream>") -> list[np.ndarray]:
        """Add a chunk (samples,) or (samples, channels), float in [-1, 1] or integer PCM, numpy or
        torch; return the complete output chunks. Bad audio raises ``AudioError`` naming ``source``."""
        arr = as_samples(samples, source)
        if arr.size == 0:
            return []
        if not np.issubdtype(arr.dtype, np.floating):  # integer PCM: scaled by its full scale (int16 by 32768)
            arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max + 1)
        validate_samples(arr, source)
        self._append(self._resample(downmix(arr), rate_hz))
        n_full = len(self._pending) // self.out_chunk_samples
        cut = n_full * self.out_chunk_samples
        out = list(self._pending[:cut].reshape(n_full, self.out_chunk_samples)) if n_full else []
        self._pending = self._pending[cut:].copy()
        return out

    def flush(self) -> np.ndarray:
        """Return the remaining samples (the last partial chunk, plus the resampler's held-back
        tail, so possibly a little over a chunk) and reset."""
        self._append(self._end_resampler())
        rest, self._pending = self._pending, np.zeros(0, np.float32)
        self._rate_hz = None
        return rest

    def _resample(self, mono: np.ndarray, rate_hz: int) -> np.ndarray:
        if rate_hz != self._rate_hz:
            self._append(self._end_resampler())
            self._rate_hz = rate_hz
            if rate_hz != self.target_rate_hz:
                self._resampler = _Resampler(rate_hz, self.target_rate_hz)
        if self._resampler is None:
            return mono
        return self._resampler.push(mono)

    def _end_resampler(self) -> np.ndarray:
        """What the running resampler still holds (its filter delay), and drop it."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        tail = self._resampler.finish()
        self._resampler = None
        return tail

    def _append(self, wave: np.ndarray) -> None:
        if len(wave):
            self._pending = np.concatenate([self._pending, wave])


class IngestStage:
    """``StreamingIngest`` per stream id: audio of any size/rate -> model-rate chunks (samples,) float32."""

    def __init__(self, target_rate_hz: int, chunk_samples: int) -> None:
        self.target_rate_hz = target_rate_hz
        self.chunk_samples = chunk_samples
        self._streams: dict[str, StreamingIngest] = {}

    def push(self, stream_id: str, samples: Any, rate_hz: int) -> list[np.ndarray]:
        ingest = self._streams.setdefault(stream_id, StreamingIngest(self.target_rate_hz, self.chunk_samples))
        return ingest.push(samples, rate_hz, source=f"stream {stream_id}")

    def finish(self, stream_id: str) -> np.ndarray:
        """The stream's remaining samples (``StreamingIngest.flush``); its state is dropped."""
        ingest = self._streams.pop(stream_id, None)
        return ingest.flush() if ingest else np.zeros(0, np.float32)

    def stream_ids(self) -> set[str]:
        """The streams this stage holds state for."""
        return set(self._streams)
