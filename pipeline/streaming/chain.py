"""What a ``StreamingPipeline`` session keeps per push and per chain: ``Chain`` (one submission
through the stage actors, shared by the streams it carries), ``Push`` (one push of a stream),
``StreamState`` (a stream's session-side state) and ``PushHandle`` (a push to follow).

A chain's results are fetched as they arrive: each of its refs gets a callback
(``ObjectRef.future``) that keeps the value, so by the time a stream asks, its results are
already in this process, and ``Chain.settled`` / ``Push.settled`` (``concurrent.futures``)
let an event loop wait for them without a thread (``asr serve``'s front door)."""

from __future__ import annotations

import functools
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from pipeline.streaming.items import StageItem
from pipeline.streaming.replay import ReplayBuffer

_CAUGHT = (ray.exceptions.RayTaskError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)
_MISSING = object()


def settle(future: Future) -> None:
    """Resolve ``future`` (to None) unless it already is."""
    if not future.done():
        future.set_result(None)


class Chain:
    """One submission through the actors; its refs (one per decoder actor involved) yield
    ``list[StageItem]`` whose ``data`` is each push's ``list[RecognitionResult]``. Fetched
    once, shared by the chain's streams. Each ref is fetched on its own, so a crashed actor
    fails only the pushes whose results depended on it.

    ``settled`` resolves once every ref is back (a value or a failure); a chain that failed
    before it was sent (``failure``) is settled from the start."""

    def __init__(
        self, refs: list[Any] | None = None, keys: list[list[tuple[str, int]]] | None = None,
        failure: BaseException | None = None, timeout_s: float | None = None,
    ) -> None:
        self.refs = refs or []
        self.keys = keys or [[] for _ in self.refs]  # (actor-side stream key, seq) of the pushes in each ref
        self.timeout_s = timeout_s
        self.settled: Future = Future()
        self._lock = threading.Lock()  # guards _results; held while results() waits in ray.get
        self._arrivals = threading.Lock()  # guards _fetched and _left; never held while waiting
        self._results: dict[tuple[str, int], StageItem | BaseException] | BaseException | None = failure
        self._fetched: list[Any] = [_MISSING] * len(self.refs)
        self._left = len(self.refs)
        if failure is not None or not self.refs:
            settle(self.settled)
        for i, ref in enumerate(self.refs):
            ref.future().add_done_callback(functools.partial(self._arrived, i))

    def _arrived(self, i: int, future: Future) -> None:
        """A ref is back (on Ray's callback thread, which must never wait here: ``results`` may
        be waiting in ``ray.get`` for it): keep its value; a failure is fetched again by
        ``results`` with ``ray.get``, which sorts it as it always did."""
        value = future.result() if not future.cancelled() and future.exception() is None else _MISSING
        with self._arrivals:
            self._fetched[i] = value
            self._left -= 1
            last = self._left == 0
        if last:
            settle(self.settled)

    def done(self) -> bool:
        return self.settled.done() or self._results is not None

    def results(self) -> dict[tuple[str, int], StageItem | BaseException] | BaseException:
        """(stream key, seq) -> its item, or the exception that failed it; or the exception
        that failed the whole chain before it was sent. Blocks, at most ``timeout_s`` per ref,
        for refs not back yet."""
        with self._lock:
            if self._results is None:
                results: dict[tuple[str, int], StageItem | BaseException] = {}
                with self._arrivals:
                    fetched = list(self._fetched)
                for ref, keys, value in zip(self.refs, self.keys, fetched):
                    try:
                        items = value if value is not _MISSING else ray.get(ref, timeout=self.timeout_s)
                        results.update({(i.stream_id, i.seq): i for i in items})
                    except _CAUGHT as exc:
                        results.update(dict.fromkeys(keys, exc))
                self._results = results
            return self._results

    def clean(self, key: str, seq: int) -> bool:
        """Whether push (key, seq) is back without an error (its results need no recovery)."""
        if not self.done():
            return False
        outcome = self.results()
        item = None if isinstance(outcome, BaseException) else outcome.get((key, seq))
        return isinstance(item, StageItem) and item.error is None


@dataclass
class Push:
    """One push of a stream (``audio=None``: its end) under actor-side key ``key``; ``chain``
    is set once submitted; ``settled`` resolves when its chain is back (or it is void)."""

    key: str
    seq: int
    audio: np.ndarray | None
    rate_hz: int
    chain: Chain | None = None
    settled: Future = field(default_factory=Future)

    def submit(self, chain: Chain) -> None:
        """The submitter sent this push in ``chain`` (call with the session's lock held)."""
        self.chain = chain
        chain.settled.add_done_callback(lambda _: settle(self.settled))


@dataclass
class StreamState:
    key: str  # the id the actors keep its state under (a new one for each replay after a crash)
    buffer: ReplayBuffer  # its audio, kept for a replay
    features: int = 0  # index of the feature actor that keeps this stream's state
    acoustic: int = 0  # index of the acoustic actor that keeps this stream's state
    decoder: int = 0  # index of the decoder actor that keeps this stream's state
    next_seq: int = 0
    inflight: deque = field(default_factory=deque)  # Push, oldest first: queued or submitted, not yet collected
    last: Push | None = None  # the latest push (collected or not), for last_push
    closing: bool = False  # its end has been queued (a replay queues it again)
    finals_delivered: int = 0  # finals the caller got
    skip_finals: int = 0  # after a replay from the start: finals (and the partials before them) the caller has
    offset_s: float = 0.0  # added to result times: stream time where the current key's audio starts
    recoveries: int = 0
    options: Any = None  # StreamOptions for the decoder, sent with every push


@dataclass(frozen=True, eq=False)
class PushHandle:
    """One push of a stream, to follow to its completion (``StreamingPipeline.last_push``)."""

    stream_id: str
    _push: Push

    @property
    def seq(self) -> int:
        return self._push.seq

    def submitted(self) -> bool:
        """Whether the submitter thread has sent this push in a chain."""
        return self._push.chain is not None

    def item(self) -> StageItem | None:
        """What came back for this push (blocks until its chain is back): its ``StageItem``, whose
        ``data`` is the push's ``list[RecognitionResult]`` and ``stage_times`` when it entered and
        left each stage; None when the whole chain failed."""
        if self._push.chain is None:
            raise RuntimeError(f"stream {self.stream_id}: push {self.seq} has not been submitted yet")
        outcome = self._push.chain.results()
        item = None if isinstance(outcome, BaseException) else outcome.get((self._push.key, self.seq))
        return item if isinstance(item, StageItem) else None
