"""Streaming intake (workers.ingest): re-chunking, sample types, channels, and resampling with
one libsamplerate resampler per stream that runs on across the pushed chunks."""

from __future__ import annotations

import numpy as np
import pytest
import samplerate
import torch

from workers.audio import AudioError, StreamingIngest
from workers.ingest import RESAMPLE_CONVERTER

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


@pytest.mark.parametrize("rate_hz", [8000, 44100])
@pytest.mark.parametrize("seed", [0, 1])
def test_resampled_stream_does_not_depend_on_how_it_was_cut(rate_hz: int, seed: int) -> None:
    """Chunks of random sizes give what the whole signal gives, up to float rounding: no edge
    effects at chunk boundaries; and the chunks have the stream's chunk size."""
    rng = np.random.default_rng(seed)
    x = (0.2 * rng.standard_normal(int(2.3 * rate_hz))).astype(np.float32)
    whole = pushed(StreamingIngest(MODEL_RATE_HZ, 1600), [x], rate_hz)
    ingest = StreamingIngest(MODEL_RATE_HZ, 1600)
    pieces = random_cuts(x, rng)
    chunks = [c for piece in pieces for c in ingest.push(piece, rate_hz)]
    assert all(c.shape == (1600,) and c.dtype == np.float32 for c in chunks)
    cut = np.concatenate([*chunks, ingest.flush()])
    assert abs(len(whole) - len(x) * MODEL_RATE_HZ / rate_hz) <= 1
    assert cut.shape == whole.shape
    np.testing.assert_allclose(cut, whole, rtol=0, atol=1e-6)
    one_shot = samplerate.resample(x, MODEL_RATE_HZ / rate_hz, RESAMPLE_CONVERTER)  # the library on the whole signal
    assert abs(len(one_shot) - len(whole)) <= 1
    n = min(len(one_shot), len(whole))
    np.testing.assert_allclose(whole[:n], one_shot[:n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate_hz", [8000, 44100])
def test_resampling_keeps_the_signal(rate_hz: int) -> None:
    """A 440 Hz tone resampled to 16 kHz is the tone sampled at 16 kHz (the filter's settling
    at the two ends aside)."""
    t_in = np.arange(rate_hz) / rate_hz
    out = pushed(StreamingIngest(), random_cuts((0.5 * np.sin(2 * np.pi * 440 * t_in)).astype(np.float32), np.random.default_rng(3)), rate_hz)
    want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / MODEL_RATE_HZ)
    np.testing.assert_allclose(out[400:-400], want[400:-400], atol=2e-3)


def test_int16_stereo_8k_is_scaled_downmixed_then_resampled() -> None:
    rng = np.random.default_rng(4)
    pcm = rng.integers(-20000, 20000, size=(8000, 2), dtype=np.int16)
    got = pushed(StreamingIngest(), random_cuts(pcm, rng), 8000)
    want = pushed(StreamingIngest(), [(pcm.astype(np.float32) / 32768).mean(axis=1)], 8000)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_rate_change_mid_stream_flushes_the_resampler_and_model_rate_stays_exact() -> None:
    rng = np.random.default_rng(6)
    low = (0.1 * rng.standard_normal(4000)).astype(np.float32)
    high = (0.1 * rng.standard_normal(5000)).astype(np.float32)
    ingest = StreamingIngest(MODEL_RATE_HZ, 1000)
    chunks = [c for piece in random_cuts(low, rng) for c in ingest.push(piece, 8000)]
    chunks += [c for piece in random_cuts(high, rng) for c in ingest.push(piece, MODEL_RATE_HZ)]
    out = np.concatenate([*chunks, ingest.flush()])
    resampled = pushed(StreamingIngest(), [low], 8000)
    assert len(out) == len(resampled) + len(high)
    np.testing.assert_allclose(out[: len(resampled)], resampled, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out[len(resampled) :], high)  # no resampler at the model rate


@pytest.mark.parametrize("shape", [(10, 2, 2), ()])
def test_bad_shapes_are_audio_errors_naming_the_source(shape: tuple[int, ...]) -> None:
    with pytest.raises(AudioError, match="stream s9.*shape"):
        StreamingIngest().push(np.zeros(shape, np.float32), MODEL_RATE_HZ, source="stream s9")
