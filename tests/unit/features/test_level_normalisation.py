"""Causal running cepstral mean: streaming still equals offline, on real speech at several
input levels, and a change of level stops mattering once the running mean has caught up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.audio.reader import load_audio
from workers.data.augment import apply_gain
from workers.features.mfcc import FeatureConfig, MfccExtractor, Normalizer, StreamingFeatures

AN4 = Path(__file__).resolve().parents[4] / "shared" / "data" / "an4"

CAUSAL = FeatureConfig(cmn_prior_frames=50)
# statistics of the order of real AN4 MFCCs, so the prior pulls like the shipped model's
NORMALIZER = Normalizer(mean=torch.linspace(-20.0, 2.0, 40), std=torch.linspace(20.0, 2.0, 40))
UTTERANCES = ["mcfl/an261-mcfl-b.raw", "fbbh/an86-fbbh-b.raw", "mtos/an366-mtos-b.raw"]


def an4_wave(name: str) -> torch.Tensor:
    path = AN4 / "wav" / "an4_clstk" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return load_audio(path)


def stream(extractor: MfccExtractor, wave: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    streamer = StreamingFeatures(extractor)
    state, out, pos, k = streamer.initial_state(), [], 0, 0
    while pos < wave.numel():
        size = sizes[k % len(sizes)]
        feats, state = streamer.online_inference(wave[pos : pos + size], state)
        out.append(feats)
        pos, k = pos + size, k + 1
    return torch.cat(out)


@settings(max_examples=12, deadline=None)
@given(
    utt=st.sampled_from(UTTERANCES),
    gain_db=st.sampled_from([-35.0, -20.0, 0.0, 10.0]),
    sizes=st.lists(st.integers(80, 8000), min_size=1, max_size=12),  # 1-sample chunks: tests/test_features.py
)
def test_streaming_equals_offline_on_real_speech_at_any_level(utt: str, gain_db: float, sizes: list[int]) -> None:
    wave = apply_gain(an4_wave(utt), gain_db)
    extractor = MfccExtractor(CAUSAL, NORMALIZER)
    offline = extractor(wave)
    online = stream(extractor, wave, sizes)
    assert online.shape == offline.shape and offline.shape[0] > 20
    assert float((online - offline).abs().max()) <= 1e-4


def test_causal_mean_uses_no_future_frames() -> None:
    """Frame t of the offline output is unchanged when everything after t is replaced."""
    wave = torch.cat([an4_wave(u) for u in UTTERANCES])
    assert wave.numel() > 2 * 16000
    extractor = MfccExtractor(CAUSAL, NORMALIZER)
    full = extractor(wave)
    cut = wave.clone()
    cut[16000:] = torch.randn(cut.numel() - 16000) * 0.5
    changed = extractor(cut)
    first_frames = (16000 - 400) // 160 // 3  # model frames whose windows end before the cut
    assert torch.allclose(full[:first_frames], changed[:first_frames], atol=1e-5)
    assert not torch.allclose(full[first_frames + 5 :], changed[first_frames + 5 :], atol=1e-2)


def test_causal_mean_starts_from_the_global_mean() -> None:
    """Frame 0 is centred on (prior * global mean + frame 0) / (prior + 1)."""
    frames = torch.randn(10, 40) * 5
    out, state = NORMALIZER.causal(frames, NORMALIZER.initial_state(), 50.0)
    expected0 = (frames[0] - (50 * NORMALIZER.mean + frames[0]) / 51) / NORMALIZER.std
    torch.testing.assert_close(out[0], expected0)
    assert state.count == 60
    torch.testing.assert_close(state.mean, (50 * NORMALIZER.mean.double() + frames.double().sum(0)) / 60)


@pytest.mark.parametrize("gain_db", [-35.0, -20.0, 10.0])
def test_level_change_is_removed_where_global_normalisation_keeps_it(gain_db: float) -> None:
    """After 1.5 s the level coefficient (c0 of each stacked sub-frame) of a quieter/louder copy is far
    closer to the original's than with global normalisation (the +10 dB copy clips, the -35 dB one
    hits the log floor, so neither is a pure shift)."""
    wave = torch.cat([an4_wave(u) for u in UTTERANCES])
    scaled = apply_gain(wave, gain_db)
    late = slice(50, None)  # model frames after 1.5 s
    causal = MfccExtractor(CAUSAL, NORMALIZER)
    global_ = MfccExtractor(FeatureConfig(), NORMALIZER)
    c0 = slice(None, None, CAUSAL.n_mfcc)
    causal_gap = (causal(scaled) - causal(wave))[late, c0].abs().mean()
    global_gap = (global_(scaled) - global_(wave))[late, c0].abs().mean()
    assert causal_gap < 0.5 * global_gap, (float(causal_gap), float(global_gap))


def test_global_mode_is_unchanged_by_the_new_setting() -> None:
    """cmn_prior_frames=0 (bundles trained before it existed) normalises exactly as before."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(16000).astype(np.float32)) * 0.1
    extractor = MfccExtractor(FeatureConfig(), NORMALIZER)
    expected = extractor.stack((extractor.raw_mfcc(x) - NORMALIZER.mean) / NORMALIZER.std)
    torch.testing.assert_close(extractor(x), expected)


