"""A client of the Vosk websocket protocol (``pipeline.serve.protocol``), for
``scripts/stream_mic.py --server``, ``asr stream --server`` and ``asr bench --serve``.

>>> with VoskClient("ws://127.0.0.1:2700", sample_rate_hz=16000) as client:
...     for block in blocks:                  # float32 (samples,) in [-1, 1] at 16 kHz
...         reply = client.send_audio(block)  # {"partial": ...} or {"result": ..., "text": ...}
...     final = client.eof()
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect

from workers.decoding.decoder import WordTiming
from workers.decoding.stage import RecognitionResult

OPEN_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 120.0  # a reply waits for recognition; a server that says nothing this long is gone


class ServerError(RuntimeError):
    """The server refused a message (its ``{"error": ...}`` reply) or could not be reached."""


def pcm16(samples: np.ndarray) -> bytes:
    """float (samples,) or (samples, channels) in [-1, 1] -> 16-bit little-endian mono PCM."""
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()  # the server divides by 32768


class VoskClient:
    """One connection; each call sends one message and returns the server's reply (a dict)."""

    def __init__(self, url: str, sample_rate_hz: int = 16000, words: bool = True, max_alternatives: int = 0,
                 phrase_list: list[str] | None = None) -> None:
        self.url = url
        self.sample_rate_hz = sample_rate_hz
        self._stack = contextlib.ExitStack()  # (websockets wants its connection used as a context manager)
        try:
            # no per-message deflate: PCM hardly compresses, and zlib on every frame costs both ends
            # CPU (asr serve's own listener declines it; the Serve proxy on a cluster would grant it)
            self._ws: ClientConnection = self._stack.enter_context(
                connect(url, open_timeout=OPEN_TIMEOUT_S, max_size=None, compression=None))
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ServerError(f"cannot connect to {url}: {exc}") from None
        config: dict[str, Any] = {"sample_rate": sample_rate_hz, "words": int(words), "max_alternatives": max_alternatives}
        if phrase_list is not None:
            config["phrase_list"] = phrase_list
        self._ws.send(json.dumps({"config": config}))

    def send_audio(self, samples: np.ndarray | bytes) -> dict[str, Any]:
        """One block of audio (float samples at ``sample_rate_hz``, or PCM bytes); the reply."""
        self._ws.send(samples if isinstance(samples, bytes) else pcm16(samples))
        return self._reply()

    def eof(self) -> dict[str, Any]:
        """The final result of what remains; the server then closes the connection."""
        self._ws.send(json.dumps({"eof": 1}))
        return self._reply()

    def reset(self) -> dict[str, Any]:
        """The final result of the current utterance; the connection stays open."""
        self._ws.send(json.dumps({"reset": 1}))
        return self._reply()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> VoskClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reply(self) -> dict[str, Any]:
        try:
            reply = json.loads(self._ws.recv(timeout=REPLY_TIMEOUT_S))
        except ConnectionClosed as exc:
            raise ServerError(f"{self.url} closed the connection ({exc})") from None
        except TimeoutError:
            raise ServerError(f"{self.url} sent no reply in {REPLY_TIMEOUT_S:.0f} s") from None
        if "error" in reply:
            raise ServerError(f"{self.url}: {reply['error']}")
        return reply


def reply_result(reply: dict[str, Any], stream_id: str = "server") -> RecognitionResult | None:
    """A reply as a ``RecognitionResult`` (partial or final; the best alternative of an
    alternatives reply), or None for an empty partial."""
    if "partial" in reply:
        return RecognitionResult(stream_id, reply["partial"], False, 0.0, 0.0) if reply["partial"] else None
    best = reply["alternatives"][0] if "alternatives" in reply else reply
    words = [WordTiming(w["word"], w["start"], w["end"], w.get("conf")) for w in best.get("result", [])]
    start_s, end_s = (words[0].start_s, words[-1].end_s) if words else (0.0, 0.0)
    return RecognitionResult(stream_id, best.get("text", ""), True, start_s, end_s, words)
