"""``asr serve`` end to end: a real Ray Serve deployment in a subprocess, real websockets
over loopback, real held-out AN4 speech and the shipped model.

The test client here is written from the protocol as Vosk's clients use it (config
frame, 0.2 s frames each answered by one reply, ``{"eof" : 1}``), not with the project's
own client. Each final text is compared with the in-process ``StreamingRecognizer`` fed
the same 16-bit samples in the same blocks, at the server's settings.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torchaudio
from conftest import REPO
from test_stream_mic import an4_wav  # noqa: F401  (fixture: the AN4 WAV; the PulseAudio virtual microphone is conftest's)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipeline.config import load_config
from workers.audio.reader import read_audio
from workers.data.corpus import read_an4, split_by_speaker
from workers.recognizer import StreamingRecognizer
from workers.stages import StreamOptions

CONFIG = load_config()  # what the server runs with (configs/default.yaml), max_streams aside
MAX_STREAMS = 16
START_TIMEOUT_S = 240
FRAME_S = 0.2  # what Vosk's test clients send
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
IDLE_TIMEOUT_S = 20  # the module's server closes a connection that sends no audio this long
TOKEN = "test-token-7f3a9c"  # the module's server needs it (from ASR_SERVE_TOKEN); its url carries it as ?token=
DIGITS = ["zero one two three four five", "six seven eight nine oh"]
#: One acoustic and one decoder actor (2 CPUs: two of each by default): every stage still has an
#: actor, and the server starts 2 fewer (each imports torch and loads the model or the LM).
STAGE_ACTORS = ("--set", "streaming.acoustic_actors=1", "--set", "streaming.decoder_actors=1")


# ---- the server ------------------------------------------------------------------------------
class Server:
    def __init__(self, port: int | None = None) -> None:
        self.port = port
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self.base_url = f"ws://127.0.0.1:{self.port}"
        self.url = f"{self.base_url}/?token={TOKEN}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(self.port), "--set", f"streaming.max_streams={MAX_STREAMS}",
             "--idle-timeout-s", str(IDLE_TIMEOUT_S), *STAGE_ACTORS],
            cwd=REPO, env={**ENV, "ASR_SERVE_TOKEN": TOKEN}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ready = threading.Event()
        for pipe, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(pipe, lines), daemon=True).start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Until the serving line (True), the process's exit or ``timeout_s`` (False)."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return self.ready.wait(1.0)
        return True

    def _read(self, pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)
            if line.startswith("serving ws://"):
                self.ready.set()

    def get(self, path: str) -> tuple[int, dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=60) as response:
            return response.status, json.loads(response.read())

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server()
    try:
        if not srv.wait_ready(START_TIMEOUT_S):
            pytest.fail(f"asr serve did not start in {START_TIMEOUT_S} s:\n{''.join(srv.stdout)}{''.join(srv.stderr)[-3000:]}")
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.terminate()
            try:
                srv.proc.wait(60)
            except subprocess.TimeoutExpired:
                srv.proc.kill()


# ---- audio and the reference -------------------------------------------------------------------
@pytest.fixture(scope="module")
def utterances(an4_root: Path) -> list[tuple[str, np.ndarray]]:
    """16 held-out utterances (speakers never trained on) as 16 kHz 16-bit samples."""
    _, dev = split_by_speaker(read_an4(an4_root).utterances, CONFIG.data.an4_dev_speakers)
    picked = sorted(dev, key=lambda u: u.id)[::6][:MAX_STREAMS]
    out = []
    for u in picked:
        audio, rate = read_audio(u.audio)
        assert rate == 16000
        out.append((u.id, np.round(audio[:, 0] * 32768).astype(np.int16)))
    return out


def blocks(pcm: np.ndarray, rate_hz: int) -> list[np.ndarray]:
    n = int(rate_hz * FRAME_S)
    return [pcm[i : i + n] for i in range(0, len(pcm), n)]


def reference(pcm: np.ndarray, rate_hz: int = 16000, options: StreamOptions | None = None) -> list:
    """The in-process recogniser's finals on the same samples, pushed in the same blocks."""
    s = CONFIG.streaming
    rec = StreamingRecognizer(None, CONFIG.decoder, s.chunk_ms, s.lookahead_ms, s.endpoint_silence_ms, s.ingest_chunk_ms,
                              device="cpu", vad=CONFIG.vad, options=options)
    results = [r for b in blocks(pcm, rate_hz) for r in rec.push(b.astype(np.float32) / 32768.0, rate_hz)] + rec.finish()
    return [r for r in results if r.is_final and r.text]


