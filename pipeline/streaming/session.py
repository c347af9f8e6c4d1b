"""``StreamingPipeline``: sessions over the stage actors, with the submitter thread that
sends the queued pushes of all streams as one chain, and backpressure per stream."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import numpy as np
import ray

from pipeline.cluster.session import connect_ray, shutdown_ray
from pipeline.config import AppConfig
from pipeline.streaming.chain import Chain, PipelineStats, Push, PushHandle, StreamState, settle
from pipeline.streaming.items import StageItem, StreamError
from pipeline.streaming.placement import ACTOR_START_TIMEOUT_S
from pipeline.streaming.recovery import StreamRecovery, state_lost
from pipeline.streaming.replay import ReplayBuffer
from pipeline.streaming.stage_actors import StageActors, start_stage_actors
from workers.audio.checks import validate_samples
from workers.decoding.decoder import DecoderConfig
from workers.decoding.stage import RecognitionResult
from workers.model.bundle_config import check_bundle


class StreamingPipeline(StreamRecovery):
    """Sessions over the four stage actors; many concurrent streams share them.

    >>> pipe = StreamingPipeline(load_config())
    >>> sid = pipe.open_stream()
    >>> for chunk in chunks: show(pipe.push(sid, chunk, 16000))   # partials, endpoint finals
    >>> show(pipe.close(sid))                                     # the rest, ending with the final
    >>> pipe.shutdown()

    ``bundle_path``: model bundle directory (default: the shipped ``models/default``);
    ``decoder_config``: default ``config.decoder``; ``address``: Ray cluster to connect to
    (default RAY_ADDRESS, else a local Ray) unless Ray is already initialised.
    """

    def __init__(
        self,
        config: AppConfig | None = None,
        bundle_path: str | Path | None = None,
        decoder_config: DecoderConfig | None = None,
        address: str | None = None,
        actors: StageActors | None = None,
    ) -> None:
        self.config = config or AppConfig()
        self.streaming = self.config.streaming  # range-checked by StreamingConfig itself
        # actors given: attach to a running set (a server's replicas share one); it is not
        # ours to stop. Otherwise start our own and stop it on shutdown.
        bundle = None if actors is not None else check_bundle(bundle_path)  # checked here (torch-free), before any actor starts
        self._owns_ray = connect_ray(address)
        self._owns_actors = actors is None
        self.stats = PipelineStats()
        self._streams: dict[str, StreamState] = {}
        self._recovering = False  # a stream failed: open_stream first waits for restarted actors
        self.actors: dict[str, Any] = {}  # stage name -> actor handle (ingest, features, acoustic, decoder)
        # Pushes wait in _queue for the submitter thread; _cond guards _streams and _queue.
        self._cond = threading.Condition()
        self._queue: list[tuple[str, StreamState, Push]] = []
        self._queued_since = 0.0
        self._epochs: list[str] = []  # the acoustic actors' incarnations (``AcousticActor.epoch``)
        self._opened = 0  # streams opened so far: stream k uses acoustic/decoder actor k % their count
        self._stopping = False
        self._submitter: threading.Thread | None = None
        self._set: StageActors | None = None
        try:
            self._set = actors or start_stage_actors(self.config, bundle, decoder_config)
            self.sample_rate_hz = self._set.sample_rate_hz
            self._ingest, self._features = self._set.ingest, self._set.features
            self._acoustics, self._decoders = self._set.acoustics, self._set.decoders
            self.actors = self._set.named()
            self._epochs = ray.get([a.epoch.remote() for a in self._acoustics], timeout=ACTOR_START_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._submitter = threading.Thread(target=self._submit_loop, name="asr-submit", daemon=True)
        self._submitter.start()

    @property
    def stage_actors(self) -> StageActors:
        """The stage actors this pipeline's streams run on (to share with other sessions)."""
        assert self._set is not None
        return self._set

    # ---- streams ---------------------------------------------------------------------
    def open_stream(self, stream_id: str | None = None, options: Any = None) -> str:
        """Start a stream; returns its id (a new unique one unless given). ``options``: the
        stream's ``workers.stages.StreamOptions`` (alternatives, phrase list), default none."""
        stream_id = stream_id or uuid.uuid4().hex
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id} is already open")
        if self._recovering:
            self._wait_for_actors()
        with self._cond:
            k = self._opened
            self._streams[stream_id] = StreamState(stream_id, ReplayBuffer(self.streaming.replay_buffer_s), features=k % len(self._features),
                                               acoustic=k % len(self._acoustics), decoder=k % len(self._decoders), options=options)
            self._opened += 1
        return stream_id

    def push(self, stream_id: str, samples: np.ndarray | Any, rate_hz: int) -> list[RecognitionResult]:
        """Send audio (samples,) or (samples, channels), float in [-1, 1] or integer PCM, at
        ``rate_hz``. Returns the results completed so far, in order (partials, endpoint
        finals). Blocks while the stream has ``max_inflight_chunks`` pushes in flight."""
        stream = self._stream(stream_id)
        audio = samples.detach().cpu().numpy() if hasattr(samples, "detach") else np.asarray(samples)  # a torch tensor too
        if audio.size == 0:
            return self._collect(stream_id, stream, block=False)
        if rate_hz <= 0:
            raise ValueError(f"stream {stream_id}: rate_hz must be > 0, got {rate_hz}")
        validate_samples(audio, f"stream {stream_id}")  # bad input fails here, not inside the chain
        results = self._make_room(stream_id, stream)
        self._enqueue(stream_id, stream, audio, rate_hz)
        return results + self._collect(stream_id, stream, block=False)

    def close(self, stream_id: str) -> list[RecognitionResult]:
        """Flush the stream; returns every remaining result in order, ending with the final(s)."""
        stream = self._stream(stream_id)
        results = self._make_room(stream_id, stream)
        stream.closing = True
        self._enqueue(stream_id, stream, None, self.sample_rate_hz)
        results += self._collect(stream_id, stream, block=True)
        with self._cond:
            del self._streams[stream_id]
        return results

    def results(self, stream_id: str, wait: bool = False) -> list[RecognitionResult]:
        """The stream's results completed since it last returned some; ``wait``: first wait
        until every push made so far is back (a server answers each frame this way)."""
        stream = self._stream(stream_id)
        return self._collect(stream_id, stream, block=wait)

    def push_is_quick(self, stream_id: str | None) -> bool:
        """Whether ``push`` (``open_stream`` when ``stream_id`` is None) would return without
        waiting: no backpressure, no restarted actors to wait for, no failed push to recover.
        An event loop pushes itself when it is, and hands the push to a thread otherwise."""
        if stream_id is None:
            return not self._recovering
        stream = self._streams.get(stream_id)
        return (stream is not None and len(stream.inflight) < self.streaming.max_inflight_chunks
                and self._finished_cleanly(stream))

    def completion(self, stream_id: str) -> Future:
        """A new future that resolves once every push of the stream made so far is back from
        the stages (or void), for an event loop to await (``asyncio.wrap_future``) instead of
        blocking in ``results(wait=True)``."""
        pushes = list(self._stream(stream_id).inflight)
        done: Future = Future()
        left = [len(pushes)]
        lock = threading.Lock()

        def one_back(_: Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                settle(done)

        if not pushes:
            settle(done)
        for push in pushes:
            push.settled.add_done_callback(one_back)
        return done

    def results_now(self, stream_id: str) -> list[RecognitionResult]:
        """``results(stream_id)`` without ever waiting: the results of the pushes that are back,
        up to the first that failed (the next ``push`` or ``results``, from a thread, recovers
        the stream or drops it; ``push_is_quick`` says so until then)."""
        return self._collect(stream_id, self._stream(stream_id), block=False, stop_at_failure=True)

    def abort(self, stream_id: str) -> None:
        """Abandon a stream without waiting (its client went away): its end is queued so that
        every stage frees its state in order behind its pushes, and nothing more is returned."""
        with self._cond:
            stream = self._streams.pop(stream_id, None)
        if stream is None or stream.closing:
            return
        stream.closing = True
        self._enqueue(stream_id, stream, None, self.sample_rate_hz, keep=False)

    def open_streams(self) -> int:
        """Streams open (opened, not yet closed, aborted or lost)."""
        return len(self._streams)

    def inflight(self, stream_id: str) -> int:
        """Chains of this stream submitted but not yet collected (<= max_inflight_chunks)."""
        return len(self._stream(stream_id).inflight)

    def last_push(self, stream_id: str) -> PushHandle:
        """The stream's latest push (or close), to follow with ``completed`` (e.g. for latency)."""
        push = self._stream(stream_id).last
        if push is None:
            raise ValueError(f"stream {stream_id} has no push yet")
        return PushHandle(stream_id, push)

    def completed(self, pushes: list[PushHandle], timeout_s: float = 0.0) -> list[PushHandle]:
        """The pushes among ``pushes`` that are back (failed ones included; a push not yet
        submitted is not). Waits up to ``timeout_s`` for the first submitted one (pushes come
        back about in order), without polling."""
        submitted = [p for p in pushes if p.submitted()]
        if submitted:
            wait_futures([submitted[0]._push.settled], timeout=timeout_s)
        return [p for p in submitted if p._push.settled.done()]

    def acoustic_stats(self) -> dict[str, int]:
        """The acoustic actors' batching counters (``AcousticActor.stats``), summed (the
        most streams in one round: the largest over the actors)."""
        per_actor = ray.get([a.stats.remote() for a in self._acoustics])
        total = {key: sum(st[key] for st in per_actor) for key in ("rounds", "calls")}
        return {**total, "max_streams_per_round": max(st["max_streams_per_round"] for st in per_actor)}

    def shutdown(self) -> None:
        """Stop the actors (open streams are abandoned) and Ray if this pipeline started it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._submitter is not None:
            self._submitter.join()
            self._submitter = None
        if self._set is not None and self._owns_actors:
            self._set.kill()
        self.actors, self._streams, self._set = {}, {}, None
        if self._owns_ray:
            shutdown_ray()
        self._owns_ray = False

    def __enter__(self) -> StreamingPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ---- internals -------------------------------------------------------------------
    def _stream(self, stream_id: str) -> StreamState:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise KeyError(f"stream {stream_id} is not open") from None

    @staticmethod
    def _finished_cleanly(stream: StreamState) -> bool:
        """Whether the pushes at the front of the stream that are back all came back without an
        error (so collecting them neither recovers nor drops the stream)."""
        for push in list(stream.inflight):
            if push.chain is None or not push.chain.done(push.key, push.seq):
                return True
            if not push.chain.clean(push.key, push.seq):
                return False
        return True

    def _enqueue(self, stream_id: str, stream: StreamState, audio: np.ndarray | None, rate_hz: int, keep: bool = True) -> None:
        """Queue one push (``audio=None``: the end of the stream) for the submitter thread;
        ``keep``: also keep its audio for a replay."""
        if keep and audio is not None:
            stream.buffer.add(audio, rate_hz)
        push = Push(stream.key, stream.next_seq, audio, rate_hz)
        stream.next_seq += 1
        with self._cond:
            if not self._queue:
                self._queued_since = time.monotonic()
            self._queue.append((stream_id, stream, push))
            stream.inflight.append(push)
            stream.last = push
            self.stats.max_inflight = max(self.stats.max_inflight, len(stream.inflight))
            self._cond.notify_all()

    def _submit_loop(self) -> None:
        """The submitter thread: takes the queued pushes of all streams, waiting up to
        ``max_submit_wait_ms`` for every open stream to have one, and submits them as one
        chain. Ray call overhead is then paid per chain, not per stream."""
        wait_s = self.streaming.max_submit_wait_ms / 1000
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    failed = Chain(failure=StreamError("the pipeline was shut down"))
                    for *_, push in self._queue:
                        push.submit(failed)
                    self._queue = []
                    self._cond.notify_all()
                    return
                while not self._stopping and not self._every_stream_queued():
                    left = self._queued_since + wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
            chain = self._submit_chain(batch)
            with self._cond:
                for *_, push in batch:
                    push.submit(chain)
                self._cond.notify_all()

    def _every_stream_queued(self) -> bool:
        return {sid for sid, *_ in self._queue} >= self._streams.keys()

    def _submit_chain(self, batch: list[tuple[str, StreamState, Push]]) -> Chain:
        """Chain the pushes of ``batch`` through the actors: one call to the ingest and the
        feature actor, and one to each acoustic and decoder actor that has streams in the
        batch (those run in parallel)."""
        items = [
            StageItem(p.key, p.seq, p.audio is None, None if p.audio is None else (p.audio, p.rate_hz),
                      features=st.features, acoustic=st.acoustic, decoder=st.decoder, acoustic_epoch=self._epochs[st.acoustic], options=st.options)
            for _, st, p in batch
        ]
        self.stats.chains += 1
        self.stats.max_pushes_per_chain = max(self.stats.max_pushes_per_chain, len(items))
        try:
            chunks = self._ingest.push_many.remote(items)
            feats = {f: self._features[f].push_many.remote(chunks, f) for f in sorted({i.features for i in items})}
            log_probs = {a: self._acoustics[a].process_many.remote(a, *[feats[f] for f in sorted({i.features for i in items if i.acoustic == a})])
                         for a in sorted({i.acoustic for i in items})}
            decoders = sorted({item.decoder for item in items})
            return Chain(
                [self._decoders[d].push_many.remote(d, *[log_probs[a] for a in sorted({i.acoustic for i in items if i.decoder == d})])
                 for d in decoders],
                [[(i.stream_id, i.seq) for i in items if i.decoder == d] for d in decoders],
                timeout_s=self.streaming.recovery_timeout_s,
            )
        except Exception as exc:  # e.g. Ray shut down under us: the pushes fail, the thread lives
            return Chain(failure=exc)

    def _wait_submitted(self, push: Push) -> Chain:
        with self._cond:
            self._cond.wait_for(lambda: push.chain is not None)
        return push.chain

    def _make_room(self, stream_id: str, stream: StreamState) -> list[RecognitionResult]:
        """Backpressure: wait for the oldest pushes until another one may be queued."""
        results: list[RecognitionResult] = []
        if len(stream.inflight) >= self.streaming.max_inflight_chunks:
            self.stats.blocked_pushes += 1
        while len(stream.inflight) >= self.streaming.max_inflight_chunks:
            oldest = stream.inflight[0]
            self._wait_submitted(oldest).item(oldest.key, oldest.seq)
            results += self._collect(stream_id, stream, block=False)
        return results

    def _collect(self, stream_id: str, stream: StreamState, block: bool, stop_at_failure: bool = False) -> list[RecognitionResult]:
        """Results of the finished pushes at the front of the queue (``block``: of all of them;
        ``stop_at_failure``: up to the first that failed, left for a later call to recover)."""
        results: list[RecognitionResult] = []
        while stream.inflight:
            push = stream.inflight[0]
            if not block and (push.chain is None or not push.chain.done(push.key, push.seq)):
                break
            if stop_at_failure and not push.chain.clean(push.key, push.seq):
                break
            item = self._wait_submitted(push).item(push.key, push.seq)
            stream.inflight.popleft()
            error = item if isinstance(item, BaseException) else item.error
            if error is not None:
                if state_lost(error):
                    self._recover(stream_id, stream, error)  # replays the stream, or raises StreamError
                    continue
                self._abort(stream_id)
                raise StreamError(f"stream {stream_id} failed and was dropped: {error}") from (item if isinstance(item, BaseException) else None)
            results += self._deliver(stream_id, stream, item.data)
        return results

    def _deliver(self, stream_id: str, stream: StreamState, results: list[RecognitionResult]) -> list[RecognitionResult]:
        """Results of the stream's current key, as the caller sees them: its own id, stream
        time, and after a replay from the start without what it already has."""
        out = []
        for r in results:
            if stream.skip_finals:  # a replay from the start: these came before the crash
                stream.skip_finals -= r.is_final
                continue
            if stream.offset_s:
                r = dataclasses.replace(r, start_s=r.start_s + stream.offset_s, end_s=r.end_s + stream.offset_s,
                                        words=[dataclasses.replace(w, start_s=w.start_s + stream.offset_s, end_s=w.end_s + stream.offset_s)
                                               for w in r.words])
            r = dataclasses.replace(r, stream_id=stream_id)
            if r.is_final:
                stream.finals_delivered += 1
                stream.buffer.final(r.end_s)
            out.append(r)
        return out


