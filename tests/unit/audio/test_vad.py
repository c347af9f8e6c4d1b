"""Voice activity detection (silero-vad): speech found at any level, none in silence or noise,
chunked equals whole, and the recognisers emit no words where nobody speaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers.audio.reader import load_audio
from workers.audio.vad import WINDOW_S, SpeechDetector, VadConfig, keep_spoken_words, pause_cuts
from workers.data.augment import apply_gain, colored_noise
from workers.decoding.decoder import DecoderConfig, WordTiming
from workers.recognizer import Recognizer, StreamingRecognizer

AN4 = Path(__file__).resolve().parents[4] / "shared" / "data" / "an4"
SPEAKERS = ("fbbh", "mcfl", "mtos", "ftal")  # held-out dev speakers of the shipped model


@pytest.fixture(scope="module")
def detector() -> SpeechDetector:
    return SpeechDetector()


@pytest.fixture(scope="module")
def speech_waves() -> list[torch.Tensor]:
    files = [sorted((AN4 / "wav" / "an4_clstk" / s).glob("*.raw"))[:2] for s in SPEAKERS]
    files = [f for group in files for f in group]
    if not files:
        pytest.skip("AN4 not present")
    return [load_audio(f) for f in files]


@pytest.mark.parametrize("gain_db", [-35.0, -20.0, 0.0, 10.0])
def test_speech_is_found_at_every_level(detector: SpeechDetector, speech_waves: list[torch.Tensor], gain_db: float) -> None:
    shares = [float(detector.speech(apply_gain(w, gain_db)).float().mean()) for w in speech_waves]
    assert min(shares) > 0.2, shares  # every utterance has speech windows
    assert np.mean(shares) > 0.5, shares  # AN4 utterances are mostly speech


@pytest.mark.parametrize("level_dbfs", [None, -90.0, -60.0, -40.0, -20.0])
@pytest.mark.parametrize("exponent", [0.0, 1.0])
def test_no_speech_in_silence_or_noise(detector: SpeechDetector, level_dbfs: float | None, exponent: float) -> None:
    gen = torch.Generator().manual_seed(7)
    wave = torch.zeros(5 * 16000) if level_dbfs is None else colored_noise(5 * 16000, exponent, gen) * 10 ** (level_dbfs / 20)
    assert int(detector.speech(wave).sum()) == 0


def test_chunked_equals_whole(detector: SpeechDetector, speech_waves: list[torch.Tensor]) -> None:
    wave = torch.cat(speech_waves[:3])
    whole = detector.probabilities(wave)
    rng = np.random.default_rng(0)
    state, parts, pos = detector.initial_state(), [], 0
    while pos < wave.numel():
        size = int(rng.integers(1, 3000))
        probs, state = detector.online(wave[pos : pos + size], state)
        parts.append(probs)
        pos += size
    chunked = torch.cat(parts)
    assert chunked.shape == whole.shape == (wave.numel() // 512,)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_keep_spoken_words_keeps_words_near_speech_only() -> None:
    speech = torch.zeros(100, dtype=torch.bool)
    speech[30:40] = True  # 0.96 .. 1.28 s
    words = [WordTiming("before", 0.1, 0.3), WordTiming("near", 0.6, 0.8), WordTiming("in", 1.0, 1.2),
             WordTiming("after", 1.5, 1.6), WordTiming("far", 2.5, 2.9)]
    kept = keep_spoken_words(words, speech, pad_ms=300)
    assert [w.word for w in kept] == ["near", "in", "after"]
    assert keep_spoken_words(words, torch.zeros(100, dtype=torch.bool), 300) == []
    assert WINDOW_S == pytest.approx(0.032)


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="threshold"):
        VadConfig(threshold=1.5)
    with pytest.raises(ValueError, match="pad_ms"):
        VadConfig(pad_ms=-1)


def test_recogniser_drops_words_without_speech(tiny_bundle) -> None:
    """The untrained model babbles letters on noise; with the detector on nothing is emitted."""
    gen = torch.Generator().manual_seed(3)
    noise = colored_noise(3 * 16000, 1.0, gen) * 0.01
    ungated = Recognizer(tiny_bundle, DecoderConfig(kind="greedy"), vad=VadConfig(enabled=False)).transcribe_wave(noise)
    gated = Recognizer(tiny_bundle, DecoderConfig(kind="greedy")).transcribe_wave(noise)
    assert ungated.text  # precondition: there is something to drop
    assert gated.text == "" and gated.words == []


def _frames(tokens: list[int]) -> torch.Tensor:
    out = torch.full((len(tokens), 29), -20.0)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
    return out


def test_decoder_stage_drops_words_the_detector_did_not_hear() -> None:
    """Scripted CTC frames spell "a b c" at 0.03-0.06 s, 1.5 s and 3.0 s; speech is flagged only
    around 1.5 s, so partials and the final keep "b" alone; without flags nothing is dropped."""
    from workers.decoding.decoder import CtcDecoder
    from workers.stages import DecoderStage

    a, b, c, sep = 3, 4, 5, 1
    tokens = [0, a, 0, sep] + [0] * 46 + [b, 0, sep] + [0] * 47 + [c, 0, sep] + [0] * 10  # 30 ms frames
    speech = torch.zeros(150, dtype=torch.bool)  # 32 ms windows
    speech[45:49] = True  # 1.44 .. 1.57 s
    stage = DecoderStage(CtcDecoder(DecoderConfig(kind="greedy"), 30.0), vad_pad_ms=100)
    results = stage.push("s", _frames(tokens[:60]), speech=speech[:70])
    results += stage.push("s", _frames(tokens[60:]), is_last=True, speech=speech[70:])
    assert results[-1].is_final and results[-1].text == "b" and [w.word for w in results[-1].words] == ["b"]
    assert all("a" not in r.text.split() for r in results)
    ungated = DecoderStage(CtcDecoder(DecoderConfig(kind="greedy"), 30.0)).push("s", _frames(tokens), is_last=True)
    assert ungated[-1].text == "a b c"
    assert stage.stream_count == 0 and not stage._speech  # the stream's flags are freed with it


def test_streaming_with_vad_equals_offline_with_vad_on_speech(speech_waves: list[torch.Tensor]) -> None:
    """Real speech with silence and faint noise between: the streaming recogniser (shipped model)
    keeps exactly the words the offline one keeps."""
    from workers.model.bundle import DEFAULT_BUNDLE, load_bundle

    if not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("no shipped model")
    bundle = load_bundle(DEFAULT_BUNDLE)
    gen = torch.Generator().manual_seed(0)
    gap = colored_noise(16000 * 2, 0.0, gen) * 1e-3
    wave = torch.cat([speech_waves[0], gap, speech_waves[2], torch.zeros(16000), speech_waves[4]])
    for kind in ("greedy", "beam"):
        decoder = DecoderConfig(kind=kind)
        offline = Recognizer(bundle, decoder, chunk_ms=300, lookahead_ms=150).transcribe_wave(wave)
        rec = StreamingRecognizer(bundle, decoder, 300, 150)
        for start in range(0, wave.numel(), 1234):
            rec.push(wave[start : start + 1234], 16000)
        (final,) = rec.finish()
        assert final.text == offline.text
        assert [w.word for w in final.words] == [w.word for w in offline.words]
        assert len(offline.words) >= 3  # real words came through the gate


def test_pause_cuts_tile_the_recording_and_cut_in_pauses() -> None:
    w = int(round(1 / WINDOW_S))  # windows per second
    speech = torch.zeros(60 * w, dtype=torch.bool)
    speech[1 * w : 4 * w] = True  # utterance 1
    speech[4 * w + 3 : 9 * w] = True  # a 0.1 s gap inside it: not a pause
    speech[10 * w : 50 * w] = True  # 40 s without a pause
    pieces = pause_cuts(speech, max_segment_s=15, min_pause_s=0.35)
    assert pieces[0][0] == 0 and pieces[-1][1] == speech.numel()
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no gaps or overlaps
    assert all(end - start <= int(15 / WINDOW_S) for start, end in pieces)
    cuts = [end for _, end in pieces[:-1]]
    assert not any(4 * w <= c <= 4 * w + 3 for c in cuts)  # the short gap is not cut
    assert any(9 * w < c < 10 * w for c in cuts)  # the 1 s pause is
    assert pause_cuts(torch.zeros(0, dtype=torch.bool), 15, 0.35) == [(0, 0)]


def test_long_recording_is_recognised_piece_by_piece(speech_waves: list[torch.Tensor]) -> None:
    """Utterances joined with pauses into one long recording: cut at the pauses, the words and
    their order are those of the separate files far more often than decoding it whole."""
    import dataclasses

    import jiwer

    from workers.model.bundle import DEFAULT_BUNDLE, load_bundle

    if not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("no shipped model")
    bundle = load_bundle(DEFAULT_BUNDLE)
    rec = Recognizer(bundle, DecoderConfig(kind="beam"), vad=VadConfig(max_segment_s=5.0))
    gen = torch.Generator().manual_seed(0)
    parts = []
    for w in speech_waves:
        parts += [w, torch.zeros(int(16000 * (0.3 + 0.5 * float(torch.rand(1, generator=gen)))))]
    long = torch.cat(parts)
    assert rec.is_long(long) and not rec.is_long(speech_waves[0])
    separate = " ".join(rec.transcribe_wave(w).text for w in speech_waves)
    pieces = rec.transcribe_wave(long)
    whole = Recognizer(bundle, DecoderConfig(kind="beam"), vad=VadConfig(max_segment_s=1e6)).transcribe_wave(long)
    assert pieces.duration_s == pytest.approx(long.numel() / 16000)
    starts = [w.start_s for w in pieces.words]
    assert starts == sorted(starts) and 0 <= starts[0] and pieces.words[-1].end_s <= pieces.duration_s
    assert jiwer.wer(separate, pieces.text) <= 0.75 * jiwer.wer(separate, whole.text)  # shipped model: 0.15 against 0.25
    assert dataclasses.replace(VadConfig(), max_segment_s=5.0).max_segment_s == 5.0


def test_decoder_stage_keeps_only_recent_flags_on_long_streams() -> None:
    """With endpointing, flags older than the current utterance (minus the pad) are dropped, and
    words of later utterances are still judged against the right windows; an utterance whose
    words were all gated out gives no (empty) final."""
    from workers.decoding.decoder import CtcDecoder
    from workers.stages import DecoderStage

    a, sep = 3, 1
    utterance = [0, a, 0, sep] + [0] * 40  # "a", then 1.2 s of blanks: an endpoint (300 ms)
    stage = DecoderStage(CtcDecoder(DecoderConfig(kind="greedy"), 30.0), endpoint_silence_ms=300, vad_pad_ms=100)
    finals = []
    for k in range(20):
        windows = int(len(utterance) * 30 / 32)
        flags = torch.zeros(windows, dtype=torch.bool)
        if k % 2 == 0:
            flags[:6] = True  # speech at the start of even utterances only
        finals += [r for r in stage.push("s", _frames(utterance), speech=flags) if r.is_final]
    assert [r.text for r in finals] == ["a"] * 10
    assert [int(r.words[0].start_s // (len(utterance) * 0.03)) for r in finals] == list(range(0, 20, 2))
    assert stage._speech["s"].size < 3 * len(utterance)  # bounded, not 20 utterances' worth
    assert stage._speech_from["s"] > 0


def test_detector_refuses_other_rates() -> None:
    with pytest.raises(ValueError, match="16000 Hz"):
        SpeechDetector(VadConfig(), rate_hz=8000)


def test_many_streams_at_once_get_what_each_gets_alone(detector: SpeechDetector, speech_waves: list[torch.Tensor]) -> None:
    """``online_many`` (one model batch per window position, as the feature actor runs its
    streams): real speech at three levels plus a stream too short for a window, cut at random
    and interleaved, gives each stream the probabilities it gets alone (to 1e-6) and the same
    flags; ``FeatureStage.push_many`` likewise gives each stream its own MFCC and flags, exactly."""
    from workers.features.config import FeatureConfig
    from workers.features.mfcc import MfccExtractor
    from workers.stages import FeatureStage

    waves = [speech_waves[0], apply_gain(speech_waves[1], -30.0), apply_gain(speech_waves[2], 6.0), speech_waves[0][:300]]
    alone = [detector.probabilities(w) for w in waves]
    rng = np.random.default_rng(4)
    states = [detector.initial_state() for _ in waves]
    got: list[list[torch.Tensor]] = [[] for _ in waves]
    stage, reference = (FeatureStage(MfccExtractor(FeatureConfig()), detector) for _ in range(2))
    ids = [f"s{i}" for i in range(len(waves))]
    staged: list[list[torch.Tensor]] = [[] for _ in waves]
    expected: list[list[torch.Tensor]] = [[] for _ in waves]
    position = [0] * len(waves)
    while any(p < len(w) for p, w in zip(position, waves)):
        chunks = []
        for i, w in enumerate(waves):
            n = int(rng.integers(0, 4000))
            chunks.append(w[position[i] : position[i] + n])
            position[i] += n
        for i, (probs, state) in enumerate(detector.online_many(chunks, states)):
            got[i].append(probs)
            states[i] = state
        for i, out in enumerate(stage.push_many(list(zip(ids, chunks)))):
            staged[i].append(torch.cat([out.features.flatten(), out.speech.float()]))
            want = reference.push(ids[i], chunks[i])
            expected[i].append(torch.cat([want.features.flatten(), want.speech.float()]))
    for want, pieces in zip(alone, got):
        probs = torch.cat(pieces)
        assert probs.shape == want.shape
        assert torch.allclose(probs, want, atol=1e-6, rtol=0)
        assert torch.equal(probs > detector.config.threshold, want > detector.config.threshold)
    for mine, theirs in zip(staged, expected):
        assert torch.equal(torch.cat(mine), torch.cat(theirs))
    assert len(alone[3]) == 0 and len(alone[0]) > 50
    with pytest.raises(ValueError, match="one push per stream"):
        stage.push_many([("s0", waves[0][:512]), ("s0", waves[0][:512])])


def _window_by_window(detector: SpeechDetector, wave: torch.Tensor) -> torch.Tensor:
    """silero's network called once per 32 ms window, as its own streaming API does (the reference
    the batched path must equal): the level-normalised window after 64 samples of the previous one."""
    from workers.audio.vad import WINDOW_SAMPLES

    cfg, model = detector.config, detector.model
    context, state, peak, probs = torch.zeros(detector.context_samples), torch.zeros(2, 1, 128), 0.0, []
    with torch.no_grad():
        for k in range(wave.numel() // WINDOW_SAMPLES):
            raw = wave[k * WINDOW_SAMPLES : (k + 1) * WINDOW_SAMPLES]
            peak = max(peak, float(raw.abs().max()))
            window = raw * min(10 ** (cfg.max_gain_db / 20), cfg.target_peak / max(peak, 1e-9))
            prob, state = model(torch.cat([context, window])[None], state)
            probs.append(float(prob))
            context = window[-detector.context_samples :]
    return torch.tensor(probs)


def test_batched_network_equals_the_network_window_by_window(detector: SpeechDetector, speech_waves: list[torch.Tensor]) -> None:
    """The encoder batched over all windows and the LSTM run as one sequence give silero's own
    window-by-window probabilities (float rounding only), whole, in 100 ms chunks and for several
    streams at once (a quiet one among them, so the level normalisation's gain is exercised)."""
    waves = [*speech_waves[:3], apply_gain(speech_waves[3], -35.0)]
    expected = [_window_by_window(detector, w) for w in waves]
    for w, ref in zip(waves, expected):
        assert torch.allclose(detector.probabilities(w), ref, atol=1e-5)
        state, parts = detector.initial_state(), []
        for start in range(0, w.numel(), 1600):
            probs, state = detector.online(w[start : start + 1600], state)
            parts.append(probs)
        assert torch.allclose(torch.cat(parts), ref, atol=1e-5)
    many = detector.speech_many(waves)
    assert [m.tolist() for m in many] == [(ref > detector.config.threshold).tolist() for ref in expected]
    assert detector.speech_many([]) == [] and detector.speech_many([torch.zeros(100)])[0].numel() == 0