def test_negative_prior_is_rejected() -> None:
    with pytest.raises(ValueError, match="cmn_prior_frames"):
        FeatureConfig(cmn_prior_frames=-1)


def test_a_low_log_floor_keeps_quiet_input_out_of_the_floor() -> None:
    """35 dB below AN4's level, mel energies fall under torchaudio's 1e-6 floor and the cepstra
    (beyond c0) change shape; with ``log_floor=1e-10`` they stay those of the original."""
    wave = torch.cat([an4_wave(u) for u in UTTERANCES])
    quiet = apply_gain(wave, -35.0)
    gaps = {}
    for floor in (1e-6, 1e-10):
        extractor = MfccExtractor(FeatureConfig(cmn_prior_frames=50, log_floor=floor), NORMALIZER)
        diff = extractor(quiet) - extractor(wave)
        shape = [k for k in range(diff.shape[1]) if k % 40]  # every coefficient but the c0s
        gaps[floor] = float(diff[50:, shape].abs().mean())
    assert gaps[1e-10] < 0.1 * gaps[1e-6], gaps
    with pytest.raises(ValueError, match="log_floor"):
        FeatureConfig(log_floor=0.0)


@pytest.mark.parametrize("gain_db", [-35.0, 0.0, 10.0])
def test_shipped_model_streams_exactly_as_chunked_offline_at_any_level(gain_db: float) -> None:
    """End to end with the shipped model (causal normalisation): the streaming recogniser's
    final equals latency-controlled offline decoding of the same audio, at every input level."""
    from workers.decoding.decoder import DecoderConfig
    from workers.model.bundle import DEFAULT_BUNDLE, load_bundle
    from workers.recognizer import Recognizer, StreamingRecognizer

    if not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("no shipped model")
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert bundle.features.cmn_prior_frames > 0  # the property under test, not the old global mode
    wave = apply_gain(torch.cat([an4_wave(u) for u in UTTERANCES]), gain_db)
    decoder = DecoderConfig(kind="beam")
    offline = Recognizer(bundle, decoder, chunk_ms=300, lookahead_ms=150).transcribe_wave(wave)
    rec = StreamingRecognizer(bundle, decoder, 300, 150)
    rng = np.random.default_rng(int(gain_db) + 50)
    pos = 0
    while pos < wave.numel():
        size = int(rng.integers(100, 5000))
        rec.push(wave[pos : pos + size], 16000)
        pos += size
    (final,) = rec.finish()
    assert final.text == offline.text and len(offline.words) >= 5
    assert [(w.word, round(w.start_s, 3)) for w in final.words] == [(w.word, round(w.start_s, 3)) for w in offline.words]


def test_digital_silence_does_not_drag_the_mean() -> None:
    """Seconds of digital zeros before speech (a muted microphone, a padded file) leave the
    speech's features as they are without them; only the causal mean's prior sees the gap."""
    speech = torch.cat([an4_wave(u) for u in UTTERANCES])
    extractor = MfccExtractor(FeatureConfig(cmn_prior_frames=50, log_floor=1e-10), NORMALIZER)
    alone = extractor(speech)
    zeros = torch.zeros(266 * 480)  # ~8 s, a whole number of 30 ms model frames: the frames line up
    after_zeros = extractor(torch.cat([zeros, speech]))[-alone.shape[0] :]
    no_skip = MfccExtractor(FeatureConfig(cmn_prior_frames=50, log_floor=1e-10, cmn_silence_std=0.0), NORMALIZER)
    dragged = no_skip(torch.cat([zeros, speech]))[-alone.shape[0] :]
    c0 = slice(None, None, 40)
    # (the two 10 ms frames whose windows straddle the zeros and the speech do count: a trace)
    assert float((after_zeros - alone)[:, c0].abs().mean()) < 0.05
    assert float((dragged - alone)[:, c0].abs().mean()) > 1.0  # what the skip prevents


