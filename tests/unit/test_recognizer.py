"""In-process recognizer: streaming equals chunked offline; endpointing; the offline file path."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import NO_VAD

from workers.audio.reader import AudioError
from workers.decoding.decoder import DecoderConfig, Hypothesis
from workers.recognizer import Recognizer, StreamingRecognizer
from workers.stages import DecoderStage


def _signal(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _stream(rec: StreamingRecognizer, wave: np.ndarray, seed: int, rate_hz: int = 16000):
    rng = np.random.default_rng(seed)
    partials, start = [], 0
    while start < len(wave):
        size = int(rng.integers(1, 4000))
        partials += rec.push(wave[start : start + size], rate_hz)
        start += size
    return partials, rec.finish()


@pytest.mark.parametrize("kind", ["greedy", "beam"])
@pytest.mark.parametrize("chunk_ms,lookahead_ms", [(300, 150), (90, 60), (600, 0)])
def test_streaming_final_equals_chunked_offline(tiny_bundle_lm, tmp_path, kind, chunk_ms, lookahead_ms):
    wave = _signal(2.3, seed=chunk_ms)
    path = tmp_path / "a.wav"
    sf.write(path, wave, 16000)
    decoder = DecoderConfig(kind=kind, beam_size=8, unk_score=0.0)
    offline = Recognizer(tiny_bundle_lm, decoder, chunk_ms=chunk_ms, lookahead_ms=lookahead_ms, vad=NO_VAD).transcribe_file(path)
    rec = StreamingRecognizer(tiny_bundle_lm, decoder, chunk_ms, lookahead_ms, vad=NO_VAD)
    partials, finals = _stream(rec, wave, seed=1)
    assert [r.is_final for r in finals] == [True]
    assert finals[0].text == offline.text
    assert [w.word for w in finals[0].words] == [w.word for w in offline.words]
    assert all(not r.is_final for r in partials) and partials
    assert finals[0].end_s == pytest.approx(offline.duration_s, abs=0.031)
    # The recognizer is reusable: the same audio again gives the same result.
    assert _stream(rec, wave, seed=2)[1][0].text == offline.text


def test_full_utterance_mode_equals_chunk_longer_than_utterance(tiny_bundle, tmp_path):
    path = tmp_path / "b.wav"
    sf.write(path, _signal(1.5, seed=3), 16000)
    full = Recognizer(tiny_bundle, DecoderConfig(kind="greedy"), vad=NO_VAD).transcribe_file(path)
    chunked = Recognizer(tiny_bundle, DecoderConfig(kind="greedy"), chunk_ms=10_000, lookahead_ms=300, vad=NO_VAD).transcribe_file(path)
    assert full.text == chunked.text


def test_streaming_accepts_other_rates(tiny_bundle):
    wave8k = _signal(1.0, seed=4)[::2].copy()
    rec = StreamingRecognizer(tiny_bundle, DecoderConfig(kind="greedy"))
    _, finals = _stream(rec, wave8k, seed=5, rate_hz=8000)
    assert len(finals) == 1 and finals[0].end_s == pytest.approx(0.99, abs=0.04)


def test_transcribe_file_bad_input_names_file(tiny_bundle, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(AudioError, match="bad.wav"):
        Recognizer(tiny_bundle, DecoderConfig(kind="greedy")).transcribe_file(bad)


class _ScriptedDecoder:
    """Greedy-like stand-in that records what each utterance received."""

    frame_ms = 30.0

    def begin(self):
        return []

    def step(self, state, emissions):
        state.append(emissions)
        return Hypothesis(str(sum(len(e) for e in state)), [], 0.0)

    def end(self, state):
        return Hypothesis(str(sum(len(e) for e in state)), [], 0.0)


def _frames(tokens: list[int]) -> torch.Tensor:
    out = torch.full((len(tokens), 29), -20.0)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
    return out


def test_endpointing_splits_utterances_with_times():
    stage = DecoderStage(_ScriptedDecoder(), endpoint_silence_ms=300)  # 10 frames
    speech, silence = [5, 5, 0, 6], [0] * 12
    results = stage.push("s", _frames(speech + silence + speech + [0, 0]), is_last=True)
    finals = [r for r in results if r.is_final]
    assert len(finals) == 2
    # The first utterance ends once 10 non-speech frames followed its last letter (frame 3).
    assert finals[0].text == "14" and finals[0].start_s == 0.0 and finals[0].end_s == pytest.approx(14 * 0.03)
    assert finals[1].start_s == pytest.approx(14 * 0.03) and finals[1].end_s == pytest.approx(22 * 0.03)
    # Without endpointing there is one final over everything.
    single = DecoderStage(_ScriptedDecoder(), 0).push("s", _frames(speech + silence + speech), is_last=True)
    assert [r.is_final for r in single] == [True] and single[0].text == "20"
