"""A stage-actor crash is invisible to the streams: the driver keeps each stream's audio and
replays it on the restarted actors, so every stream's finals equal the no-fault run's. Only a
stream whose audio since its last final exceeds ``streaming.replay_buffer_s`` is lost, alone,
with a clear ``StreamError``; no call blocks for long.

Real speech (held-out AN4 speakers), the shipped model, greedy decoding (restarts load faster),
voice activity gating on.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from pipeline.config import AppConfig, StreamingConfig
from pipeline.streaming import StreamError, StreamingPipeline
from pipeline.streaming.replay import ReplayBuffer
from workers.audio.reader import load_audio
from workers.data.corpus import read_an4, split_by_speaker
from workers.decoding.decoder import DecoderConfig
from workers.recognizer import StreamingRecognizer

RATE_HZ = 16000
PIECE = 1600  # 100 ms pushes
# One acoustic and one decoder actor (2 CPUs: two of each by default): every stage still has its
# actor to kill, every stream is then hit by each crash, and 2 fewer actors start with the pipeline.
STREAMING = StreamingConfig(endpoint_silence_ms=300.0, max_inflight_chunks=4, replay_buffer_s=12.0, recovery_timeout_s=60.0,
                            acoustic_actors=1, decoder_actors=1)
CONFIG = AppConfig(streaming=STREAMING)
GREEDY = DecoderConfig(kind="greedy")
CALL_BOUND_S = 45.0  # no push or close may take longer (an actor restart included)


@pytest.fixture(scope="module")
def streams_audio(an4_root) -> list[np.ndarray]:
    """Three streams of ~9 s: three held-out utterances each, 0.8 s of silence between (finals)."""
    _, dev = split_by_speaker(read_an4(an4_root).utterances, AppConfig().data.an4_dev_speakers)
    utts = sorted(dev, key=lambda u: u.id)[:36:4]
    gap = np.zeros(int(0.8 * RATE_HZ), dtype=np.float32)
    waves = [load_audio(u.audio, RATE_HZ).numpy() for u in utts]
    return [np.concatenate([waves[3 * k], gap, waves[3 * k + 1], gap, waves[3 * k + 2], gap]) for k in range(3)]


def pieces(wave: np.ndarray) -> list[np.ndarray]:
    return [wave[i : i + PIECE] for i in range(0, len(wave), PIECE)]


def finals(results) -> list[tuple]:
    return [(r.text, round(r.start_s, 3), round(r.end_s, 3), tuple((w.word, round(w.start_s, 3), round(w.end_s, 3)) for w in r.words))
            for r in results if r.is_final]


@pytest.fixture(scope="module")
def expected(streams_audio) -> list[list[tuple]]:
    """The no-fault results: the in-process recogniser on the same pushes and settings (equal to
    the pipeline's, see test_streaming_pipeline)."""
    out = []
    for wave in streams_audio:
        rec = StreamingRecognizer(None, GREEDY, chunk_ms=STREAMING.chunk_ms, lookahead_ms=STREAMING.lookahead_ms,
                                  endpoint_silence_ms=STREAMING.endpoint_silence_ms, ingest_chunk_ms=STREAMING.ingest_chunk_ms,
                                  device="cpu", vad=CONFIG.vad)
        got = [r for p in pieces(wave) for r in rec.push(p, RATE_HZ)] + rec.finish()
        assert len(finals(got)) >= 3 and all(f[0] for f in finals(got)[:3])  # real words in every utterance
        out.append(finals(got))
    return out


@pytest.fixture(scope="module")
def pipe(local_ray):
    pipeline = StreamingPipeline(CONFIG, None, GREEDY)
    yield pipeline
    pipeline.shutdown()


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    assert time.monotonic() - t0 < CALL_BOUND_S
    return out


def run_with_crash(pipe: StreamingPipeline, waves: list[np.ndarray], kill: str, kill_after_s: float) -> list[list]:
    """Push the streams interleaved in 100 ms pieces; kill actor ``kill`` (Ray restarts it)
    once ``kill_after_s`` of each stream has been pushed; then the rest, and close."""
    ids = [pipe.open_stream() for _ in waves]
    got: list[list] = [[] for _ in waves]
    split = [pieces(w) for w in waves]
    kill_at = int(kill_after_s * RATE_HZ / PIECE)
    for k in range(max(map(len, split))):
        if k == kill_at:
            ray.kill(pipe.actors[kill], no_restart=False)
        for i, sid in enumerate(ids):
            if k < len(split[i]):
                got[i] += timed(pipe.push, sid, split[i][k], RATE_HZ)
    for i, sid in enumerate(ids):
        got[i] += timed(pipe.close, sid)
    return got


@pytest.mark.parametrize("kill", ["ingest", "features", "acoustic", "decoder"])
def test_streams_survive_a_stage_actor_crash(pipe, streams_audio, expected, kill) -> None:
    before = pipe.stats.recoveries
    got = run_with_crash(pipe, streams_audio, kill, kill_after_s=4.0)
    for stream_results, want in zip(got, expected):
        assert finals(stream_results) == want  # no final lost, repeated or changed
        assert all(r.stream_id == stream_results[0].stream_id for r in stream_results)
    assert pipe.stats.recoveries > before  # the crash did hit streams, and they were replayed


def test_an_idle_stream_does_not_hang_after_its_acoustic_actor_died(pipe, streams_audio, expected) -> None:
    """Nothing in flight when the actor dies: the next pushes fail fast at the restarted actor
    (it is another incarnation) and the stream is replayed; no 30 s or 300 s waits."""
    wave = streams_audio[0]
    split = pieces(wave)
    sid = pipe.open_stream()
    got = [r for p in split[:30] for r in pipe.push(sid, p, RATE_HZ)]
    while pipe.inflight(sid):  # drain: nothing of this stream in flight
        got += pipe.push(sid, np.zeros(0, np.float32), RATE_HZ)
        time.sleep(0.05)
    for name in [n for n in pipe.actors if n.startswith("acoustic")]:
        ray.kill(pipe.actors[name], no_restart=False)
    t0 = time.monotonic()
    for p in split[30:]:
        got += timed(pipe.push, sid, p, RATE_HZ)
    got += timed(pipe.close, sid)
    assert time.monotonic() - t0 < CALL_BOUND_S
    assert finals(got) == expected[0]


def test_only_a_stream_beyond_its_replay_buffer_is_lost(pipe, streams_audio, expected) -> None:
    """A stream with more than replay_buffer_s (12 s) of audio since its last final (here 14 s
    of digital silence: no endpoint, so no final before its end) cannot be replayed: it alone
    gets a StreamError that says why; the other streams, hit by the same crash, come through whole."""
    noise = np.zeros(14 * RATE_HZ, dtype=np.float32)
    lost = pipe.open_stream()
    for p in pieces(noise):
        pipe.push(lost, p, RATE_HZ)
    ids = [pipe.open_stream() for _ in streams_audio]
    got: list[list] = [[] for _ in ids]
    split = [pieces(w) for w in streams_audio]
    error = None
    for k in range(max(map(len, split))):
        if k == 20:
            ray.kill(pipe.actors["features"], no_restart=False)  # every stream's state is there
        if k >= 20 and error is None:
            try:
                timed(pipe.push, lost, noise[:PIECE], RATE_HZ)
            except StreamError as exc:
                error = exc
        for i, sid in enumerate(ids):
            if k < len(split[i]):
                got[i] += timed(pipe.push, sid, split[i][k], RATE_HZ)
    for i, sid in enumerate(ids):
        got[i] += timed(pipe.close, sid)
    assert error is not None and "replay_buffer_s=12" in str(error) and lost in str(error)
    with pytest.raises(KeyError):
        pipe.inflight(lost)  # dropped
    assert [finals(g) for g in got] == expected


def test_a_long_stream_with_pauses_replays_from_its_last_final_exactly(pipe, an4_root) -> None:
    """A stream three times longer than the replay buffer (a held-out speaker's utterances with
    0.3-3 s pauses of faint noise, as a microphone gives them), its acoustic actor killed 25 s
    in: the driver no longer has its start, so it replays from the end of the last final. Each
    utterance starts from a clean state (the detector, the running mean, the BiLSTM and the
    search all restart at an utterance's end), so the finals equal the no-fault run's exactly."""
    import torch

    from workers.data.continuous import join_utterances

    _, dev = split_by_speaker(read_an4(an4_root).utterances, AppConfig().data.an4_dev_speakers)
    utts = [u for u in dev if u.speaker == "fbbh"][:13]
    joined = join_utterances("fbbh", [(u.id, u.text, load_audio(u.audio, RATE_HZ)) for u in utts], RATE_HZ, seed=2)
    wave = joined.wave.numpy().astype(np.float32)
    assert len(wave) > 3 * STREAMING.replay_buffer_s * RATE_HZ
    rec = StreamingRecognizer(None, GREEDY, chunk_ms=STREAMING.chunk_ms, lookahead_ms=STREAMING.lookahead_ms,
                              endpoint_silence_ms=STREAMING.endpoint_silence_ms, device="cpu", vad=CONFIG.vad)
    want = finals([r for p in pieces(wave) for r in rec.push(p, RATE_HZ)] + rec.finish())
    assert len(want) >= 10 and torch.is_tensor(joined.wave)
    before = pipe.stats.recoveries
    got = run_with_crash(pipe, [wave], "acoustic", kill_after_s=25.0)[0]
    assert finals(got) == want
    assert pipe.stats.recoveries > before


def test_replay_buffer_keeps_the_whole_stream_then_what_follows_the_last_final() -> None:
    buf = ReplayBuffer(max_s=3.0)
    blocks = [np.full(1600, k, np.float32) for k in range(50)]  # 0.1 s each
    for b in blocks[:25]:
        buf.add(b, RATE_HZ)
    plan = buf.plan()
    assert plan.from_start and plan.offset_s == 0 and len(plan.pushes) == 25  # 2.5 s: all of it
    buf.final(1.25)  # mid-block 12: a final ended there
    assert buf.plan().from_start  # still fits: the whole stream is kept (exact replay)
    for b in blocks[25:35]:
        buf.add(b, RATE_HZ)  # 3.5 s > 3 s: only what follows the last final is kept
    plan = buf.plan()
    assert not plan.from_start and plan.offset_s == pytest.approx(1.25)
    assert sum(len(a) for a, _ in plan.pushes) == 35 * 1600 - 20000
    assert plan.pushes[0][0][0] == 12  # the cut block
    for b in blocks[35:]:
        buf.add(b, RATE_HZ)  # 3.75 s since that final: beyond the buffer
    assert buf.plan() is None and buf.seconds <= 3.0 + 1e-9
    buf.final(4.8)  # a new final inside what is kept: replayable again from there
    plan = buf.plan()
    assert plan is not None and plan.offset_s == pytest.approx(4.8) and buf.seconds == pytest.approx(0.2)