def texts(finals: list) -> list[str]:
    return [r.text for r in finals]


# ---- a client written from the protocol ----------------------------------------------------------
def transcribe(url: str, pcm: np.ndarray, rate_hz: int = 16000, config: dict | None = None, end: str = '{"eof" : 1}') -> list[dict]:
    """Config, lock-step frames, eof; returns every reply (the last one is eof's)."""
    replies = []
    with connect(url, open_timeout=30) as ws:
        ws.send(json.dumps({"config": {"sample_rate": rate_hz, **(config or {})}}))
        for block in blocks(pcm, rate_hz):
            ws.send(block.astype("<i2").tobytes())
            replies.append(json.loads(ws.recv(timeout=120)))
        ws.send(end)
        replies.append(json.loads(ws.recv(timeout=120)))
        with pytest.raises(ConnectionClosed):  # the server closes after eof
            ws.recv(timeout=30)
        assert ws.close_code == 1000
    return replies


def final_replies(replies: list[dict]) -> list[dict]:
    """Result replies with text (the eof reply of an already-ended utterance is empty)."""
    return [r for r in replies if "partial" not in r and (r.get("text") or r.get("alternatives", [{}])[0].get("text"))]


def assert_one_reply_per_frame_and_valid(replies: list[dict], n_frames: int, duration_s: float) -> None:
    assert len(replies) == n_frames + 1
    previous_end = 0.0
    for reply in replies:
        assert set(reply) in ({"partial"}, {"result", "text"}), reply
        for word in reply.get("result", []):
            assert 0.0 <= word["conf"] <= 1.0, word
            assert previous_end - 1e-6 <= word["start"] <= word["end"] <= duration_s + 0.05, (word, previous_end, duration_s)
            previous_end = word["end"]
        if "result" in reply:
            assert " ".join(w["word"] for w in reply["result"]) == reply["text"]


# ---- tests -----------------------------------------------------------------------------------------
def test_health_and_the_serving_line(server: Server) -> None:
    status, body = server.get("/healthz")
    assert status == 200 and body["status"] == "ok" and body["max_streams"] == MAX_STREAMS
    line = next(line for line in server.stdout if line.startswith("serving"))
    assert f"serving ws://127.0.0.1:{server.port} (model" in line and "chunk 300 ms + lookahead 150 ms" in line, line
    with connect(server.url, open_timeout=30) as ws:  # the client offers per-message deflate (websockets' default) ...
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        assert "Sec-WebSocket-Extensions" not in ws.response.headers  # ... and the server declines it: plain frames


def test_finals_equal_the_in_process_recogniser(server: Server, utterances) -> None:
    """On the port itself (the replica's own listener: direct ingress) and, for the last
    file, through the Serve proxy, which is how clients reach the replicas on a cluster."""
    stats = server.get("/stats")[1]
    assert stats["direct"] is True and stats["proxy_port"] != server.port
    urls = [server.url] * 3 + [f"ws://127.0.0.1:{stats['proxy_port']}/?token={TOKEN}"]
    for url, (uid, pcm) in zip(urls, utterances[:4], strict=True):
        replies = transcribe(url, pcm)
        assert_one_reply_per_frame_and_valid(replies, len(blocks(pcm, 16000)), len(pcm) / 16000)
        want = texts(reference(pcm))
        assert want, uid  # real speech: words
        assert [r["text"] for r in final_replies(replies)] == want, uid


def test_8khz_input(server: Server, utterances) -> None:
    uid, pcm16k = utterances[1]
    pcm = torchaudio.functional.resample(torch.from_numpy(pcm16k.astype(np.float32)), 16000, 8000).round().clamp(-32768, 32767)
    pcm = pcm.numpy().astype(np.int16)
    replies = transcribe(server.url, pcm, 8000)
    assert_one_reply_per_frame_and_valid(replies, len(blocks(pcm, 8000)), len(pcm) / 8000)
    want = texts(reference(pcm, 8000))
    assert want and [r["text"] for r in final_replies(replies)] == want, uid


