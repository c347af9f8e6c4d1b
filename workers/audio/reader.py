"""Audio intake: read, validate, downmix and resample to the model's rate.

Every failure raises ``AudioError`` naming the file and the reason, so a pipeline can
record the bad input and go on. Whole files are resampled with torchaudio here; streams
go through ``workers.audio.ingest`` (numpy, torch-free), whose ``StreamingIngest`` is re-exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from workers.audio.checks import MAX_STREAM_PEAK, AudioError, validate_samples
from workers.audio.ingest import StreamingIngest

if TYPE_CHECKING:
    import torch

__all__ = [  # AudioError, the sample checks and StreamingIngest are torch-free modules' (re-exported)
    "MAX_STREAM_PEAK", "RAW_SUFFIXES", "AudioError", "AudioReader", "RawFormat", "StreamingIngest", "decode_raw_pcm", "load_audio",
    "read_audio", "to_model_rate", "validate_samples", "wav_declared_frames",
]

#: Suffixes read as headerless PCM when no header is present (AN4 ships ``.raw``).
RAW_SUFFIXES = frozenset({".raw", ".pcm"})


@dataclass(frozen=True)
class RawFormat:
    """How to read headerless PCM."""

    sample_rate_hz: int = 16000
    sample_width_bytes: int = 2  # 1 (unsigned 8-bit), 2, or 4 (signed)
    big_endian: bool = True  # AN4's raw files are big-endian
    channels: int = 1


def _raw_dtype(fmt: RawFormat) -> np.dtype:
    if fmt.sample_width_bytes == 1:
        return np.dtype("u1")
    if fmt.sample_width_bytes not in (2, 4):
        raise ValueError(f"sample_width_bytes must be 1, 2 or 4, got {fmt.sample_width_bytes}")
    order = ">" if fmt.big_endian else "<"
    return np.dtype(f"{order}i{fmt.sample_width_bytes}")


def decode_raw_pcm(data: bytes, fmt: RawFormat, source: str = "<bytes>") -> np.ndarray:
    """Headerless PCM bytes -> float32 array (samples, channels) in [-1, 1]."""
    dtype = _raw_dtype(fmt)
    frame_bytes = dtype.itemsize * fmt.channels
    if len(data) == 0:
        raise AudioError(source, "empty file")
    if len(data) % frame_bytes:
        raise AudioError(source, f"truncated raw PCM: {len(data)} bytes is not a multiple of {frame_bytes}")
    ints = np.frombuffer(data, dtype=dtype).reshape(-1, fmt.channels)
    if fmt.sample_width_bytes == 1:
        return (ints.astype(np.float32) - 128.0) / 128.0
    scale = float(2 ** (8 * fmt.sample_width_bytes - 1))
    return ints.astype(np.float32) / scale


def _existing_file(path: str | Path) -> Path:
    """``path`` as a Path; ``AudioError`` for a missing file, a broken link or an empty file."""
    p = Path(path)
    if not p.is_file():
        if p.is_symlink():
            raise AudioError(str(path), f"broken symbolic link (to {p.readlink()})")
        raise AudioError(str(path), "no such file")
    if p.stat().st_size == 0:
        raise AudioError(str(path), "empty file")
    return p


def read_audio(path: str | Path, raw_format: RawFormat | None = None) -> tuple[np.ndarray, int]:
    """Read a file as float32 (samples, channels) and its sample rate, validating it.

    WAV/FLAC/OGG (anything libsndfile reads) by header; ``.raw``/``.pcm`` or any file
    given ``raw_format`` as headerless PCM. Float files whose samples exceed [-1, 1] are
    scaled down to a peak of 1 (the whole file by one factor).
    """
    source = str(path)
    p = _existing_file(path)
    if raw_format is not None or p.suffix.lower() in RAW_SUFFIXES:
        fmt = raw_format or RawFormat()
        samples = decode_raw_pcm(p.read_bytes(), fmt, source)
        rate = fmt.sample_rate_hz
    else:
        try:
            samples, rate = sf.read(str(p), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise AudioError(source, f"not readable audio ({exc})") from exc
        declared = wav_declared_frames(p)
        if declared is not None and declared > samples.shape[0] > 0:  # nothing at all: validate_samples says so
            raise AudioError(source, f"truncated WAV: the header declares {declared / rate:.2f} s, "
                                     f"{samples.shape[0] / rate:.2f} s are present")
    validate_samples(samples, source, max_peak=None)
    peak = float(np.abs(samples).max())
    if peak > 1.0:  # float files may hold any scale (e.g. 16-bit values stored as floats): bring to full scale
        samples = samples / peak
    return samples, int(rate)


def wav_declared_frames(path: Path) -> int | None:
    """Frames the RIFF/WAVE header of ``path`` declares (libsndfile reads a cut file silently);
    None for other formats or an unknown length (0 or 0xFFFFFFFF, as streaming writers leave it)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"fmt " and pos + 22 <= len(head):
            block_align = int.from_bytes(head[pos + 20 : pos + 22], "little")
        elif chunk == b"data":
            if block_align == 0 or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def to_model_rate(samples: np.ndarray, rate_hz: int, target_rate_hz: int) -> torch.Tensor:
    """(samples, channels) or (samples,) float array -> mono float32 tensor (samples,) at target rate."""
    import torch  # here, not at the top: reading a file (``read_audio``) needs no torch
    import torchaudio.functional as AF

    x = torch.as_tensor(np.ascontiguousarray(samples), dtype=torch.float32)
    if x.dim() == 2:
        x = x.mean(dim=1)
    if rate_hz != target_rate_hz:
        x = AF.resample(x, rate_hz, target_rate_hz)
    return x


