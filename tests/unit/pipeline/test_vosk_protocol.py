"""``pipeline.serve.protocol`` without a server: which frames may change the result."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.serve.protocol import ChunkClock
from workers.audio.reader import read_audio
from workers.data.corpus import read_an4, split_by_speaker
from workers.recognizer import StreamingRecognizer

CONFIG = load_config()


@pytest.mark.parametrize(("rate_hz", "frame_s"), [(16000, 0.1), (16000, 0.2), (8000, 0.25), (8000, 0.1), (16000, 0.037)])
def test_the_clock_flags_every_frame_that_yields_log_probs(an4_root, rate_hz: int, frame_s: float) -> None:
    """Fed to the in-process recogniser frame by frame, every frame after which the acoustic
    model emitted log-probs was flagged by the clock (no reply that should have waited
    would skip the wait), and most frames that emitted none were not (the clock saves waits).
    The clock serves streams that are one utterance (no voice activity endpointing: with it,
    ``asr serve`` has no clock and every reply waits)."""
    import torch
    import torchaudio

    s = CONFIG.streaming
    rec = StreamingRecognizer(None, CONFIG.decoder, s.chunk_ms, s.lookahead_ms, 0.0, s.ingest_chunk_ms, device="cpu")
    emitted: list[int] = []
    process = rec.acoustic.process_events
    rec.acoustic.process_events = lambda items: [emitted.append(len(out[0])) or out for out in process(items)]
    feats = rec.bundle.features
    clock = ChunkClock(rec.acoustic.chunk_frames * feats.frame_ms, rec.acoustic.right_context_frames * feats.frame_ms, feats.frame_ms,
                       1000 * feats.min_samples / feats.sample_rate_hz, s.ingest_chunk_ms)
    _, dev = split_by_speaker(read_an4(an4_root).utterances, CONFIG.data.an4_dev_speakers)
    audio = np.concatenate([read_audio(u.audio)[0][:, 0] for u in sorted(dev, key=lambda u: u.id)[:3]])
    if rate_hz != 16000:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), 16000, rate_hz).numpy()
    n = int(rate_hz * frame_s)
    flagged = emitting = saved = 0
    for start in range(0, len(audio), n):
        emitted.clear()
        rec.push(audio[start : start + n], rate_hz)
        wait = clock.advance(1000 * len(audio[start : start + n]) / rate_hz)
        if sum(emitted):
            emitting += 1
            assert wait, f"frame at {start / rate_hz:.3f} s emitted {sum(emitted)} frames of log-probs but was not flagged"
        flagged += wait
        saved += not wait
    assert emitting >= 10
    if frame_s <= s.chunk_ms / 3000:  # three or more frames per chunk: most need not wait
        assert saved >= emitting, (saved, emitting, flagged)


@pytest.mark.parametrize("rate_hz", [8000, 11025, 22050, 32000, 44100, 48000])
def test_the_streamed_resampler_holds_nothing_back(rate_hz: int) -> None:
    """Each pushed chunk is resampled whole (``workers.audio.ingest``): streams at other rates are no
    later than 16 kHz ones, so the clock, which counts audio as if it reached the features at
    once, holds for them too."""
    from workers.audio.ingest import StreamingIngest

    ingest = StreamingIngest(16000, 160)
    out = ingest.push(np.zeros(rate_hz // 10, np.float32), rate_hz)  # 100 ms in: 100 ms out, at once
    assert sum(len(c) for c in out) + len(ingest.flush()) == 1600


def test_clock_without_audio_does_not_flag() -> None:
    clock = ChunkClock(300.0, 150.0, 30.0, 45.0, 100.0)
    assert not clock.advance(0.0)
    assert [clock.advance(100.0) for _ in range(12)].count(True) >= 3


@pytest.mark.parametrize(("words", "ok"), [(True, True), (False, True), (1, True), (0, True), ("x", False), (2, False), (None, False)])
def test_config_words_must_be_a_boolean_or_0_or_1(words, ok: bool) -> None:
    """``words`` takes what Vosk's clients send (true/false, 1/0); anything else is refused with
    close code 1007 and a message naming it, before any audio."""
    import json

    from pipeline.serve.protocol import VoskConnection

    connection = VoskConnection(session=None)  # a config frame never reaches the session
    reply = connection.on_text(json.dumps({"config": {"words": words}}))
    if ok:
        assert reply.message is None and reply.close_code is None and connection.words is bool(words)
    else:
        assert reply.close_code == 1007 and "words must be" in reply.message["error"]


def test_the_token_is_taken_from_the_header_or_the_query_and_compared_by_digest() -> None:
    from pipeline.serve.protocol import presented_token, token_accepted, token_digest

    digest = token_digest("s3cret")
    assert "s3cret" not in digest and len(digest) == 64
    assert presented_token({"authorization": "Bearer s3cret"}, {}) == "s3cret"
    assert presented_token({"authorization": "bearer  s3cret "}, {"token": "other"}) == "s3cret"  # the header wins
    assert presented_token({}, {"token": "s3cret"}) == "s3cret"
    assert presented_token({"authorization": "Basic abc"}, {}) is None and presented_token({}, {}) is None
    assert token_accepted(digest, "s3cret") and not token_accepted(digest, "s3cre") and not token_accepted(digest, None)
    assert token_accepted(None, None) and token_accepted(None, "anything")  # no token configured: open