def test_late_level_change_is_absorbed_in_a_long_stream() -> None:
    """After a minute of speech the mean still follows a 20 dB drop within ~10 s (cmn_max_frames),
    where a mean over everything since the start would barely move."""
    speech = torch.cat([an4_wave(u) for u in UTTERANCES])
    first = speech.repeat(int(60 * 16000 / speech.numel()) + 1)
    later = apply_gain(speech.repeat(6), -20.0)  # ~30 s
    capped = MfccExtractor(FeatureConfig(cmn_prior_frames=50, log_floor=1e-10), NORMALIZER)
    uncapped = MfccExtractor(FeatureConfig(cmn_prior_frames=50, log_floor=1e-10, cmn_max_frames=1e9), NORMALIZER)
    reference = capped(later)[-200:, ::40].mean()  # the quiet part's level as a fresh stream sees it
    tail = slice(-200, None)
    gap_capped = (capped(torch.cat([first, later]))[tail, ::40].mean() - reference).abs()
    gap_uncapped = (uncapped(torch.cat([first, later]))[tail, ::40].mean() - reference).abs()
    assert gap_capped < 0.25 * gap_uncapped, (float(gap_capped), float(gap_uncapped))


def test_capped_mean_streams_exactly_past_the_cap() -> None:
    speech = torch.cat([an4_wave(u) for u in UTTERANCES])
    wave = torch.cat([speech, torch.zeros(16000), apply_gain(speech, -20.0)])
    extractor = MfccExtractor(FeatureConfig(cmn_prior_frames=50, cmn_max_frames=200, log_floor=1e-10), NORMALIZER)
    offline = extractor(wave)
    online = stream(extractor, wave, [1234, 80, 4000, 333])
    assert offline.shape == online.shape and offline.shape[0] > 3 * 200 // 3
    assert float((online - offline).abs().max()) <= 1e-4


def test_many_streams_at_once_get_exactly_what_each_gets_alone() -> None:
    """``StreamingFeatures.online_many`` (the feature actor's batches: the MFCC of equal-length
    pieces and the running means of equal frame counts as one batch each) gives every stream
    the very numbers ``online_inference`` gives it alone: streams at several levels, one with
    digital silence, crossing the cap of the running mean (``cmn_max_frames``) at different
    times, with pushes of random and equal sizes, some empty, one shorter than a window."""
    speech = torch.cat([an4_wave(u) for u in UTTERANCES])
    waves = [speech, apply_gain(speech, -30.0), torch.cat([torch.zeros(9000), apply_gain(torch.flip(speech, [0]), 8.0)]),
             speech[20000:], speech[:300]]
    extractor = MfccExtractor(FeatureConfig(cmn_prior_frames=50, cmn_max_frames=120, log_floor=1e-10), NORMALIZER)
    streamer = StreamingFeatures(extractor)
    together = [streamer.initial_state() for _ in waves]
    alone = [streamer.initial_state() for _ in waves]
    rng = np.random.default_rng(7)
    position = [0] * len(waves)
    pushes = 0
    while any(p < len(w) for p, w in zip(position, waves)):
        sizes = [1600] * len(waves) if pushes % 2 else [int(n) for n in rng.integers(0, 4000, len(waves))]
        chunks = [w[p : p + n] for w, p, n in zip(waves, position, sizes)]
        position = [p + n for p, n in zip(position, sizes)]
        batch = streamer.online_many(chunks, together)
        for i, chunk in enumerate(chunks):
            want, alone[i] = streamer.online_inference(chunk, alone[i])
            got, together[i] = batch[i]
            assert torch.equal(got, want), (pushes, i)
            a, b = together[i].cmn, alone[i].cmn
            assert a.count == b.count and (a.mean is b.mean is None or torch.equal(a.mean, b.mean)), (pushes, i)
        pushes += 1
    assert all(s.cmn.count == 120 for s in together[:4])  # every long stream went past the cap
    assert pushes > 20
