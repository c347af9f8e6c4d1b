"""Streaming audio intake, torch-free: chunks of any size, rate, sample type and channel
count in, fixed-size mono float32 chunks at the model rate out.

Audio at another rate is resampled chunk by chunk with ``sinc_resample``, a numpy port of
``torchaudio.functional.resample`` (its default windowed-sinc filter, the one the training
audio and whole files go through), so that streamed audio has the spectrum the model was
trained on and the ingest actor needs no torch. Each pushed chunk is resampled on its own, as
the torch ingest did before: no output is held back, and chunk edges carry the filter's
edge effects. Audio already at the model rate never meets a resampler: it comes out sample
for sample.

libsamplerate (a resampler per stream, continuous across chunks) was tried and rejected: its
steeper filter leaves 4-8 kHz of 8 kHz input emptier than anything the model saw in
training, and 8 kHz streaming WER on the AN4 dev speakers went from 15.4 % to 32.3 %.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from workers.audio.checks import AudioError, validate_samples

LOWPASS_FILTER_WIDTH = 6  # torchaudio.functional.resample's defaults
ROLLOFF = 0.99


@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """torchaudio's ``_get_sinc_resample_kernel`` (Hann window) for reduced rates ``orig`` -> ``new``,
    in float32 as torchaudio computes it for float32 audio: (new, 2 * width + orig) and width."""
    base = np.float32(min(orig, new) * ROLLOFF)
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / float(base))
    idx = np.arange(-width, width + orig, dtype=np.float32)[None, :] / np.float32(orig)
    t = np.arange(0, -new, -1, dtype=np.float32)[:, None] / np.float32(new) + idx
    t = np.clip(t * base, -LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH).astype(np.float32)
    window = np.cos(t * np.float32(math.pi / LOWPASS_FILTER_WIDTH / 2)) ** 2
    t = t * np.float32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, np.float32(1.0), np.sin(t) / t).astype(np.float32)
    return (kernel * window * (base / np.float32(orig))).astype(np.float32), width


def sinc_resample(wave: np.ndarray, rate_hz: int, target_rate_hz: int) -> np.ndarray:
    """(samples,) float32 at ``rate_hz`` -> (ceil(samples x target / rate),) float32 at
    ``target_rate_hz``: ``torchaudio.functional.resample(wave, rate_hz, target_rate_hz)``
    in numpy (to float rounding; ``tests/test_ingest.py`` compares them)."""
    if rate_hz == target_rate_hz or len(wave) == 0:
        return np.asarray(wave, np.float32)
    gcd = math.gcd(int(rate_hz), int(target_rate_hz))
    orig, new = int(rate_hz) // gcd, int(target_rate_hz) // gcd
    kernel, width = _sinc_kernel(orig, new)
    padded = np.pad(np.asarray(wave, np.float32), (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]  # (n, 2 * width + orig)
    out = (frames @ kernel.T).reshape(-1)  # phase j of output frame k is sample k * new + j
    return out[: math.ceil(new * len(wave) / orig)].astype(np.float32, copy=False)


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


class StreamingIngest:
    """Accepts chunks of any size and rate; emits fixed-size model-rate chunks.

    ``push`` returns the complete chunks, each float32 (out_chunk_samples,); ``flush`` the
    rest. Input at another rate than ``target_rate_hz`` is resampled chunk by chunk
    (``sinc_resample``). At the model rate the output is the input, sample-exact.
    """

    def __init__(self, target_rate_hz: int = 16000, out_chunk_samples: int = 1600) -> None:
        self.target_rate_hz = target_rate_hz
        self.out_chunk_samples = out_chunk_samples
        self._pending = np.zeros(0, np.float32)

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
        """Return the remaining (partial) chunk and reset."""
        rest, self._pending = self._pending, np.zeros(0, np.float32)
        return rest

    def _resample(self, mono: np.ndarray, rate_hz: int) -> np.ndarray:
        return sinc_resample(mono, rate_hz, self.target_rate_hz)

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