def test_reset_ends_the_utterance_and_times_continue(server: Server, utterances) -> None:
    (_, first), (_, second) = utterances[2], utterances[3]
    with connect(server.url, open_timeout=30) as ws:
        for pcm, end in ((first, '{"reset" : 1}'), (second, '{"eof" : 1}')):
            for block in blocks(pcm, 16000):
                ws.send(block.astype("<i2").tobytes())
                reply = json.loads(ws.recv(timeout=120))
            ws.send(end)
            reply = json.loads(ws.recv(timeout=120))
            if pcm is first:
                first_reply = reply
        second_reply = reply
    assert first_reply["text"] == " ".join(texts(reference(first))[-1:]) or first_reply["text"] in texts(reference(first))
    assert second_reply["text"] in texts(reference(second))
    first_s = len(first) / 16000
    assert all(w["start"] >= first_s - 1e-6 for w in second_reply["result"]), (first_s, second_reply["result"])
    assert all(w["end"] <= first_s + len(second) / 16000 + 0.05 for w in second_reply["result"])


def test_alternatives_best_first_with_confidences(server: Server, utterances) -> None:
    uid, pcm = utterances[0]
    replies = transcribe(server.url, pcm, config={"max_alternatives": 3})
    finals = [r for r in replies if "alternatives" in r]
    assert finals, replies
    want = reference(pcm, options=StreamOptions(max_alternatives=3))
    got_best = [r["alternatives"][0]["text"] for r in finals if r["alternatives"][0]["text"]]
    assert got_best == texts(want), uid
    many = [r["alternatives"] for r in finals if len(r["alternatives"]) >= 2]
    assert many, finals  # a beam search has more than one distinct hypothesis
    for alternatives in (r["alternatives"] for r in finals):
        assert len(alternatives) <= 3
        confidences = [a["confidence"] for a in alternatives]
        assert confidences == sorted(confidences, reverse=True) and all(0.0 <= c <= 1.0 for c in confidences)
        assert len({a["text"] for a in alternatives}) == len(alternatives)
        assert all(" ".join(w["word"] for w in a["result"]) == a["text"] for a in alternatives)


def test_phrase_list_restricts_the_words(server: Server, utterances) -> None:
    allowed = {w for phrase in DIGITS for w in phrase.split()}
    uid, pcm = utterances[0]
    replies = transcribe(server.url, pcm, config={"phrase_list": DIGITS, "words": 0})
    finals = final_replies(replies)
    words = [w for r in finals for w in r["text"].split()]
    assert all(set(r) == {"text"} for r in finals)  # words: 0 -> no word list
    assert words and set(words) <= allowed, (uid, words)
    unrestricted = {w for r in reference(pcm) for w in r.text.split()}
    assert not unrestricted <= allowed  # the list changed what was recognised


