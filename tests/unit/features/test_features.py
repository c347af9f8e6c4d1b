"""MFCC features: streaming equals offline, frame counts, stacking, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.features.mfcc import FeatureConfig, MfccExtractor, Normalizer, StreamingFeatures

RATE = 16000




def make_signal(seed: int, seconds: float) -> torch.Tensor:
    """Noise plus a sine and a slow chirp-like tone: reproducible, non-stationary."""
    rng = np.random.default_rng(seed)
    n = int(RATE * seconds)
    t = np.arange(n) / RATE
    freq = rng.uniform(150, 3000)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(2 * np.pi * (200 + 400 * t) * t) + 0.05 * rng.standard_normal(n)
    return torch.from_numpy(x.astype(np.float32))


def random_normalizer(n_mfcc: int, seed: int = 0) -> Normalizer:
    g = torch.Generator().manual_seed(seed)
    return Normalizer(mean=torch.randn(n_mfcc, generator=g) * 10, std=torch.rand(n_mfcc, generator=g) * 5 + 0.5)


def stream(streamer: StreamingFeatures, signal: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed ``signal`` in pieces of ``sizes`` (the remainder as one last piece); join the outputs."""
    state = streamer.initial_state()
    outputs, pos = [], 0
    for size in sizes:
        if pos >= signal.numel():
            break
        out, state = streamer.online_inference(signal[pos : pos + size], state)
        assert out.shape[1] == streamer.config.feature_dim
        outputs.append(out)
        pos += size
    if pos < signal.numel():
        out, state = streamer.online_inference(signal[pos:], state)
        outputs.append(out)
    return torch.cat(outputs)


def expected_frames(n: int, cfg: FeatureConfig) -> int:
    if n < cfg.window_samples:
        return 0
    return (1 + (n - cfg.window_samples) // cfg.hop_samples) // cfg.stack_frames


# chunk sizes from 1 sample to 10 s, with tiny, medium and huge sizes all likely
CHUNK_SIZES = st.lists(
    st.one_of(st.integers(1, 16), st.integers(1, 1600), st.integers(1, 10 * RATE)),
    min_size=1,
    max_size=40,
)

CFG = FeatureConfig(stack_frames=3)
EXTRACTOR = MfccExtractor(CFG, random_normalizer(CFG.n_mfcc))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), seconds=st.floats(0.5, 3.0), sizes=CHUNK_SIZES)
def test_streaming_equals_offline_for_any_chunking(seed: int, seconds: float, sizes: list[int]) -> None:
    signal = make_signal(seed, seconds)
    offline = EXTRACTOR(signal)
    online = stream(StreamingFeatures(EXTRACTOR), signal, sizes)
    assert offline.shape == (expected_frames(signal.numel(), CFG), CFG.feature_dim)
    assert online.shape == offline.shape
    assert float((online - offline).abs().max()) <= 1e-4


@pytest.mark.parametrize("stack_frames", [1, 4])
def test_streaming_equals_offline_other_stacking(stack_frames: int) -> None:
    cfg = FeatureConfig(stack_frames=stack_frames, n_mfcc=13, n_mels=26)
    extractor = MfccExtractor(cfg, random_normalizer(cfg.n_mfcc, seed=3))
    signal = make_signal(11, 1.3)
    sizes = [1, 2, 399, 400, 161, 3, 5000, 17]
    online = stream(StreamingFeatures(extractor), signal, sizes)
    offline = extractor(signal)
    assert online.shape == offline.shape == (expected_frames(signal.numel(), cfg), 13 * stack_frames)
    assert float((online - offline).abs().max()) <= 1e-4


def test_normalizer_is_applied_before_stacking() -> None:
    signal = make_signal(2, 1.0)
    norm = random_normalizer(CFG.n_mfcc, seed=7)
    raw = MfccExtractor(CFG).raw_mfcc(signal)
    features = MfccExtractor(CFG, norm)(signal)
    k, d = CFG.stack_frames, CFG.n_mfcc
    n = raw.shape[0] // k
    expected = ((raw[: n * k] - norm.mean) / norm.std).reshape(n, k * d)
    torch.testing.assert_close(features, expected)
    # stacked frame i holds 10 ms frames 3i, 3i+1, 3i+2 side by side
    torch.testing.assert_close(features[5, d : 2 * d], (raw[16] - norm.mean) / norm.std)
    # the identity normaliser really is a no-op, the random one is not
    assert not torch.allclose(MfccExtractor(CFG)(signal), features)


