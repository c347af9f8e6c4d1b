"""What a ``StreamingPipeline`` session keeps per push and per chain: ``Chain`` (one submission
through the stage actors, shared by the streams it carries), ``Push`` (one push of a stream),
``StreamState`` (a stream's session-side state) and ``PushHandle`` (a push to follow).

A chain's results are fetched as they arrive: each of its refs gets a callback
(``ObjectRef.future``) that keeps the value, so by the time a stream asks, its results are
already in this process, and ``Push.settled`` (a ``concurrent.futures.Future``) lets an event
loop wait for them without a thread (``asr serve``'s front door)."""

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
    ``list[StageItem]`` whose ``data`` is each push's ``list[RecognitionResult]``. Each ref
    is fetched once, on its own, and shared by the streams it carries: a push is back as soon
    as its own decoder's ref is (not the chain's slowest), and a crashed actor fails only the
    pushes whose results depended on it.

    ``settled(key, seq)`` resolves once that push's ref is back (a value or a failure); a
    chain that failed before it was sent (``failure``) is settled from the start."""

    def __init__(
        self, refs: list[Any] | None = None, keys: list[list[tuple[str, int]]] | None = None,
        failure: BaseException | None = None, timeout_s: float | None = None,
    ) -> None:
        self.refs = refs or []
        self.keys = keys or [[] for _ in self.refs]  # (actor-side stream key, seq) of the pushes in each ref
        self.timeout_s = timeout_s
        self.failure = failure
        self._ref_of = {key: i for i, keys_i in enumerate(self.keys) for key in keys_i}
        self._settled = [Future() for _ in self.refs]  # per ref: back (fetched, or failed)
        self._arrivals = threading.Lock()  # guards _fetched; never held while waiting
        self._fetched: list[Any] = [_MISSING] * len(self.refs)  # per ref: its value, once back
        self._items: list[dict[tuple[str, int], StageItem | BaseException] | None] = [None] * len(self.refs)
        self._locks = [threading.Lock() for _ in self.refs]  # per ref: held while its ray.get waits
        for i, ref in enumerate(self.refs):
            ref.future().add_done_callback(functools.partial(self._arrived, i))

    def _arrived(self, i: int, future: Future) -> None:
        """Ref ``i`` is back (on Ray's callback thread, which must never wait here: ``item``
        may be waiting in ``ray.get`` for it): keep its value; a failure is fetched again by
        ``item`` with ``ray.get``, which sorts it as it always did."""
        value = future.result() if not future.cancelled() and future.exception() is None else _MISSING
        with self._arrivals:
            self._fetched[i] = value
        settle(self._settled[i])

    def settled(self, key: str, seq: int) -> Future | None:
        """The future that resolves once push (key, seq) is back; None if the chain failed
        before it was sent (it is back already)."""
        return None if self.failure is not None else self._settled[self._ref_of[(key, seq)]]

    def done(self, key: str, seq: int) -> bool:
        """Whether push (key, seq) is back."""
        settled = self.settled(key, seq)
        return settled is None or settled.done()

    def item(self, key: str, seq: int) -> StageItem | BaseException:
        """Push (key, seq)'s item, or the exception that failed it (or the whole chain before
        it was sent). Blocks, at most ``timeout_s``, while its ref is not back."""
        if self.failure is not None:
            return self.failure
        return self._ref_items(self._ref_of[(key, seq)])[(key, seq)]

    def clean(self, key: str, seq: int) -> bool:
        """Whether push (key, seq) is back without an error (its results need no recovery)."""
        if not self.done(key, seq):
            return False
        item = self.item(key, seq)
        return isinstance(item, StageItem) and item.error is None

    def _ref_items(self, i: int) -> dict[tuple[str, int], StageItem | BaseException]:
        with self._locks[i]:
            if self._items[i] is None:
                with self._arrivals:
                    value = self._fetched[i]
                try:
                    items = value if value is not _MISSING else ray.get(self.refs[i], timeout=self.timeout_s)
                    self._items[i] = {(item.stream_id, item.seq): item for item in items}
                except _CAUGHT as exc:
                    self._items[i] = dict.fromkeys(self.keys[i], exc)
            return self._items[i]


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
        back = chain.settled(self.key, self.seq)
        if back is None:
            settle(self.settled)
        else:
            back.add_done_callback(lambda _: settle(self.settled))


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
        item = self._push.chain.item(self._push.key, self.seq)
        return item if isinstance(item, StageItem) else None


@dataclass
class PipelineStats:
    """Backpressure and submission counters over all streams of a pipeline."""

    max_inflight: int = 0  # most pushes of one stream in flight at once (bounded by max_inflight_chunks)
    blocked_pushes: int = 0  # pushes that had to wait for an earlier push of their stream
    chains: int = 0  # chains submitted (each carries the pushes of one or more streams)
    max_pushes_per_chain: int = 0
    recoveries: int = 0  # streams replayed on restarted actors after a stage actor crashed
    lost_streams: int = 0  # streams that could not be replayed (StreamError)
