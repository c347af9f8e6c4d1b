"""The Vosk websocket protocol (alphacep/vosk-server ``websocket/asr_server.py``) over a
streaming session: what ``asr serve`` speaks, and what ``--server`` clients send.

One ``VoskConnection`` per websocket connection. The server hands it each message and
sends back what it returns; it never touches the network itself, so the protocol is
testable without a server. Its calls block (they wait for the stage actors): a server runs
them on worker threads.

Messages, client to server:

- optional text ``{"config": {"sample_rate": N, "words": 0|1, "max_alternatives": K,
  "phrase_list": [...]}}`` before any audio (unknown keys ignored; no reply);
- binary frames: 16-bit little-endian mono PCM at that rate (default 16000), any length;
- text ``{"eof": 1}`` (the final result, then the server closes) or ``{"reset": 1}`` (the
  final result; the connection stays open for a new utterance).

Server to client, exactly one text message per binary frame: ``{"partial": "..."}``, or
when an utterance ends ``{"result": [{"conf", "start", "end", "word"}, ...], "text": "..."}``
(``result`` only with ``words`` on, the default), or with ``max_alternatives`` > 0
``{"alternatives": [{"confidence", "text", "result"}, ...]}``. Times are seconds from the
start of the connection's audio, across resets. Bad input gets ``{"error": "..."}`` and
the connection is closed with a websocket error code (``CloseCode``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from workers.decoding.decoder import Alternative, normalize_phrases
from workers.decoding.stage import MAX_ALTERNATIVES, RecognitionResult, StreamOptions

MAX_FRAME_BYTES = 1 << 20  # a binary frame over 1 MB (33 s at 16 kHz) is refused
MIN_RATE_HZ, MAX_RATE_HZ = 8000, 48000
DEFAULT_RATE_HZ = 16000


class CloseCode:
    """Websocket close codes (RFC 6455) the server ends a connection with."""

    NORMAL = 1000  # after eof
    GOING_AWAY = 1001  # the server is shutting down (after the final of what the client sent)
    POLICY = 1008  # a message that is not allowed here (unknown text, config after audio)
    INVALID_DATA = 1007  # malformed JSON, odd-length PCM, a bad sample rate or phrase list
    TOO_BIG = 1009  # a frame over MAX_FRAME_BYTES
    INTERNAL = 1011  # the pipeline lost the stream
    TRY_AGAIN_LATER = 1013  # the server is at streaming.max_streams


def token_digest(token: str) -> str:
    """What a server keeps of its access token: its SHA-256 (the token itself never reaches a
    replica's arguments or a log)."""
    return hashlib.sha256(token.encode()).hexdigest()


def presented_token(headers: Any, query: Any) -> str | None:
    """The token a client presents: ``Authorization: Bearer TOKEN``, else ``?token=TOKEN`` on
    the websocket URL (a browser cannot set headers); None when neither is there."""
    auth = headers.get("authorization") or ""
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("token") or None


def token_accepted(digest: str | None, presented: str | None) -> bool:
    """Whether ``presented`` is the token of ``digest`` (None: the server needs none), compared
    in constant time."""
    if digest is None:
        return True
    return presented is not None and hmac.compare_digest(token_digest(presented), digest)


class ProtocolError(ValueError):
    """A client message the protocol refuses; ``code`` is the close code to end with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class StreamSession(Protocol):
    """What a connection needs of ``pipeline.streaming.StreamingPipeline``."""

    def open_stream(self, stream_id: str | None = None, options: Any = None) -> str: ...
    def push(self, stream_id: str, samples: np.ndarray, rate_hz: int) -> list[RecognitionResult]: ...
    def results(self, stream_id: str, wait: bool = False) -> list[RecognitionResult]: ...
    def close(self, stream_id: str) -> list[RecognitionResult]: ...
    def abort(self, stream_id: str) -> None: ...


@dataclass
class Reply:
    """What to send back: a JSON text message (or none), then close with ``close_code`` if set."""

    message: dict[str, Any] | None
    close_code: int | None = None

    def text(self) -> str | None:
        return None if self.message is None else json.dumps(self.message)


class ChunkClock:
    """Which frames can change the recognition result, from the audio's duration alone.

    Audio reaches the features in ``ingest_chunk_ms`` pieces; model frame k (``frame_ms``
    apart) needs the audio up to ``k * frame_ms + span_ms`` (the stacked MFCC window); the
    acoustic model emits log-probs for each ``chunk_ms`` of frames once ``lookahead_ms``
    more are there. A frame whose audio completes no model chunk gets no new log-probs, so
    no new partial or final: its reply need not wait for the stages. Resampling can shift
    the boundary a little, so a boundary within ``MARGIN_MS`` counts as reached (a needless
    wait at worst). ``tests/test_vosk_protocol.py`` checks every emitting frame is flagged."""

    MARGIN_MS = 30.0

    def __init__(self, chunk_ms: float, lookahead_ms: float, frame_ms: float, span_ms: float, ingest_chunk_ms: float) -> None:
        self.chunk_frames = max(1, round(chunk_ms / frame_ms))
        self.lookahead_frames = round(lookahead_ms / frame_ms)
        self.frame_ms, self.span_ms, self.ingest_chunk_ms = frame_ms, span_ms, ingest_chunk_ms
        self.audio_ms = 0.0

    def _chunks(self, audio_ms: float, shift_ms: float) -> int:
        ingested = (audio_ms // self.ingest_chunk_ms) * self.ingest_chunk_ms + shift_ms
        frames = max(0, int((ingested - self.span_ms) // self.frame_ms) + 1) if ingested >= self.span_ms else 0
        return (frames - self.lookahead_frames) // self.chunk_frames

    def advance(self, ms: float) -> bool:
        """Add ``ms`` of audio; whether it may complete a model chunk."""
        before, self.audio_ms = self.audio_ms, self.audio_ms + ms
        return any(self._chunks(self.audio_ms, shift) > self._chunks(before, shift) for shift in (-self.MARGIN_MS, self.MARGIN_MS))


class VoskConnection:
    """The protocol state of one connection over a ``StreamSession`` (one stream per
    utterance run: a reset ends the stream, the next audio opens another).

    ``clock``: a ``ChunkClock`` factory; with it, a frame's reply waits for the stages only
    when the frame may complete a model chunk (otherwise it carries what is known, which is
    what waiting would give). Without it every reply waits."""

    def __init__(self, session: StreamSession, clock: Callable[[], ChunkClock] | None = None) -> None:
        self.session = session
        self._new_clock = clock
        self.clock = clock() if clock else None
        self.rate_hz = DEFAULT_RATE_HZ
        self.words = True
        self.options = StreamOptions()
        self.stream_id: str | None = None
        self.audio_s = 0.0  # connection audio so far, seconds
        self.stream_start_s = 0.0  # where the current stream's audio starts in connection time
        self.partial = ""
        self.audio_seen = False
        self.closed = False
        self._results: list[RecognitionResult] = []  # what the frame's push returned, for its reply

    # ---- messages ----------------------------------------------------------------------
    def on_text(self, text: str) -> Reply:
        """A text frame: config, eof or reset."""
        try:
            message = json.loads(text)
        except ValueError as exc:
            return self._fail(ProtocolError(f"malformed JSON text frame: {exc}", CloseCode.INVALID_DATA))
        if not isinstance(message, dict):
            return self._fail(ProtocolError("a text frame must be a JSON object: config, eof or reset", CloseCode.POLICY))
        try:
            if "config" in message:
                self._configure(message["config"])
                return Reply(None)
            if "eof" in message:
                return Reply(self._finish(), CloseCode.NORMAL)
            if "reset" in message:
                return Reply(self._finish())
        except ProtocolError as exc:
            return self._fail(exc)
        except Exception as exc:  # the pipeline lost the stream (StreamError) or broke
            return self._fail(ProtocolError(f"recognition failed: {exc}", CloseCode.INTERNAL))
        keys = ", ".join(sorted(map(str, message))) or "none"
        return self._fail(ProtocolError(f"unknown text frame (keys: {keys}); expected config, eof or reset", CloseCode.POLICY))

    def on_audio(self, data: bytes) -> Reply:
        """A binary frame of PCM: exactly one reply, a partial or a result (blocks while the
        frame's reply waits for the stages)."""
        wait = self.accept_audio(data)
        return wait if isinstance(wait, Reply) else self.audio_reply(self.stream_results(wait))

    def stream_results(self, wait: bool) -> list[RecognitionResult] | Exception:
        """The session's results for the stream since they were last taken (``wait``: once
        every push is back), or the exception that getting them raised, for ``audio_reply``."""
        try:
            return self.session.results(self.stream_id, wait=wait)
        except Exception as exc:  # the pipeline lost the stream (StreamError) or broke
            return exc

    def accept_audio(self, data: bytes) -> Reply | bool:
        """The first half of ``on_audio``: check the frame and push it. Returns the reply when
        the frame is refused, else whether its reply must wait for the stages (then the
        session's ``results(stream_id, wait=True)``, or its ``completion`` future, before
        ``audio_reply``)."""
        try:
            samples = self._pcm(data)
            if self.stream_id is None:
                self.stream_id = self.session.open_stream(options=self.options)
                self.stream_start_s = self.audio_s
                self.clock = self._new_clock() if self._new_clock else None
            self.audio_seen = True
            self.audio_s += len(samples) / self.rate_hz
            self._results += self.session.push(self.stream_id, samples, self.rate_hz) if len(samples) else []
            return self.clock is None or self.clock.advance(1000 * len(samples) / self.rate_hz)
        except ProtocolError as exc:
            return self._fail(exc)
        except Exception as exc:
            return self._fail(ProtocolError(f"recognition failed: {exc}", CloseCode.INTERNAL))

    def audio_reply(self, results: list[RecognitionResult] | Exception) -> Reply:
        """The second half of ``on_audio``: the frame's reply from the session's results since
        the push (or the exception that getting them raised)."""
        if isinstance(results, Exception):
            return self._fail(ProtocolError(f"recognition failed: {results}", CloseCode.INTERNAL))
        results, self._results = self._results + results, []
        finals = [r for r in results if r.is_final]
        if finals:
            partials_after = [r for r in results[results.index(finals[-1]) + 1 :] if not r.is_final]
            self.partial = partials_after[-1].text if partials_after else ""
            return Reply(self._final_message(finals))
        if results:
            self.partial = results[-1].text
        return Reply({"partial": self.partial})

    def on_disconnect(self) -> None:
        """The client went away: free the stream's state everywhere, without waiting."""
        if self.stream_id is not None:
            self.session.abort(self.stream_id)
            self.stream_id = None
        self.closed = True

    # ---- internals -----------------------------------------------------------------------
    def _configure(self, config: Any) -> None:
        if self.audio_seen:
            raise ProtocolError("config after audio: send the config frame before the first audio frame", CloseCode.POLICY)
        if not isinstance(config, dict):
            raise ProtocolError("config must be a JSON object", CloseCode.INVALID_DATA)
        rate, words = config.get("sample_rate", self.rate_hz), config.get("words", self.words)
        alternatives, phrases = config.get("max_alternatives", self.options.max_alternatives), config.get("phrase_list")
        try:
            rate = float(rate)
        except (TypeError, ValueError):
            raise ProtocolError(f"sample_rate must be a number, got {rate!r}", CloseCode.INVALID_DATA) from None
        if not (MIN_RATE_HZ <= rate <= MAX_RATE_HZ) or rate != int(rate):
            raise ProtocolError(f"sample_rate must be a whole number of Hz in {MIN_RATE_HZ}-{MAX_RATE_HZ}, got {rate:g}", CloseCode.INVALID_DATA)
        if not isinstance(alternatives, int | float) or isinstance(alternatives, bool) or alternatives != int(alternatives) \
                or alternatives < 0:
            raise ProtocolError(f"max_alternatives must be a whole number >= 0, got {alternatives!r}", CloseCode.INVALID_DATA)
        alternatives = min(int(alternatives), MAX_ALTERNATIVES)  # Vosk's test_alternatives.py asks for 20
        if not (isinstance(words, bool) or (isinstance(words, int) and words in (0, 1))):
            raise ProtocolError(f"words must be true, false, 1 or 0, got {words!r}", CloseCode.INVALID_DATA)
        phrase_list: tuple[str, ...] = ()
        if phrases is not None:
            if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
                raise ProtocolError("phrase_list must be a list of strings", CloseCode.INVALID_DATA)
            try:
                phrase_list = normalize_phrases(phrases)
            except ValueError as exc:
                raise ProtocolError(f"phrase_list: {exc}", CloseCode.INVALID_DATA) from None
        self.rate_hz, self.words = int(rate), bool(words)
        self.options = StreamOptions(max_alternatives=int(alternatives), phrase_list=phrase_list)

    def _pcm(self, data: bytes) -> np.ndarray:
        if len(data) > MAX_FRAME_BYTES:
            raise ProtocolError(f"binary frame of {len(data)} bytes is over the {MAX_FRAME_BYTES}-byte limit", CloseCode.TOO_BIG)
        if len(data) % 2:
            raise ProtocolError(f"binary frame of {len(data)} bytes: 16-bit PCM needs an even number of bytes", CloseCode.INVALID_DATA)
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0

    def on_shutdown(self) -> Reply:
        """The server is stopping: the final result of what was sent, then close 1001."""
        try:
            return Reply(self._finish(), CloseCode.GOING_AWAY)
        except Exception as exc:  # the pipeline lost the stream: still a close that says why
            return Reply({"error": f"server shutting down; recognition failed: {exc}"}, CloseCode.GOING_AWAY)

    def _finish(self) -> dict[str, Any]:
        """End the current stream (if any) and return its final result message."""
        finals: list[RecognitionResult] = []
        if self.stream_id is not None:
            stream_id, self.stream_id = self.stream_id, None
            finals = [r for r in self.session.close(stream_id) if r.is_final]
        self.partial = ""
        return self._final_message(finals)

    def _final_message(self, finals: list[RecognitionResult]) -> dict[str, Any]:
        """One result message for the finals of one reply (normally one; several are joined,
        and the alternatives of the last one follow the best text of those before it)."""
        offset = self.stream_start_s
        words = [w for r in finals for w in r.words]
        text = " ".join(r.text for r in finals if r.text)
        if self.options.max_alternatives > 0:
            prefix_text = " ".join(r.text for r in finals[:-1] if r.text)
            prefix_words = [w for r in finals[:-1] for w in r.words]
            last = finals[-1] if finals else None
            alternatives = (last.alternatives if last is not None and last.alternatives else
                            [Alternative(last.text if last else "", last.words if last else [], 1.0)])
            out = []
            for alt in alternatives:
                entry: dict[str, Any] = {"confidence": round(float(alt.confidence), 6), "text": " ".join(t for t in (prefix_text, alt.text) if t)}
                if self.words:
                    entry["result"] = _word_entries(prefix_words + list(alt.words), offset)
                out.append(entry)
            return {"alternatives": out}
        message: dict[str, Any] = {"text": text}
        if self.words:
            message = {"result": _word_entries(words, offset), "text": text}
        return message

    def _fail(self, error: ProtocolError) -> Reply:
        self.on_disconnect()
        return Reply({"error": str(error)}, error.code)


def _word_entries(words: list[Any], offset_s: float) -> list[dict[str, Any]]:
    """Vosk's word objects: conf in [0, 1], start and end in seconds of connection time."""
    out = []
    for w in words:
        conf = getattr(w, "conf", None)
        conf = 1.0 if conf is None or not math.isfinite(conf) else min(1.0, max(0.0, float(conf)))
        out.append({"conf": round(conf, 6), "end": round(w.end_s + offset_s, 3), "start": round(w.start_s + offset_s, 3), "word": w.word})
    return out

