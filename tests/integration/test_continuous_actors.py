"""The Ray actors on a continuous stream with pauses give the in-process recogniser's finals
(the in-process equalities: ``tests/unit/test_continuous.py``)."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import AppConfig, load_config
from pipeline.evaluate_continuous import finals_of, recognize_actors, recognize_streaming
from workers.data.continuous import join_utterances
from workers.data.corpus import read_an4, split_by_speaker
from workers.decoding.decoder import DecoderConfig
from workers.recognizer import Recognizer, StreamingRecognizer

CONFIG = load_config()
S = CONFIG.streaming
RATE_HZ = 16000


@pytest.fixture(scope="module")
def speaker_stream(an4_root):
    """One held-out speaker's first 14 utterances joined with seeded 0.3-3 s pauses of faint noise."""
    _, dev = split_by_speaker(read_an4(an4_root).utterances, CONFIG.data.an4_dev_speakers)
    utts = [u for u in dev if u.speaker == "mcfl"][:14]
    rec = Recognizer(None, CONFIG.decoder, S.chunk_ms, S.lookahead_ms, vad=CONFIG.vad)
    return join_utterances("mcfl", [(u.id, u.text, rec.load(u.audio)) for u in utts], RATE_HZ, seed=0), rec


def test_the_actors_give_the_in_process_finals(local_ray, speaker_stream) -> None:
    """The Ray pipeline, on the same continuous stream, gives the in-process finals exactly."""
    from pipeline.streaming import StreamingPipeline

    joined, rec = speaker_stream
    greedy = DecoderConfig(kind="greedy")  # restarts and loading are quicker; the edges are what is tested here
    config = dataclasses.replace(AppConfig(), streaming=dataclasses.replace(S, acoustic_actors=1, decoder_actors=1))
    stream = StreamingRecognizer(rec.bundle, greedy, S.chunk_ms, S.lookahead_ms, S.endpoint_silence_ms, vad=CONFIG.vad)
    want = recognize_streaming(stream, joined)
    with StreamingPipeline(config, None, greedy) as pipeline:
        got = recognize_actors(pipeline, joined)
    assert [(f.text, [(w.word, round(w.start_s, 3)) for w in f.words]) for f in got] == \
           [(f.text, [(w.word, round(w.start_s, 3)) for w in f.words]) for f in want]
    assert len(want) >= 10 and all(f.text for f in want)
    assert finals_of([]) == []
