"""Streaming intake (workers.audio.ingest): re-chunking, sample types, channels, and resampling with
each pushed chunk resampled as torchaudio.functional.resample would (workers.audio.ingest.sinc_resample)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.audio.ingest import sinc_resample
from workers.audio.reader import AudioError, StreamingIngest

MODEL_RATE_HZ = 16000


def pushed(ingest: StreamingIngest, pieces: list[np.ndarray], rate_hz: int) -> np.ndarray:
    """Everything the stream gives for these pushes and its flush, joined: (samples,) float32."""
    chunks = [c for piece in pieces for c in ingest.push(piece, rate_hz)]
    return np.concatenate([*chunks, ingest.flush()])


def random_cuts(x: np.ndarray, rng: np.random.Generator, max_samples: int = 3000) -> list[np.ndarray]:
    """``x`` cut into pieces of 0..max_samples samples (empty and one-sample pieces included)."""
    sizes = rng.integers(0, max_samples + 1, size=2 * len(x) // max_samples + 8)
    return np.split(x, np.minimum(np.cumsum(sizes), len(x)))


def test_streaming_ingest_rejects_non_finite() -> None:
    ingest = StreamingIngest()
    with pytest.raises(AudioError) as exc_info:
        ingest.push(np.array([0.0, np.nan, 0.1], np.float32), 16000, source="mic-3")
    assert "mic-3" in str(exc_info.value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_ingest_rechunks_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    whole = rng.standard_normal(40_000).astype(np.float32) * 0.1
    out_chunk = 1600
    ingest = StreamingIngest(target_rate_hz=16000, out_chunk_samples=out_chunk)
    cuts = np.sort(rng.integers(0, len(whole), size=25))
    chunks = []
    for piece in np.split(whole, cuts):  # includes empty pieces and 1-sample pieces
        chunks.extend(ingest.push(piece, 16000))
    assert all(c.shape == (out_chunk,) for c in chunks)
    assert len(chunks) == len(whole) // out_chunk
    rest = ingest.flush()
    assert rest.shape == (len(whole) % out_chunk,)
    joined = np.concatenate([*chunks, rest])
    np.testing.assert_array_equal(joined, whole)
    assert ingest.flush().size == 0


@pytest.mark.parametrize(("dtype", "scale"), [(np.int16, 2**15), (np.int32, 2**31)])
def test_streaming_ingest_integer_chunks(dtype: type, scale: int) -> None:
    rng = np.random.default_rng(5)
    ints = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=5000, dtype=dtype)
    ingest = StreamingIngest(out_chunk_samples=1000)
    chunks = []
    for piece in np.array_split(ints, [7, 1234, 1235, 4000]):
        chunks.extend(ingest.push(piece, 16000))
    joined = np.concatenate(chunks)
    assert joined.dtype == np.float32
    np.testing.assert_allclose(joined, ints.astype(np.float64) / scale, rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(joined) <= 1.0)


def test_streaming_ingest_stereo_and_tensor_chunks() -> None:
    rng = np.random.default_rng(9)
    stereo = (0.2 * rng.standard_normal((3200, 2))).astype(np.float32)
    ingest = StreamingIngest(out_chunk_samples=800)
    chunks = ingest.push(torch.from_numpy(stereo[:1000]), 16000) + ingest.push(stereo[1000:], 16000)
    np.testing.assert_array_equal(np.concatenate(chunks), torch.from_numpy(stereo).mean(dim=1).numpy())  # as torch averaged


def test_stream_refuses_float_chunks_far_outside_full_scale() -> None:
    ingest = StreamingIngest(16000, 1600)
    assert ingest.push(np.full(1600, 1.5, dtype=np.float32), 16000)  # a little over full scale: accepted
    with pytest.raises(AudioError, match="far outside"):
        ingest.push(np.full(1600, 3000.0, dtype=np.float32), 16000, source="stream s1")
    assert ingest.push(np.full(1600, 20000, dtype=np.int16), 16000)  # integers are scaled, never refused


@pytest.mark.parametrize("rate_hz", [8000, 11025, 22050, 32000, 44100, 48000])
@pytest.mark.parametrize("samples", [1, 7, 800, 4410, 12345])
def test_sinc_resample_is_torchaudios(rate_hz: int, samples: int) -> None:
    """The ingest actor's numpy resampler gives what ``torchaudio.functional.resample`` gives
    (the training audio's and whole files' resampler): same length, samples within 1e-5."""
    import torchaudio

    x = (0.3 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
    got = sinc_resample(x, rate_hz, MODEL_RATE_HZ)
    want = torchaudio.functional.resample(torch.from_numpy(x), rate_hz, MODEL_RATE_HZ).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rate_hz", [8000, 44100])
def test_a_stream_is_resampled_chunk_by_chunk(rate_hz: int) -> None:
    """Each pushed chunk is resampled whole, on its own (no output held back), into chunks of
    the stream's size."""
    rng = np.random.default_rng(2)
    x = (0.2 * rng.standard_normal(int(2.3 * rate_hz))).astype(np.float32)
    pieces = random_cuts(x, rng)
    ingest = StreamingIngest(MODEL_RATE_HZ, 1600)
    chunks = [c for piece in pieces for c in ingest.push(piece, rate_hz)]
    assert all(c.shape == (1600,) and c.dtype == np.float32 for c in chunks)
    want = np.concatenate([sinc_resample(p, rate_hz, MODEL_RATE_HZ) for p in pieces if len(p)])
    np.testing.assert_array_equal(np.concatenate([*chunks, ingest.flush()]), want)