def test_16_concurrent_connections_each_equal_their_own_result(server: Server, utterances) -> None:
    assert len(utterances) == MAX_STREAMS
    got: dict[str, list[str]] = {}

    def run(uid: str, pcm: np.ndarray) -> None:
        got[uid] = [r["text"] for r in final_replies(transcribe(server.url, pcm))]

    threads = [threading.Thread(target=run, args=u) for u in utterances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for uid, pcm in utterances:
        assert got.get(uid) == texts(reference(pcm)), uid


BAD_INPUTS = [
    ("malformed JSON", "text", '{"config": {', 1007),
    ("neither config, eof nor reset", "text", '{"hello": 1}', 1008),
    ("odd-length PCM", "bytes", b"\x00" * 3201, 1007),
    ("sample rate below 8000 Hz", "text", '{"config": {"sample_rate": 4000}}', 1007),
    ("sample rate above 48000 Hz", "text", '{"config": {"sample_rate": 96000}}', 1007),
    ("frame over 1 MB", "bytes", b"\x00" * ((1 << 20) + 2), 1009),
    ("phrase with characters outside the model's tokens", "text", '{"config": {"phrase_list": ["call 911"]}}', 1007),
    ("negative max_alternatives", "text", '{"config": {"max_alternatives": -1}}', 1007),
    ("words neither a boolean nor 0/1", "text", '{"config": {"words": "x"}}', 1007),
]


@pytest.mark.parametrize(("name", "kind", "payload", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_an_error_and_the_server_keeps_serving(server: Server, utterances, name, kind, payload, code) -> None:
    with connect(server.url, open_timeout=30, max_size=None) as ws:
        if "config" not in str(payload):  # mid-stream: the open stream must be freed too
            ws.send(utterances[8][1][:3200].astype("<i2").tobytes())
            assert "partial" in json.loads(ws.recv(timeout=60))
        ws.send(payload)
        reply = json.loads(ws.recv(timeout=60))
        assert set(reply) == {"error"} and reply["error"], reply
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert ws.close_code == code, (name, ws.close_code, reply)
    uid, pcm = utterances[8]  # a good client afterwards gets a correct result
    assert [r["text"] for r in final_replies(transcribe(server.url, pcm))] == texts(reference(pcm)), uid
    assert not any(_settled_stats(server)["stage_streams"].values())


def test_config_after_audio_is_refused(server: Server, utterances) -> None:
    with connect(server.url, open_timeout=30) as ws:
        ws.send(np.zeros(1600, "<i2").tobytes())
        assert "partial" in json.loads(ws.recv(timeout=60))
        ws.send('{"config": {"sample_rate": 8000}}')
        reply = json.loads(ws.recv(timeout=60))
        assert "config after audio" in reply["error"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert ws.close_code == 1008
    uid, pcm = utterances[5]  # and a good client afterwards gets a correct result
    assert [r["text"] for r in final_replies(transcribe(server.url, pcm))] == texts(reference(pcm)), uid


def test_a_connection_beyond_max_streams_is_refused(server: Server) -> None:
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(server.url, open_timeout=30)) for _ in range(MAX_STREAMS)]
        for ws in held:  # each is admitted and answers
            ws.send(np.zeros(320, "<i2").tobytes())
            assert "partial" in json.loads(ws.recv(timeout=60))
        with connect(server.url, open_timeout=30) as extra:
            reply = json.loads(extra.recv(timeout=60))
            assert "capacity" in reply["error"] and str(MAX_STREAMS) in reply["error"]
            with pytest.raises(ConnectionClosed):
                extra.recv(timeout=30)
            assert extra.close_code == 1013
    deadline = time.monotonic() + 30
    while server.get("/healthz")[1]["connections"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.get("/healthz")[1]["connections"] == 0


def _drop_connections(url: str, pcm: np.ndarray, count: int, concurrency: int = 8) -> None:
    """Open ``count`` connections, at most ``concurrency`` at a time (a new one as soon as one has
    gone, not in waves that wait for their slowest), send each some audio and vanish without eof."""
    frames = blocks(pcm, 16000)

    def one(k: int) -> None:
        with contextlib.suppress(OSError, ConnectionClosed), connect(url, open_timeout=30) as ws:
            for block in frames[: 2 + k % 5]:
                ws.send(block.astype("<i2").tobytes())
                json.loads(ws.recv(timeout=120))
            ws.socket.shutdown(socket.SHUT_RDWR)  # no eof, no close handshake: the client just disappears

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))  # (an error other than the connection's end is raised here)


def _settled_stats(server: Server, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.get("/stats")[1]
        if (stats["connections"] == 0 and not any(stats["stage_streams"].values())) or time.monotonic() > deadline:
            return stats


def test_200_dropped_connections_leave_no_state_and_no_memory_growth(server: Server, utterances) -> None:
    _, pcm = utterances[6]
    _drop_connections(server.url, pcm, 20)  # warm-up: caches, allocator pools
    before = _settled_stats(server)
    assert before["stage_streams"] and not any(before["stage_streams"].values()), before
    _drop_connections(server.url, pcm, 200, concurrency=16)
    after = _settled_stats(server)
    assert after["connections"] == 0 and after["open_streams"] == 0, after
    assert not any(after["stage_streams"].values()), after["stage_streams"]
    growth = {name: after["actor_rss_mb"][name] - before["actor_rss_mb"][name] for name in before["actor_rss_mb"]}
    assert all(mb < 40 for mb in growth.values()), growth
    uid, pcm = utterances[7]  # the server still recognises correctly
    assert [r["text"] for r in final_replies(transcribe(server.url, pcm))] == texts(reference(pcm)), uid


def test_bench_clients_measure_reply_latency(server: Server, utterances) -> None:
    """``asr bench --serve``'s websocket half, against this server: two paced clients."""
    from pipeline.bench.serve import websocket_clients
    from pipeline.serve.protocol import ChunkClock

    waves = [pcm.astype(np.float32) / 32768 for _, pcm in utterances[:4]]
    clock = lambda: ChunkClock(300.0, 150.0, 30.0, 45.0, CONFIG.streaming.ingest_chunk_ms)  # noqa: E731
    r = websocket_clients(server.url, waves, 2, 3.0, 16000, 150.0, 200.0, clock)
    assert not r["errors"] and r["frames"] == 2 * 15 and r["n"] == 30, r
    assert 0 < r["p50_ms"] <= r["p95_ms"] < 5000
    assert 0 < r["chunk_frames"]["n"] < r["n"]  # some replies waited for a model chunk, some did not
    assert r["kept_real_time"] == (r["chunk_frames"]["p95_ms"] <= 150.0 and r["late_frames"] == 0)  # judged as the driver's pushes


def test_bench_sweeps_interleave_the_ways_stop_when_none_keeps_up_and_summarize_the_repeats() -> None:
    """``asr bench --serve``'s bookkeeping, on made-up runs: each N measures every way in the
    given order, the sweep stops after the second N in a row that no way kept, and the capacity
    ratios of the repeats are summarized by their median and range."""
    from pipeline.bench.serve import added_at_equal_n_ms, capacity, summarize_capacity, sweep_streams

    kept_up_to = {"in_driver": 30, "websocket": 26}
    calls: list[tuple[str, int]] = []

    def measure(way: str, n: int, seconds: float) -> dict:
        calls.append((way, n))
        p50, p95 = 4.0 * n, 5.0 * n  # the websocket's over the replies that waited, 10 ms more at p95
        return {"kept_real_time": n <= kept_up_to[way], **({"p50_ms": p50, "p95_ms": p95} if way == "in_driver" else
                                                          {"p50_ms": 0.0, "p95_ms": 0.0, "chunk_frames": {"p50_ms": p50 + 2, "p95_ms": p95 + 10}})}

    sweep = sweep_streams([20, 24, 28, 32, 36, 40, 44], ["websocket", "in_driver"], measure, 1.0)
    assert calls[:4] == [("websocket", 20), ("in_driver", 20), ("websocket", 24), ("in_driver", 24)]
    assert [run["streams"] for run in sweep] == [20, 24, 28, 32, 36]  # 32 and 36: neither kept
    one = capacity(sweep, ["in_driver", "websocket"], 150.0)
    assert one["in_driver_streams"] == 28 and one["websocket_streams"] == 24 and one["websocket_over_in_driver"] == round(24 / 28, 3)
    kept_up_to["websocket"] = 18  # a sweep where the websocket keeps nothing tried
    two = capacity(sweep_streams([20, 24, 28, 32, 36], ["in_driver", "websocket"], measure, 1.0), ["in_driver", "websocket"], 150.0)
    assert two["websocket_streams"] == 0 and two["websocket_over_in_driver"] == 0.0
    kept_up_to["in_driver"] = 18  # and one where the driver keeps nothing tried either: no ratio
    three = capacity(sweep_streams([20, 24, 28], ["in_driver", "websocket"], measure, 1.0), ["in_driver", "websocket"], 150.0)
    assert three["in_driver_streams"] == 0 and three["websocket_over_in_driver"] is None
    summary = summarize_capacity([one, two, one, three], ["in_driver", "websocket"])
    assert summary["in_driver_streams"] == [28, 28, 28, 0] and summary["websocket_streams"] == [24, 0, 24, 0]
    assert summary["websocket_over_in_driver"] == {"each": [0.857, 0.0, 0.857, None], "median": 0.857, "min": 0.0, "max": 0.857}
    added = added_at_equal_n_ms([{"runs": sweep}], "websocket")
    assert added == {"p50_ms": {"median": 2.0, "quartiles": [2.0, 2.0], "n": 5}, "p95_ms": {"median": 10.0, "quartiles": [10.0, 10.0], "n": 5}}


def test_mic_script_streams_to_the_server(server: Server, request: pytest.FixtureRequest) -> None:
    """``scripts/stream_mic.py --server`` through the PulseAudio virtual microphone."""
    mic_env, wav = request.getfixturevalue("virtual_mic"), request.getfixturevalue("an4_wav")
    from test_stream_mic import SCRIPT, SCRIPT_TIMEOUT_S, WORDS, _Running, final_lines, final_text

    env = {**ENV, "PULSE_SERVER": mic_env["PULSE_SERVER"]}
    max_seconds = read_audio(wav)[0].shape[0] / 16000 + 1.5
    running = _Running([sys.executable, str(SCRIPT), "--server", server.url, "--mic", "--max-seconds", str(max_seconds)], env)
    try:
        assert running.listening.wait(SCRIPT_TIMEOUT_S), "".join(running.stderr)
        subprocess.run(["paplay", str(wav)], env=mic_env, check=True, timeout=30)
    finally:
        running.wait(SCRIPT_TIMEOUT_S)
    stderr = "".join(running.stderr)
    assert running.returncode == 0 and "Traceback" not in stderr, stderr
    printed = final_lines("".join(running.stdout))
    assert set(WORDS) <= set(final_text(printed).split()), printed + [stderr]


def test_a_continuous_stream_with_pauses_gets_the_in_process_finals(server: Server, an4_root: Path, tmp_path: Path) -> None:
    """One client streams a held-out speaker's utterances joined with 0.3-3 s pauses (as a
    microphone user does): the server's finals (Vosk ``result`` replies) are the in-process
    recogniser's, one per utterance, none empty, every word in the lexicon; the microphone
    script streaming the same audio as a file to the server prints the same finals."""
    import soundfile as sf
    from test_stream_mic import SCRIPT, SCRIPT_TIMEOUT_S, final_lines

    from pipeline.evaluate_continuous import lexicon_words, recognize_server
    from pipeline.serve.client import pcm16
    from workers.data.continuous import join_utterances

    _, dev = split_by_speaker(read_an4(an4_root).utterances, CONFIG.data.an4_dev_speakers)
    utts = [u for u in dev if u.speaker == "mtos"][:8]
    joined = join_utterances("mtos", [(u.id, u.text, torch.from_numpy(read_audio(u.audio)[0][:, 0].astype(np.float32)))
                                      for u in utts], 16000, seed=1)
    pcm = np.frombuffer(pcm16(joined.wave.numpy()), dtype="<i2")
    joined = dataclasses.replace(joined, wave=torch.from_numpy(pcm.astype(np.float32) / 32768.0))  # what the server hears
    want = reference(pcm)
    got = recognize_server(server.url, joined, push_ms=1000 * FRAME_S)
    assert [f.text for f in got if f.text] == texts(want)
    assert len(want) >= len(utts) - 1 and all(f.text for f in got[:-1])  # an empty final only as eof's answer
    lexicon = lexicon_words(REPO / "models" / "default" / "lexicon.txt")
    assert all(w.word in lexicon for f in got for w in f.words)
    wav = tmp_path / "talk.wav"
    sf.write(wav, pcm, 16000, subtype="PCM_16")
    done = subprocess.run([sys.executable, str(SCRIPT), "--file", str(wav), "--fast", "--server", server.url],
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, env=ENV)
    assert done.returncode == 0, done.stderr
    assert [line.split("] ", 1)[1] for line in final_lines(done.stdout)] == texts(want)


def test_a_client_needs_the_token_by_header_or_query(server: Server, utterances) -> None:
    """The module's server needs its token: without it, or with another, the handshake is answered
    with an error and close 1008 (counted in /stats); by query (the module's url) or as a Bearer
    header a client is served. The token appears in none of the server's output."""
    uid, pcm = utterances[3]
    before = _settled_stats(server)["unauthorized"]
    for url in (server.base_url, f"{server.base_url}/?token=wrong"):
        with connect(url, open_timeout=30) as ws:
            reply = json.loads(ws.recv(timeout=30))
            assert "unauthorized" in reply["error"] and TOKEN not in reply["error"]
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
            assert ws.close_code == 1008
    with connect(server.base_url, open_timeout=30, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        ws.send(json.dumps({"config": {"sample_rate": 16000}}))
        for block in blocks(pcm, 16000):
            ws.send(block.astype("<i2").tobytes())
            ws.recv(timeout=120)
        ws.send('{"eof" : 1}')
        final = json.loads(ws.recv(timeout=120))
    assert final["text"] == " ".join(texts(reference(pcm))), uid
    assert _settled_stats(server)["unauthorized"] == before + 2
    assert TOKEN not in "".join(server.stdout + server.stderr)


def test_a_connection_that_sends_no_audio_is_closed_after_the_idle_timeout(server: Server) -> None:
    """A client that sends its config and then nothing (it may answer pings) holds its slot for
    ``--idle-timeout-s`` at most: then an error reply that says why, close 1008, and /stats counts it."""
    before = _settled_stats(server)["idle_closed"]
    with connect(server.url, open_timeout=30) as ws:
        ws.send(json.dumps({"config": {"sample_rate": 16000}}))
        t0 = time.monotonic()
        reply = json.loads(ws.recv(timeout=IDLE_TIMEOUT_S + 30))
        waited = time.monotonic() - t0
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert "no audio for 20 s" in reply["error"] and ws.close_code == 1008
    assert IDLE_TIMEOUT_S - 1 <= waited <= IDLE_TIMEOUT_S + 15, waited
    assert _settled_stats(server)["idle_closed"] == before + 1


def test_every_socket_of_the_server_listens_on_loopback(server: Server) -> None:
    """``asr serve`` with the default host: no process of the server (the driver, Ray's GCS,
    raylet and workers, Serve's controller, proxy and replica) listens on another interface."""
    import ipaddress

    listening = []
    for p in [psutil.Process(server.proc.pid), *server.descendants()]:
        with contextlib.suppress(psutil.Error):
            listening += [(" ".join(p.cmdline())[:60], c.laddr.ip, c.laddr.port)
                          for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]

    def loopback(host: str) -> bool:
        ip = ipaddress.ip_address(host)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)

    assert any(port == server.port for _, _, port in listening), listening
    exposed = [entry for entry in listening if not loopback(entry[1])]
    assert not exposed, exposed


def test_a_public_host_without_a_token_gets_a_warning() -> None:
    """``--host`` other than loopback and no token: one warning line on stderr at start-up (read,
    then the server is stopped before it needs Ray)."""
    env = {k: v for k, v in ENV.items() if k != "ASR_SERVE_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--host", "0.0.0.0", "--port", "1"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
    finally:
        proc.kill()
        proc.wait(30)
    assert line.startswith("warning: listening on 0.0.0.0 with no access token and no TLS"), line


def test_a_second_server_on_a_port_in_use_fails_clearly(server: Server) -> None:
    """The server's own listener does not share its port (no SO_REUSEPORT): another ``asr serve``
    on the same port exits 1 at once, saying so, and the first one keeps serving."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(server.port), *STAGE_ACTORS],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert f"error: cannot listen on 127.0.0.1:{server.port}" in done.stderr and "serving" not in done.stdout, done.stderr[-3000:]
    assert server.get("/healthz")[0] == 200


# ---- the live-captions page in a real (headless) Chromium ----------------------------------------
FINALS_JS = "Array.from(document.querySelectorAll('#finals > div')).map(d => d.firstChild.textContent)"
#: Skipped without chromium, except in CI (.ci/run installs it), where its absence fails the tests.
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                                    reason="no chromium (Debian: apt-get install chromium)")


def _page_wav(tmp_path: Path, pcm: np.ndarray, pause_s: float = 2.0) -> Path:
    """The utterance and a pause (the fake microphone loops the file: the pause ends each pass)."""
    import soundfile as sf

    path = tmp_path / "utterance.wav"
    sf.write(path, np.concatenate([pcm, np.zeros(int(pause_s * 16000), dtype=pcm.dtype)]), 16000, subtype="PCM_16")
    return path


def _only_this_server(requests: list[str], server: Server) -> list[str]:
    own = (f"http://127.0.0.1:{server.port}/", f"ws://127.0.0.1:{server.port}/", "blob:", "data:", "about:")
    return [url for url in requests if not url.startswith(own)]


@needs_chromium
def test_the_page_captions_the_microphone_in_chromium(server: Server, utterances, tmp_path: Path) -> None:
    """``GET /`` with ``?autostart=1``: Chromium's fake microphone plays a held-out AN4 utterance;
    the first final on the page is the in-process streaming recogniser's text, and the page
    loads nothing from anywhere but this server."""
    from browser import Chromium

    uid, pcm = utterances[0]
    expected = " ".join(texts(reference(pcm)))
    browser = Chromium(fake_audio=_page_wav(tmp_path, pcm))
    try:
        browser.navigate(f"http://127.0.0.1:{server.port}/?token={TOKEN}&autostart=1")
        finals = browser.wait_for(f"(f => f.length ? f : null)({FINALS_JS})", 120)
        assert finals[0] == expected, (uid, finals, browser.console)
        assert _only_this_server(browser.requests, server) == [], browser.requests
        assert any(url.startswith(f"ws://127.0.0.1:{server.port}/") for url in browser.requests)
    finally:
        browser.close()


@needs_chromium
def test_the_page_captions_a_chosen_file_in_chromium(server: Server, utterances, tmp_path: Path) -> None:
    """The file picker: the browser decodes the file and streams it (lock-step frames, eof); the
    page's finals are the in-process recogniser's."""
    from browser import Chromium

    uid, pcm = utterances[1]
    expected = texts(reference(pcm))
    browser = Chromium()
    try:
        browser.navigate(f"http://127.0.0.1:{server.port}/?token={TOKEN}")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')", 30)
        browser.set_file("#file", _page_wav(tmp_path, pcm, pause_s=0.0))
        browser.wait_for("document.getElementById('status').textContent === 'Done.'", 120)
        assert browser.evaluate(FINALS_JS) == expected, (uid, browser.console)
        assert _only_this_server(browser.requests, server) == [], browser.requests
    finally:
        browser.close()


@needs_chromium
def test_the_page_says_when_the_server_is_full(server: Server, utterances, tmp_path: Path) -> None:
    """Every slot taken: the page's connection is refused (1013) and the page says so."""
    from browser import Chromium

    with contextlib.ExitStack() as held:
        for _ in range(MAX_STREAMS - server.get("/healthz")[1]["connections"]):
            held.enter_context(connect(server.url, open_timeout=30)).send(json.dumps({"config": {"sample_rate": 16000}}))
        browser = Chromium(fake_audio=_page_wav(tmp_path, utterances[0][1]))
        try:
            browser.navigate(f"http://127.0.0.1:{server.port}/?token={TOKEN}&autostart=1")
            status = browser.wait_for("(s => s.includes('full') ? s : null)(document.getElementById('status').textContent)", 60)
            assert "server is full" in status and browser.evaluate("document.getElementById('status').className") == "error"
        finally:
            browser.close()


def test_sigterm_drains_stops_the_server_leaves_no_process_and_frees_the_port_at_once(server: Server, utterances,
                                                                                      tmp_path: Path) -> None:
    """Last in this module: it ends the module's server, draining two clients mid-stream first. Right after, with the connections the
    server closed still holding the port in TIME_WAIT, the port can be listened on again, so a
    restarted ``asr serve`` starts at once: its pre-start check (``_port_in_use``) and its
    replica's listener bind with SO_REUSEADDR, and Linux grants that only when the closed
    connections carry the flag too, i.e. when the stopped server's listener had it
    (``AsrIngress._set_up_direct_listener``; without it the bind fails with EADDRINUSE)."""
    from pipeline.serve.cli import _port_in_use

    _, pcm = utterances[0]
    transcribe(server.url, pcm[: 16000])  # the server closes this one after eof: TIME_WAIT on its side
    procs = server.descendants()
    assert any("raylet" in " ".join(p.cmdline()) for p in procs if p.is_running())
    # Two clients mid-stream (audio sent, no eof) when SIGTERM comes: each gets the final of what
    # it sent and a 1001 close, /healthz says 503 at once, and the server is gone in its grace period.
    streamed = [utterances[1], utterances[2]]
    ready = threading.Barrier(len(streamed) + 1)

    def client(pcm: np.ndarray) -> tuple[dict, int | None]:
        with connect(server.url, open_timeout=30) as ws:
            ws.send(json.dumps({"config": {"sample_rate": 16000}}))
            for block in blocks(pcm, 16000):
                ws.send(block.astype("<i2").tobytes())
                ws.recv(timeout=120)
            ready.wait(timeout=300)
            final = json.loads(ws.recv(timeout=60))
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
            return final, ws.close_code

    page = None
    if shutil.which("chromium"):  # and the live-captions page, streaming its microphone: it says why it stopped
        from browser import Chromium

        page = Chromium(fake_audio=_page_wav(tmp_path, utterances[0][1]))
        page.navigate(f"http://127.0.0.1:{server.port}/?token={TOKEN}&autostart=1")
        page.wait_for(f"{FINALS_JS}.length > 0", 120)
    with concurrent.futures.ThreadPoolExecutor(len(streamed)) as pool:
        futures = [pool.submit(client, pcm) for _, pcm in streamed]
        ready.wait(timeout=300)
        stopped_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        health = []
        while time.monotonic() - stopped_at < 10 and 503 not in health:
            try:
                health.append(server.get("/healthz")[0])
            except urllib.error.HTTPError as exc:
                health.append(exc.code)
            except OSError:
                break
        got = [f.result(timeout=120) for f in futures]
    for (uid, pcm), (final, code) in zip(streamed, got):
        assert code == 1001, (uid, code)
        assert final.get("text") == " ".join(texts(reference(pcm))), (uid, final)
    assert 503 in health, health
    if page is not None:
        try:
            status = page.wait_for("(s => s.includes('shutting down') ? s : null)(document.getElementById('status').textContent)", 30)
            assert page.evaluate("document.getElementById('status').className") == "error", status
        finally:
            page.close()
    assert server.proc.wait(90) == 0, "".join(server.stderr)[-3000:]
    assert time.monotonic() - stopped_at < 10 + 60  # --grace-s (10) and the take-down
    deadline = time.monotonic() + 30
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.3)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
    stderr = "".join(server.stderr)
    assert "Traceback" not in stderr, stderr[-3000:]
    waiting = [c for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == server.port and c.status == psutil.CONN_TIME_WAIT]
    assert waiting, "no closed connection of the server's in TIME_WAIT: nothing to check"
    assert _port_in_use("127.0.0.1", server.port) is None