def load_audio(
    path: str | Path,
    target_rate_hz: int = 16000,
    raw_format: RawFormat | None = None,
    min_samples: int = 1,
) -> torch.Tensor:
    """Read, validate, downmix and resample a file: returns float32 (samples,) at target rate.

    ``min_samples`` is the shortest acceptable signal after resampling (one feature
    window, typically); shorter signals raise ``AudioError``.
    """
    samples, rate = read_audio(path, raw_format)
    wave = to_model_rate(samples, rate, target_rate_hz)
    if wave.numel() < min_samples:
        ms = 1000.0 * wave.numel() / target_rate_hz
        raise AudioError(str(path), f"signal too short ({ms:.1f} ms) to give one feature frame")
    return wave


class AudioReader:
    """One file read piece by piece at the model rate, never held whole.

    ``read(start, stop)`` gives mono float32 samples ``[start, stop)`` (indexes at the model
    rate) equal to that range of ``load_audio``: bit for bit at the file's own rate; a
    resampled piece is cut from a stretch read ``RESAMPLE_MARGIN`` input samples wider on
    each side than the piece, so the resampling filter sees the same neighbours as on the
    whole file (equal up to float rounding). Opening checks what ``read_audio`` checks from
    the header (missing, empty, unreadable, truncated, too short); non-finite samples raise
    ``AudioError`` when the piece holding them is read. Float-coded files (whose samples may
    exceed [-1, 1]) are scanned once for their peak and scaled by it, as ``read_audio`` does.
    Use as a context manager (it holds the file open).
    """

    #: Input samples read beyond each end of a resampled piece (the sinc filter spans tens).
    RESAMPLE_MARGIN = 1024
    _INTEGER_SUBTYPES = ("PCM_", "ULAW", "ALAW")  # decoded by libsndfile into [-1, 1]
    _EXACT_SEEK_SUBTYPES = ("PCM_", "ULAW", "ALAW", "FLOAT", "DOUBLE")  # others are read front to back
    _TAIL_FRAMES = 8192

    def __init__(self, path: str | Path, target_rate_hz: int = 16000, raw_format: RawFormat | None = None,
                 min_samples: int = 1) -> None:
        self.source = str(path)
        p = _existing_file(path)
        self._raw, self._sf, self._peak = None, None, 1.0
        if raw_format is not None or p.suffix.lower() in RAW_SUFFIXES:
            self._fmt = raw_format or RawFormat()
            self._frame_bytes = _raw_dtype(self._fmt).itemsize * self._fmt.channels
            size = p.stat().st_size
            if size % self._frame_bytes:
                raise AudioError(self.source, f"truncated raw PCM: {size} bytes is not a multiple of {self._frame_bytes}")
            self.frames, self.rate_hz = size // self._frame_bytes, self._fmt.sample_rate_hz
            self._raw = p.open("rb")
        else:
            try:
                self._sf = sf.SoundFile(str(p))
            except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
                raise AudioError(self.source, f"not readable audio ({exc})") from exc
            self.frames, self.rate_hz = int(self._sf.frames), int(self._sf.samplerate)
            self._buf, self._buf_start = np.zeros((0, self._sf.channels), dtype=np.float32), 0  # see _read_forward
        try:
            self._check_header(p, target_rate_hz, min_samples)
        except AudioError:
            self.close()
            raise

    def _check_header(self, p: Path, target_rate_hz: int, min_samples: int) -> None:
        if self._sf is not None:
            declared = wav_declared_frames(p)
            if declared is not None and declared > self.frames > 0:
                raise AudioError(self.source, f"truncated WAV: the header declares {declared / self.rate_hz:.2f} s, "
                                              f"{self.frames / self.rate_hz:.2f} s are present")
        if self.frames == 0:
            raise AudioError(self.source, "no audio samples (header only or truncated)")
        self.target_rate_hz = target_rate_hz
        gcd = math.gcd(self.rate_hz, target_rate_hz)
        self._orig, self._new = self.rate_hz // gcd, target_rate_hz // gcd  # input / output samples per filter phase
        #: samples at the model rate (as many as torchaudio's resample of the whole file gives)
        self.num_samples = -(-self.frames * self._new // self._orig)
        if self.num_samples < min_samples:
            ms = 1000.0 * self.num_samples / target_rate_hz
            raise AudioError(self.source, f"signal too short ({ms:.1f} ms) to give one feature frame")
        if self._sf is not None and not self._sf.subtype.startswith(self._INTEGER_SUBTYPES):
            peak = max(float(np.abs(self._read_frames(i, 1 << 20)).max()) for i in range(0, self.frames, 1 << 20))
            self._peak = max(peak, 1.0)

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.target_rate_hz

    def _read_frames(self, first: int, count: int) -> np.ndarray:
        """Input frames ``[first, first + count)`` as float32 (frames, channels); checked finite."""
        count = min(count, self.frames - first)
        if self._raw is not None:
            self._raw.seek(first * self._frame_bytes)
            samples = decode_raw_pcm(self._raw.read(count * self._frame_bytes), self._fmt, self.source)
        elif self._sf is not None and self._sf.subtype.startswith(self._EXACT_SEEK_SUBTYPES):
            self._sf.seek(first)
            samples = self._sf.read(count, dtype="float32", always_2d=True)
        else:
            samples = self._read_forward(first, count)
        if not np.all(np.isfinite(samples)):
            raise AudioError(self.source, "NaN or infinite samples")
        return samples

    def _read_forward(self, first: int, count: int) -> np.ndarray:
        """Frames of a compressed stream (Vorbis, Opus, MP3), which decodes exactly only front to
        back (a seek lands a few hundred samples off): decoding goes on from where it stopped,
        keeping the last ``_TAIL_FRAMES`` for the small step back that resampling margins take;
        an earlier frame than that restarts from the beginning."""
        assert self._sf is not None
        if first < self._buf_start:
            self._sf.seek(0)
            self._buf, self._buf_start = self._buf[:0], 0
        pos = self._buf_start + len(self._buf)
        while pos < first - self._TAIL_FRAMES:  # a gap (pieces without speech): decode it block by block and drop it
            skipped = len(self._sf.read(min(first - pos, 1 << 20), dtype="float32", always_2d=True))
            if not skipped:
                break
            pos += skipped
            self._buf, self._buf_start = self._buf[:0], pos
        if first + count > pos:
            self._buf = np.concatenate([self._buf, self._sf.read(first + count - pos, dtype="float32", always_2d=True)])
        out = self._buf[first - self._buf_start : first + count - self._buf_start].copy()
        if len(self._buf) > self._TAIL_FRAMES:
            self._buf_start += len(self._buf) - self._TAIL_FRAMES
            self._buf = self._buf[-self._TAIL_FRAMES :].copy()
        return out

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Model-rate samples ``[start, stop)`` (clipped to the file) -> float32 (samples,)."""
        start, stop = max(0, start), min(stop, self.num_samples)
        if stop <= start:
            import torch

            return torch.zeros(0)
        if self._orig == self._new:
            first, offset = start, start
            count = stop - start
        else:  # whole filter phases: input frame k * orig lands on output sample k * new
            margin = -(-self.RESAMPLE_MARGIN // self._orig)
            first_phase = max(0, start // self._new - margin)
            first, offset = first_phase * self._orig, first_phase * self._new
            count = (-(-stop // self._new) + margin) * self._orig - first
        samples = self._read_frames(first, count)
        if self._peak > 1.0:
            samples = samples / self._peak  # as read_audio scales such files
        wave = to_model_rate(samples, self.rate_hz, self.target_rate_hz)
        return wave[start - offset : stop - offset]

    def close(self) -> None:
        for f in (self._raw, self._sf):
            if f is not None:
                f.close()

    def __enter__(self) -> AudioReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