@pytest.mark.parametrize("n_samples", [0, 1, 399, 400, 559, 560, 719, 720, 879, 1040, 16000, 16001, 23456])
def test_frame_counts(n_samples: int) -> None:
    cfg = FeatureConfig()
    assert (cfg.window_samples, cfg.hop_samples, cfg.feature_dim, cfg.frame_ms) == (400, 160, 120, 30.0)
    assert cfg.min_samples == 720
    wave = torch.from_numpy(np.random.default_rng(n_samples).standard_normal(n_samples).astype(np.float32))
    extractor = MfccExtractor(cfg)
    raw = extractor.raw_mfcc(wave)
    n_raw = 0 if n_samples < 400 else 1 + (n_samples - 400) // 160
    assert raw.shape == (n_raw, cfg.n_mfcc)
    feats = extractor(wave)
    assert feats.shape == (expected_frames(n_samples, cfg), cfg.feature_dim)
    assert (feats.shape[0] >= 1) == (n_samples >= cfg.min_samples)
    assert torch.isfinite(feats).all()


def test_each_frame_depends_only_on_its_window() -> None:
    """No centre padding: changing samples after frame k's window leaves frame k unchanged."""
    cfg = FeatureConfig(stack_frames=1)
    extractor = MfccExtractor(cfg)
    a = make_signal(4, 0.5)
    b = a.clone()
    b[2000:] = torch.randn(b.numel() - 2000)
    fa, fb = extractor(a), extractor(b)
    last_clean = (2000 - cfg.window_samples) // cfg.hop_samples  # frame whose window ends at or before 2000
    torch.testing.assert_close(fa[: last_clean + 1], fb[: last_clean + 1])
    assert not torch.allclose(fa[last_clean + 1], fb[last_clean + 1])


def test_streaming_short_chunks_emit_nothing_until_a_frame_is_complete() -> None:
    streamer = StreamingFeatures(MfccExtractor(CFG))
    state = streamer.initial_state()
    signal = make_signal(8, 0.1)
    out, state = streamer.online_inference(signal[: CFG.min_samples - 1], state)
    assert out.shape == (0, CFG.feature_dim)
    out, state = streamer.online_inference(signal[CFG.min_samples - 1 : CFG.min_samples], state)
    assert out.shape == (1, CFG.feature_dim)
    out, state = streamer.online_inference(torch.zeros(0), state)
    assert out.shape == (0, CFG.feature_dim)


def test_streaming_states_are_independent() -> None:
    """Two interleaved streams through one extractor each equal their own offline features."""
    streamer = StreamingFeatures(EXTRACTOR)
    a, b = make_signal(21, 1.0), make_signal(22, 0.7)
    sa, sb = streamer.initial_state(), streamer.initial_state()
    outs_a, outs_b = [], []
    for start in range(0, 16000, 1234):
        y, sa = streamer.online_inference(a[start : start + 1234], sa)
        outs_a.append(y)
        y, sb = streamer.online_inference(b[start : start + 1234], sb)
        outs_b.append(y)
    torch.testing.assert_close(torch.cat(outs_a), EXTRACTOR(a), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(outs_b), EXTRACTOR(b), atol=1e-4, rtol=0)


def test_normalizer_from_frames_gives_zero_mean_unit_std() -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 20, 40)
    offset = torch.linspace(-50, 50, 40)
    batches = [torch.randn(n, 40, generator=g) * scale + offset for n in (50, 120, 7, 300)]
    norm = Normalizer.from_frames(batches)
    assert norm.mean.shape == norm.std.shape == (40,)
    assert norm.mean.dtype == norm.std.dtype == torch.float32
    normalized = norm(torch.cat(batches))
    torch.testing.assert_close(normalized.mean(0), torch.zeros(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized.std(0), torch.ones(40), atol=1e-4, rtol=0)


def test_normalizer_constant_dimension_does_not_divide_by_zero() -> None:
    frames = torch.randn(100, 3)
    frames[:, 1] = 4.0
    norm = Normalizer.from_frames([frames])
    assert torch.isfinite(norm(frames)).all()
    assert float(norm.std[1]) > 0


def test_identity_normalizer() -> None:
    x = torch.randn(10, 5)
    torch.testing.assert_close(Normalizer.identity(5)(x), x)