@pytest.mark.parametrize("rate_hz", [8000, 44100])
def test_resampling_keeps_the_signal(rate_hz: int) -> None:
    """A 440 Hz tone pushed whole and resampled to 16 kHz is the tone sampled at 16 kHz (the
    filter's settling at the two ends aside)."""
    t_in = np.arange(rate_hz) / rate_hz
    out = pushed(StreamingIngest(), [(0.5 * np.sin(2 * np.pi * 440 * t_in)).astype(np.float32)], rate_hz)
    want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / MODEL_RATE_HZ)
    np.testing.assert_allclose(out[400:-400], want[400:-400], atol=2e-3)


def test_int16_stereo_8k_is_scaled_downmixed_then_resampled() -> None:
    rng = np.random.default_rng(4)
    pcm = rng.integers(-20000, 20000, size=(8000, 2), dtype=np.int16)
    pieces = random_cuts(pcm, rng)
    got = pushed(StreamingIngest(), pieces, 8000)
    want = pushed(StreamingIngest(), [(p.astype(np.float32) / 32768).mean(axis=1) for p in pieces], 8000)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_rate_change_mid_stream_keeps_the_model_rate_exact() -> None:
    rng = np.random.default_rng(6)
    low = (0.1 * rng.standard_normal(4000)).astype(np.float32)
    high = (0.1 * rng.standard_normal(5000)).astype(np.float32)
    ingest = StreamingIngest(MODEL_RATE_HZ, 1000)
    low_pieces = random_cuts(low, rng)
    chunks = [c for piece in low_pieces for c in ingest.push(piece, 8000)]
    chunks += [c for piece in random_cuts(high, rng) for c in ingest.push(piece, MODEL_RATE_HZ)]
    out = np.concatenate([*chunks, ingest.flush()])
    resampled = np.concatenate([sinc_resample(p, 8000, MODEL_RATE_HZ) for p in low_pieces if len(p)])
    assert len(out) == len(resampled) + len(high)
    np.testing.assert_array_equal(out[: len(resampled)], resampled)
    np.testing.assert_array_equal(out[len(resampled) :], high)  # no resampler at the model rate


@pytest.mark.parametrize("shape", [(10, 2, 2), ()])
def test_bad_shapes_are_audio_errors_naming_the_source(shape: tuple[int, ...]) -> None:
    with pytest.raises(AudioError, match="stream s9.*shape"):
        StreamingIngest().push(np.zeros(shape, np.float32), MODEL_RATE_HZ, source="stream s9")
