"""Recovering streams after a stage actor crashed: ``StreamRecovery``, the part of
``StreamingPipeline`` that waits for restarted actors, replays a stream's kept audio under a
new key, or drops the stream when it cannot."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import ray

from pipeline.streaming.chain import Push, StreamState, settle
from pipeline.streaming.items import StateLostError, StreamError, StreamOrderError

if TYPE_CHECKING:
    from pipeline.config import StreamingConfig
    from pipeline.streaming.chain import PipelineStats

MAX_RECOVERIES_PER_STREAM = 5  # replays of one stream before it is given up (a crash loop)
# Errors (as the stage actors report them, "Name: message") that mean a stage actor lost the
# stream's state: it restarted after a crash, or the stream's calls could no longer be ordered.
_STATE_LOST_ERRORS = frozenset({StateLostError.__name__, StreamOrderError.__name__, "RayActorError", "ActorDiedError",
                                "ActorUnavailableError", "WorkerCrashedError"})


class StreamRecovery:
    """Mixin of ``StreamingPipeline``: what a session does when a push comes back failed.
    It uses the pipeline's actors (``actors``, ``_acoustics``, ``_epochs``), its open streams
    and submit queue under ``_cond``, ``_enqueue`` and its ``stats``."""

    streaming: StreamingConfig
    stats: PipelineStats
    sample_rate_hz: int
    actors: dict[str, Any]
    _acoustics: list[Any]
    _epochs: list[str]
    _recovering: bool
    _cond: threading.Condition
    _queue: list[tuple[str, StreamState, Push]]
    _streams: dict[str, StreamState]

    def _wait_for_actors(self, timeout_s: float | None = None) -> None:
        """After a stream failed, wait until every stage actor answers again (a crashed one
        restarts: new streams must not reach it mid-restart), then learn the acoustic actors'
        incarnations. Raises ``RayError`` (e.g. ``GetTimeoutError``) if one does not come back."""
        deadline = time.monotonic() + (timeout_s or self.streaming.recovery_timeout_s)
        for actor in self.actors.values():
            while True:
                try:
                    ray.get(actor.__ray_ready__.remote(), timeout=max(0.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self._epochs = ray.get([a.epoch.remote() for a in self._acoustics], timeout=max(0.0, deadline - time.monotonic()))
        self._recovering = False

    def _recover(self, stream_id: str, stream: StreamState, error: BaseException | str) -> None:
        """A stage actor that holds this stream's state crashed: wait for it to restart, then
        push the stream's kept audio again under a new key (see ``ReplayBuffer``). Raises
        ``StreamError`` (and drops the stream) when that cannot be done."""
        with self._cond:  # the old key's pushes, queued or in flight, are void
            self._queue = [entry for entry in self._queue if entry[1] is not stream]
            for push in stream.inflight:
                settle(push.settled)
            stream.inflight.clear()
        plan = stream.buffer.plan()
        reason = None
        if stream.recoveries >= MAX_RECOVERIES_PER_STREAM:
            reason = f"its actors crashed {stream.recoveries + 1} times"
        elif plan is None:
            reason = (f"more than streaming.replay_buffer_s={self.streaming.replay_buffer_s:g} s of its audio since its "
                      f"last final was needed to replay it")
        else:
            try:
                self._wait_for_actors()
            except ray.exceptions.RayError as exc:
                reason = f"the crashed actor did not come back within {self.streaming.recovery_timeout_s:g} s ({type(exc).__name__})"
        if reason is not None:
            self.stats.lost_streams += 1
            self._abort(stream_id)
            raise StreamError(f"stream {stream_id} was lost after a stage actor crashed ({error}): {reason}")
        with contextlib.suppress(ray.exceptions.RayError):  # free the old key's state where it survived
            ray.get([actor.drop.remote(stream.key) for actor in self.actors.values()], timeout=10)
        stream.recoveries += 1
        self.stats.recoveries += 1
        stream.key = f"{stream_id}~{stream.recoveries}"
        stream.next_seq = 0
        stream.offset_s = plan.offset_s
        stream.skip_finals = stream.finals_delivered if plan.from_start else 0
        for audio, rate_hz in plan.pushes:
            self._enqueue(stream_id, stream, audio, rate_hz, keep=False)
        if stream.closing:
            self._enqueue(stream_id, stream, None, self.sample_rate_hz)

    def _abort(self, stream_id: str) -> None:
        """Forget a failed stream everywhere (best effort: an actor may be restarting)."""
        with self._cond:
            stream = self._streams.pop(stream_id, None)
            for entry in self._queue:
                if entry[0] == stream_id:
                    settle(entry[2].settled)
            self._queue = [entry for entry in self._queue if entry[0] != stream_id]
        self._recovering = True
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get([actor.drop.remote(stream.key if stream else stream_id) for actor in self.actors.values()], timeout=10)


def state_lost(error: BaseException | str) -> bool:
    """Whether a push failed because a stage actor lost the stream's state (it crashed and
    restarted, or died mid-call), as opposed to the stream's own input or a bug."""
    if isinstance(error, BaseException):
        return isinstance(error, ray.exceptions.RayActorError | ray.exceptions.GetTimeoutError) or (
            isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, ray.exceptions.RayActorError))
    return error.split(":", 1)[0] in _STATE_LOST_ERRORS
