"""The acoustic actor: batches the waiting chunks of all streams into one model call.

torch is imported inside the actor (``_torch``), not at the top: the stream driver imports this
module to start the actor and stays torch-free."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.streaming.actors import process_rss_mb
from pipeline.streaming.items import StageItem, StateLostError, StreamOrderError, _tensor
from pipeline.streaming.placement import unpacked_bundle

if TYPE_CHECKING:
    import torch

def _torch():
    import torch

    return torch


TURN_TIMEOUT_S = 30.0  # a call whose predecessor never arrives fails after this (a restart is caught sooner, by the epoch)


@dataclass
class _Request:
    """One waiting call of the acoustic actor."""

    seq: int
    features: torch.Tensor  # (frames, feature_dim)
    is_last: bool
    future: asyncio.Future
    events: tuple = ()  # utterance edges in ``features`` (``FeaturePush.events``)


class AcousticActor:
    """Wraps ``AcousticStage``; batches the waiting chunks of all streams into one call.

    An asyncio actor: ``process`` calls are queued per stream in sequence order, and one
    background loop takes every stream that has calls ready and runs them on a worker
    thread: one ``AcousticStage.process`` over all those streams' first calls, then one over
    the streams that had a second call ready, and so on. Each call thus gets exactly the
    frames it would get alone, so partial results do not depend on batching.
    """

    def __init__(
        self,
        bundle_files: dict[str, bytes],
        chunk_frames: int,
        right_context_frames: int,
        max_batch_wait_ms: float,
        max_batch_streams: int,
        device: str = "cpu",
        num_threads: int = 0,
        quantize: str = "none",
    ) -> None:
        from workers.stages import AcousticStage

        torch = _torch()
        with unpacked_bundle(bundle_files, device, quantize) as bundle:
            self.stage = AcousticStage(bundle.model, chunk_frames, right_context_frames, device)
            self.num_tokens = bundle.model_config.num_tokens
        self.max_batch_wait_s = max_batch_wait_ms / 1000
        self.max_batch_streams = max(1, max_batch_streams)
        self._next_seq: dict[str, int] = {}  # open streams: next sequence number to take
        self._held: dict[str, dict[int, _Request]] = {}  # arrived before their predecessors
        self._ready: dict[str, list[_Request]] = {}  # in order, waiting for the next batch
        self._ready_since = 0.0  # monotonic time the oldest ready call arrived
        self._changed: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        # The model runs on this thread; OpenMP's thread count is per thread, so set it there
        # (Ray starts actors with OMP_NUM_THREADS=1).
        threads = (num_threads,) if num_threads > 0 else (torch.get_num_threads(),)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acoustic", initializer=torch.set_num_threads, initargs=threads)
        self._stats = {"rounds": 0, "calls": 0, "max_streams_per_round": 0}
        self._epoch = uuid.uuid4().hex  # this incarnation: a restart after a crash gets a new one

    def epoch(self) -> str:
        """This incarnation's id. The driver sends it with each item; an item that expects
        another one fails at once with ``StateLostError`` (its stream's state died with the
        previous incarnation) instead of waiting for predecessors that will never come."""
        return self._epoch

    async def process(self, stream_id: str, seq: int, features: torch.Tensor, is_last: bool,
                      events: tuple = ()) -> tuple[torch.Tensor, list[tuple[int, str, float]]]:
        """features (frames, feature_dim) of chunk ``seq`` and its utterance edges -> log-probs
        (frames', num_tokens) and the edges re-indexed into them (``AcousticStage.process_events``)."""
        self._start_loop()
        request = _Request(seq, features, is_last, asyncio.get_running_loop().create_future(), tuple(events))
        self._held.setdefault(stream_id, {})[seq] = request
        self._release(stream_id)
        try:
            return await asyncio.wait_for(request.future, TURN_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.drop(stream_id)
            raise StreamOrderError(f"stream {stream_id}: chunk {seq} waited {TURN_TIMEOUT_S:.0f} s for its predecessors") from None

    async def process_many(self, acoustic: int, *parts: list[StageItem]) -> list[StageItem]:
        """item.data: features (frames, feature_dim) -> log-probs (frames', num_tokens), for
        the items of this actor's streams (``item.acoustic == acoustic``) in ``parts`` (the
        outputs of the feature actors), many streams at once (they join the batches like
        separate calls)."""
        items = [item for part in parts for item in part if item.acoustic == acoustic]
        t_in = time.time()

        async def one(item: StageItem) -> StageItem:
            if item.error is None and item.acoustic_epoch and item.acoustic_epoch != self._epoch:
                item = dataclasses.replace(item, data=None, error=f"{StateLostError.__name__}: stream {item.stream_id}: the acoustic actor restarted (state lost)")
            if item.error is None:
                try:
                    log_probs, events = await self.process(item.stream_id, item.seq, _tensor(item.data), item.is_last, item.events)
                    return dataclasses.replace(item, data=log_probs.numpy(), events=tuple(events),
                                               stage_times=item.stage_times + (t_in, time.time()))
                except Exception as exc:
                    item = dataclasses.replace(item, data=None, error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await self.drop(item.stream_id)
            return item

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def drop(self, stream_id: str) -> None:
        """Forget a stream: fail its waiting calls and end its model state (on the model thread)."""
        waiting = list(self._held.pop(stream_id, {}).values()) + self._ready.pop(stream_id, [])
        _answer(waiting, exception=StreamOrderError(f"stream {stream_id} was dropped"))
        if self._next_seq.pop(stream_id, None) is not None:
            end = [(stream_id, _torch().zeros(0, self.stage.model.config.input_dim), True)]
            await asyncio.get_running_loop().run_in_executor(self._executor, self.stage.process, end)

    def held_streams(self) -> int:
        """Streams with any state here: model state, or calls held or waiting for a batch."""
        return len(self.stage.stream_ids() | set(self._next_seq) | {k for k, v in self._held.items() if v} | {k for k, v in self._ready.items() if v})

    def rss_mb(self) -> float:
        """This actor process's resident memory, MB."""
        return process_rss_mb()

    def device(self) -> str:
        """Where the model runs ("cpu", "cuda:0")."""
        return str(next(self.stage.model.parameters()).device)

    def stats(self) -> dict[str, int]:
        """rounds (batched model calls), calls answered, and the most streams in one round."""
        return dict(self._stats)

    def _start_loop(self) -> None:
        if self._loop_task is None:
            self._changed = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    def _release(self, stream_id: str) -> None:
        """Move the stream's held calls that are next in sequence to the ready queue."""
        held = self._held.get(stream_id, {})
        seq = self._next_seq.get(stream_id, 0)
        while seq in held:
            if not self._ready:
                self._ready_since = time.monotonic()
            self._ready.setdefault(stream_id, []).append(held.pop(seq))
            seq += 1
        self._next_seq[stream_id] = seq
        if not held:
            self._held.pop(stream_id, None)
        self._changed.set()

    def _batch_full(self) -> bool:
        open_streams = max(1, len(self._next_seq))
        return len(self._ready) >= min(self.max_batch_streams, open_streams)

    async def _wait_for_batch(self) -> None:
        """Wait until calls are ready, then up to max_batch_wait_ms for more streams to join."""
        while not self._ready:
            self._changed.clear()
            await self._changed.wait()
        while not self._batch_full() and (left := self._ready_since + self.max_batch_wait_s - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def _take_batch(self) -> list[tuple[str, list[_Request]]]:
        taken = list(self._ready.items())[: self.max_batch_streams]
        for stream_id, requests in taken:
            del self._ready[stream_id]
            if requests[-1].is_last:
                self._next_seq.pop(stream_id, None)
        return taken  # streams left over (beyond max_batch_streams) have waited already: next round at once

    def _run(self, batch: list[tuple[str, list[_Request]]]) -> list[tuple[_Request, tuple[torch.Tensor, list]]]:
        """On the model thread: round k runs the k-th ready call of every stream that has one."""
        answered = []
        for k in range(max(len(requests) for _, requests in batch)):
            row = [(sid, requests[k]) for sid, requests in batch if k < len(requests)]
            outputs = self.stage.process_events([(sid, r.features, r.is_last, r.events) for sid, r in row])
            answered += [(r, log_probs) for (_, r), log_probs in zip(row, outputs)]
            self._stats["rounds"] += 1
            self._stats["max_streams_per_round"] = max(self._stats["max_streams_per_round"], len(row))
        return answered

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            try:
                answered = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # answer every caller; the loop itself must survive
                _answer([r for _, requests in batch for r in requests], exception=exc)
                continue
            for request, log_probs in answered:
                _answer([request], log_probs)
            self._stats["calls"] += len(answered)


def _answer(requests: list[_Request], result: Any = None, exception: BaseException | None = None) -> None:
    """Resolve calls with ``result`` or ``exception`` (skipping callers that timed out)."""
    for request in requests:
        if request.future.done():
            continue
        if exception is not None:
            request.future.set_exception(exception)
        else:
            request.future.set_result(result)
