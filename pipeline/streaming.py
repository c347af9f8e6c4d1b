"""Streaming recognition on Ray: one long-lived actor per stage, shared by many streams.

    push(samples) ─► IngestActor ─► FeatureActor ─► AcousticActor(s) ─► DecoderActor(s) ─► results
                     model-rate     (frames, 120)   batched over     partial / final
                     chunks         MFCC            streams; GPU     RecognitionResult

Each actor is a thin wrapper around the stage class of the same name in
``workers.stages`` (all recognition logic lives there) and keeps per-stream state keyed by
stream id. Streams are spread over ``acoustic_actors`` acoustic actors (default: one with
a GPU, else two, whose half-size batches run in parallel on the CPU cores) and over
``decoder_actors`` decoder actors.

Chains: ``push`` only queues the audio; a submitter thread takes the queued pushes of *all*
streams (waiting up to ``max_submit_wait_ms`` for every open stream to have one) and sends
them as one *chain*: one call per stage actor, linked by object refs, so audio never
returns to the driver between stages. Ray's per-call cost is then paid per chain, not per
stream: at 16 streams this cut the calls from 640 to about 60 a second, and the p95
latency on 2 cores from ~1.8 s to ~0.14 s (README, Speed). Arrays travel between stages
as numpy, which Ray serialises ~20x faster than torch tensors. A stage that fails on one stream's item marks that item
(``StageItem.error``) and the other streams of the chain go on.

Ordering: Ray runs a synchronous actor's calls from one caller in submission order, and
the submitter thread is the only caller, which keeps the ingest, feature and decoder
actors in order per stream. The acoustic actor is an asyncio actor (it must accept many
calls at once to batch them), and Ray runs those out of order, so each item carries a
per-stream sequence number and the acoustic actor holds back an item until its
predecessors of the same stream have been taken.

Batching: the acoustic actor waits up to ``max_batch_wait_ms`` after the first waiting
item (less when every open stream already has one waiting, or ``max_batch_streams`` do)
and runs the chunks of all those streams in one ``AcousticStage.process`` call, on a
model thread with ``acoustic_num_threads`` intra-op threads.

Backpressure: at most ``max_inflight_chunks`` pushes per stream are queued or in flight; a
push beyond that blocks until the oldest completes, so a producer faster than real time
is slowed to the pipeline's pace instead of growing queues.

Failure: actors restart (``max_restarts``) but calls are not retried, because a retried
call would replay audio into per-stream state; a stream whose work failed raises
``StreamError`` and is dropped, while new streams use the restarted actors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import ray
import torch

from pipeline.config import AppConfig, ConfigError, StreamingConfig, load_config
from workers.audio import RAW_SUFFIXES, AudioError, RawFormat, read_audio, validate_samples
from workers.bundle import Bundle, BundleError, load_bundle
from workers.decoder import DecoderConfig
from workers.features import MfccExtractor
from workers.recognizer import build_decoder, frames_for_ms
from workers.stages import AcousticStage, DecoderStage, FeatureStage, IngestStage, RecognitionResult
from workers.vad import SpeechDetector, VadConfig

ACTOR_MAX_RESTARTS = 3  # a crashed stage actor comes back for new streams (in-flight streams fail)
ACOUSTIC_MAX_CONCURRENCY = 10_000  # concurrent calls the batching actor accepts (held ones included)
ACTOR_START_TIMEOUT_S = 300.0  # model loading included; longer means resources no node offers
TURN_TIMEOUT_S = 300.0  # an acoustic call whose predecessor never arrives (lost in a crash) fails after this
MIC_RATE_HZ = 16000  # capture rate: 16 kHz mono
MIC_NO_AUDIO_TIMEOUT_S = 5.0  # an input device that delivers nothing for this long is an error


class StreamError(RuntimeError):
    """Remote work of one stream failed; the stream has been dropped from every stage."""


class StreamOrderError(RuntimeError):
    """A stage actor got a stream's calls out of order, or lost its state (actor restart)."""


# --------------------------------------------------------------------------- bundle transfer


def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """The bundle directory's files (name -> bytes), to ``ray.put`` once for all actors."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


@contextlib.contextmanager
def unpacked_bundle(files: dict[str, bytes], device: str = "cpu") -> Iterator[Bundle]:
    """Write the files to a temporary directory and load them; the directory is removed on
    exit, so build everything that reads bundle files (decoder LM, lexicon) inside."""
    with tempfile.TemporaryDirectory(prefix="asr-bundle-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        yield load_bundle(tmp, device)


# --------------------------------------------------------------------------- stage actors


class _SequenceCheck:
    """Expected next sequence number per stream, for actors that Ray runs in order."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def check(self, stream_id: str, seq: int, is_last: bool = False) -> None:
        expected = self._next.get(stream_id, 0)
        if seq != expected:
            self._next.pop(stream_id, None)
            raise StreamOrderError(f"stream {stream_id}: got chunk {seq}, expected {expected} (state lost in a restart?)")
        if is_last:
            self._next.pop(stream_id, None)
        else:
            self._next[stream_id] = seq + 1

    def forget(self, stream_id: str) -> None:
        self._next.pop(stream_id, None)


@dataclass
class StageItem:
    """One push of one stream on its way through the stages of a chain.

    ``data`` is the stage's input and, after it, its output: (audio, rate_hz) for ingest
    (None at the end of the stream), model-rate chunks for features, features (frames,
    feature_dim) for the acoustic model, log-probs (frames, num_tokens) for the decoder,
    and the decoder's ``list[RecognitionResult]``. Arrays travel as numpy float32, which
    Ray serialises far faster than torch tensors. ``error`` is set when a stage failed on
    this item; later stages pass it on untouched and forget the stream.
    """

    stream_id: str
    seq: int
    is_last: bool
    data: Any = None
    error: str | None = None
    speech: Any = None  # voice activity flags (windows,) bool of this push's audio, from the feature actor
    acoustic: int = 0  # which acoustic actor keeps this stream's state
    decoder: int = 0  # which decoder actor keeps this stream's state
    stage_times: tuple[float, ...] = ()  # time.time() at entry to and exit from each stage so far


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A writable float32 tensor from an array Ray handed over (those are read-only views)."""
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _each(items: list[StageItem], work: Any, drop: Any) -> list[StageItem]:
    """Run ``work(item) -> new data`` on each item in order; an item that fails (or failed
    upstream) carries its error on, and its stream's state here is dropped."""
    out = []
    t_in = time.time()
    for item in items:
        if item.error is None:
            try:
                item = dataclasses.replace(item, data=work(item))
            except Exception as exc:  # one stream's failure must not fail the others in the chain
                item = dataclasses.replace(item, data=None, error=f"{type(exc).__name__}: {exc}")
        if item.error is not None:
            with contextlib.suppress(Exception):
                drop(item.stream_id)
        out.append(dataclasses.replace(item, stage_times=item.stage_times + (t_in, time.time())))
    return out


class IngestActor:
    """Wraps ``IngestStage``: audio of any size and rate -> model-rate chunks (samples,)."""

    def __init__(self, target_rate_hz: int, chunk_samples: int) -> None:
        self.stage = IngestStage(target_rate_hz, chunk_samples)
        self.order = _SequenceCheck()

    def push_many(self, items: list[StageItem]) -> list[StageItem]:
        """item.data (audio, rate_hz), or None at the end -> a list of model-rate chunks."""
        return _each(items, self._push, self.drop)

    def _push(self, item: StageItem) -> list[np.ndarray]:
        # numpy, not torch, between stages: Ray serialises arrays ~20x faster than tensors
        self.order.check(item.stream_id, item.seq, item.is_last)
        if item.is_last:
            return [self.stage.finish(item.stream_id).numpy()]  # the last (partial) chunk
        samples, rate_hz = item.data
        return [c.numpy() for c in self.stage.push(item.stream_id, samples, rate_hz)]

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.finish(stream_id)


class FeatureActor:
    """Wraps ``FeatureStage``: model-rate chunks -> normalised stacked MFCC (frames, feature_dim)."""

    def __init__(self, bundle_files: dict[str, bytes], vad: VadConfig | None = None) -> None:
        vad = vad or VadConfig()
        with unpacked_bundle(bundle_files) as bundle:
            self.stage = FeatureStage(MfccExtractor(bundle.features, bundle.normalizer), SpeechDetector(vad) if vad.enabled else None)
            self.feature_dim = bundle.features.feature_dim
        self.order = _SequenceCheck()

    def push_many(self, items: list[StageItem]) -> list[StageItem]:
        """item.data: model-rate waves, each (samples,) -> their features (frames, feature_dim);
        item.speech: their voice activity flags (windows,)."""
        out = _each(items, self._push, self.drop)
        return [dataclasses.replace(i, data=i.data[0], speech=i.data[1]) if i.error is None else i for i in out]

    def _push(self, item: StageItem) -> tuple[np.ndarray, np.ndarray]:
        self.order.check(item.stream_id, item.seq, item.is_last)
        pieces = [self.stage.push(item.stream_id, _tensor(c)) for c in item.data]
        if item.is_last:
            pieces.append(self.stage.finish(item.stream_id))
        feats = torch.cat([f for f, _ in pieces]) if pieces else torch.zeros(0, self.feature_dim)
        speech = torch.cat([s for _, s in pieces]) if pieces else torch.zeros(0, dtype=torch.bool)
        return feats.numpy(), speech.numpy()

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.drop(stream_id)


@dataclass
class _Request:
    """One waiting call of the acoustic actor."""

    seq: int
    features: torch.Tensor  # (frames, feature_dim)
    is_last: bool
    future: asyncio.Future


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
    ) -> None:
        with unpacked_bundle(bundle_files, device) as bundle:
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

    async def process(self, stream_id: str, seq: int, features: torch.Tensor, is_last: bool) -> torch.Tensor:
        """features (frames, feature_dim) of chunk ``seq`` -> log-probs (frames', num_tokens)."""
        self._start_loop()
        request = _Request(seq, features, is_last, asyncio.get_running_loop().create_future())
        self._held.setdefault(stream_id, {})[seq] = request
        self._release(stream_id)
        try:
            return await asyncio.wait_for(request.future, TURN_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.drop(stream_id)
            raise StreamOrderError(f"stream {stream_id}: chunk {seq} waited {TURN_TIMEOUT_S:.0f} s for its predecessors") from None

    async def process_many(self, items: list[StageItem], acoustic: int = 0) -> list[StageItem]:
        """item.data: features (frames, feature_dim) -> log-probs (frames', num_tokens), for
        the items of this actor's streams (``item.acoustic == acoustic``), many streams at
        once (they join the batches like separate calls)."""
        items = [item for item in items if item.acoustic == acoustic]
        t_in = time.time()

        async def one(item: StageItem) -> StageItem:
            if item.error is None:
                try:
                    log_probs = await self.process(item.stream_id, item.seq, _tensor(item.data), item.is_last)
                    return dataclasses.replace(item, data=log_probs.numpy(), stage_times=item.stage_times + (t_in, time.time()))
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
            end = [(stream_id, torch.zeros(0, self.stage.model.config.input_dim), True)]
            await asyncio.get_running_loop().run_in_executor(self._executor, self.stage.process, end)

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

    def _run(self, batch: list[tuple[str, list[_Request]]]) -> list[tuple[_Request, torch.Tensor]]:
        """On the model thread: round k runs the k-th ready call of every stream that has one."""
        answered = []
        for k in range(max(len(requests) for _, requests in batch)):
            row = [(sid, requests[k]) for sid, requests in batch if k < len(requests)]
            outputs = self.stage.process([(sid, r.features, r.is_last) for sid, r in row])
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


class DecoderActor:
    """Wraps ``DecoderStage``: log-probs (frames, num_tokens) -> partial / final results."""

    def __init__(
        self, bundle_files: dict[str, bytes], decoder_config: DecoderConfig, endpoint_silence_ms: float, vad: VadConfig | None = None
    ) -> None:
        vad = vad or VadConfig()
        with unpacked_bundle(bundle_files) as bundle:
            self.stage = DecoderStage(build_decoder(bundle, decoder_config), endpoint_silence_ms, vad.pad_ms if vad.enabled else None)
            self.num_tokens = bundle.model_config.num_tokens
        self.order = _SequenceCheck()

    def push_many(self, decoder: int, *parts: list[StageItem]) -> list[StageItem]:
        """item.data: log-probs (frames, num_tokens) -> ``list[RecognitionResult]``, for the
        items of this decoder actor's streams (``item.decoder == decoder``) in ``parts`` (the
        outputs of the acoustic actors)."""
        items = sorted((i for part in parts for i in part if i.decoder == decoder), key=lambda i: (i.stream_id, i.seq))
        return _each(items, self._push, self.drop)

    def _push(self, item: StageItem) -> list[RecognitionResult]:
        self.order.check(item.stream_id, item.seq, item.is_last)
        speech = None if item.speech is None else torch.from_numpy(np.array(item.speech, dtype=bool))
        return self.stage.push(item.stream_id, _tensor(item.data), item.is_last, speech)

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.drop(stream_id)


# --------------------------------------------------------------------------- session API


def connect_ray(address: str | None = None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local Ray, unless Ray is already
    initialised. Returns True when this call initialised Ray (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


def acoustic_num_gpus(streaming: StreamingConfig) -> float:
    """GPUs for the acoustic actor: ``acoustic_num_gpus``, or with -1 one when the cluster has one."""
    if streaming.acoustic_num_gpus >= 0:
        return streaming.acoustic_num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def acoustic_actor_count(streaming: StreamingConfig, num_gpus: float) -> int:
    """``acoustic_actors``, or with 0: one when it has a GPU (one batch for all streams),
    else two (on CPUs two half-size batches run in parallel, sooner than one full one)."""
    if streaming.acoustic_actors:
        return streaming.acoustic_actors
    return 1 if num_gpus > 0 else 2


def _actor_options(resources: dict | None = None, **extra: Any) -> dict[str, Any]:
    # max_task_retries=0: a retried call would replay audio into per-stream state.
    # num_cpus=0: stage actors are long-lived services placed by custom resources; without
    # it Ray reserves a CPU for the lifetime of any actor that names a resource, and the
    # acoustic actor plus two decoders would not fit a 2-CPU node.
    return {"max_restarts": ACTOR_MAX_RESTARTS, "max_task_retries": 0, "num_cpus": 0, "resources": dict(resources or {}), **extra}


@dataclass
class PipelineStats:
    """Backpressure and submission counters over all streams of a pipeline."""

    max_inflight: int = 0  # most pushes of one stream in flight at once (bounded by max_inflight_chunks)
    blocked_pushes: int = 0  # pushes that had to wait for an earlier push of their stream
    chains: int = 0  # chains submitted (each carries the pushes of one or more streams)
    max_pushes_per_chain: int = 0


class _Chain:
    """One submission through the actors; its refs (one per decoder actor involved) yield
    ``list[StageItem]`` whose ``data`` is each push's ``list[RecognitionResult]``. Fetched
    once, shared by the chain's streams."""

    def __init__(self, refs: list[Any] | None = None, failure: BaseException | None = None) -> None:
        self.refs = refs or []
        self._lock = threading.Lock()
        self._results: dict[tuple[str, int], StageItem] | BaseException | None = failure

    def done(self) -> bool:
        return self._results is not None or len(ray.wait(self.refs, num_returns=len(self.refs), timeout=0)[0]) == len(self.refs)

    def results(self) -> dict[tuple[str, int], StageItem] | BaseException:
        """(stream_id, seq) -> its item, or the exception that failed the whole chain (blocks)."""
        with self._lock:
            if self._results is None:
                try:
                    self._results = {(i.stream_id, i.seq): i for part in ray.get(self.refs) for i in part}
                except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                    self._results = exc
            return self._results


@dataclass
class _Push:
    """One push of a stream (``audio=None``: its end); ``chain`` is set once submitted."""

    seq: int
    audio: np.ndarray | None
    rate_hz: int
    chain: _Chain | None = None


@dataclass
class _Stream:
    acoustic: int = 0  # index of the acoustic actor that keeps this stream's state
    decoder: int = 0  # index of the decoder actor that keeps this stream's state
    next_seq: int = 0
    inflight: deque = field(default_factory=deque)  # _Push, oldest first: queued or submitted, not yet collected


class StreamingPipeline:
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
    ) -> None:
        self.config = config or AppConfig()
        self.streaming = self.config.streaming
        if self.streaming.max_inflight_chunks < 1:
            raise ValueError(f"streaming.max_inflight_chunks must be >= 1, got {self.streaming.max_inflight_chunks}")
        if self.streaming.decoder_actors < 1:
            raise ValueError(f"streaming.decoder_actors must be >= 1, got {self.streaming.decoder_actors}")
        if self.streaming.acoustic_actors < 0:
            raise ValueError(f"streaming.acoustic_actors must be >= 0 (0: automatic), got {self.streaming.acoustic_actors}")
        bundle = load_bundle(bundle_path)  # validate here, with a clear error, before any actor starts
        self.sample_rate_hz = bundle.features.sample_rate_hz
        self._owns_ray = connect_ray(address)
        self.stats = PipelineStats()
        self._streams: dict[str, _Stream] = {}
        self._recovering = False  # a stream failed: open_stream first waits for restarted actors
        self.actors: dict[str, Any] = {}  # stage name -> actor handle (ingest, features, acoustic, decoder)
        # Pushes wait in _queue for the submitter thread; _cond guards _streams and _queue.
        self._cond = threading.Condition()
        self._queue: list[tuple[str, _Stream, _Push]] = []
        self._queued_since = 0.0
        self._opened = 0  # streams opened so far: stream k uses acoustic/decoder actor k % their count
        self._stopping = False
        self._submitter: threading.Thread | None = None
        try:
            self._start_actors(bundle, decoder_config or self.config.decoder)
        except BaseException:
            self.shutdown()
            raise
        self._submitter = threading.Thread(target=self._submit_loop, name="asr-submit", daemon=True)
        self._submitter.start()

    def _start_actors(self, bundle: Bundle, decoder_config: DecoderConfig) -> None:
        s, frame_ms = self.streaming, bundle.features.frame_ms
        self._bundle_files = ray.put(read_bundle_files(bundle.path))  # once; held for actor restarts
        files = self._bundle_files
        num_gpus = acoustic_num_gpus(s)
        chunk_samples = max(1, int(self.sample_rate_hz * s.ingest_chunk_ms / 1000))
        self._ingest = ray.remote(IngestActor).options(**_actor_options()).remote(self.sample_rate_hz, chunk_samples)
        self._features = ray.remote(FeatureActor).options(**_actor_options()).remote(files, self.config.vad)
        acoustic_options = _actor_options(s.acoustic_resources, num_gpus=num_gpus, max_concurrency=ACOUSTIC_MAX_CONCURRENCY)
        self._acoustics = [
            ray.remote(AcousticActor)
            .options(**acoustic_options)
            .remote(
                files,
                max(1, frames_for_ms(s.chunk_ms, frame_ms)),
                frames_for_ms(s.lookahead_ms, frame_ms),
                s.max_batch_wait_ms,
                s.max_batch_streams,
                "cuda" if num_gpus > 0 else "cpu",
                s.acoustic_num_threads,
            )
            for _ in range(acoustic_actor_count(s, num_gpus))
        ]
        self._decoders = [
            ray.remote(DecoderActor).options(**_actor_options(s.decoder_resources)).remote(files, decoder_config, s.endpoint_silence_ms, self.config.vad)
            for _ in range(s.decoder_actors)
        ]
        self.actors = {"ingest": self._ingest, "features": self._features}
        for name, group in (("acoustic", self._acoustics), ("decoder", self._decoders)):
            self.actors.update({name if k == 0 else f"{name}-{k + 1}": actor for k, actor in enumerate(group)})
        try:  # surface start-up errors here, and resources no node offers
            ray.get([a.__ray_ready__.remote() for a in self.actors.values()], timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"stage actors did not start in {ACTOR_START_TIMEOUT_S:.0f} s: does the cluster offer "
                f"acoustic_resources={s.acoustic_resources}, decoder_resources={s.decoder_resources}, GPUs={num_gpus}?"
            ) from None

    # ---- streams ---------------------------------------------------------------------
    def open_stream(self, stream_id: str | None = None) -> str:
        """Start a stream; returns its id (a new unique one unless given)."""
        stream_id = stream_id or uuid.uuid4().hex
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id} is already open")
        if self._recovering:
            self._wait_for_actors()
        with self._cond:
            k = self._opened
            self._streams[stream_id] = _Stream(acoustic=k % len(self._acoustics), decoder=k % len(self._decoders))
            self._opened += 1
        return stream_id

    def _wait_for_actors(self) -> None:
        """After a stream failed, wait until every stage actor answers again (a crashed one
        restarts: new streams must not reach it mid-restart)."""
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        for actor in self.actors.values():
            while True:
                try:
                    ray.get(actor.__ray_ready__.remote(), timeout=max(0.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self._recovering = False

    def push(self, stream_id: str, samples: np.ndarray | torch.Tensor, rate_hz: int) -> list[RecognitionResult]:
        """Send audio (samples,) or (samples, channels), float in [-1, 1] or integer PCM, at
        ``rate_hz``. Returns the results completed so far, in order (partials, endpoint
        finals). Blocks while the stream has ``max_inflight_chunks`` pushes in flight."""
        stream = self._stream(stream_id)
        audio = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
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
        self._enqueue(stream_id, stream, None, self.sample_rate_hz)
        results += self._collect(stream_id, stream, block=True)
        with self._cond:
            del self._streams[stream_id]
        return results

    def inflight(self, stream_id: str) -> int:
        """Chains of this stream submitted but not yet collected (<= max_inflight_chunks)."""
        return len(self._stream(stream_id).inflight)

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
        for actor in self.actors.values() if ray.is_initialized() else ():
            ray.kill(actor, no_restart=True)
        self.actors, self._streams = {}, {}
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> StreamingPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # ---- internals -------------------------------------------------------------------
    def _stream(self, stream_id: str) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise KeyError(f"stream {stream_id} is not open") from None

    def _enqueue(self, stream_id: str, stream: _Stream, audio: np.ndarray | None, rate_hz: int) -> None:
        """Queue one push (``audio=None``: the end of the stream) for the submitter thread."""
        push = _Push(stream.next_seq, audio, rate_hz)
        stream.next_seq += 1
        with self._cond:
            if not self._queue:
                self._queued_since = time.monotonic()
            self._queue.append((stream_id, stream, push))
            stream.inflight.append(push)
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
                    failed = _Chain(failure=StreamError("the pipeline was shut down"))
                    for *_, push in self._queue:
                        push.chain = failed
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
                    push.chain = chain
                self._cond.notify_all()

    def _every_stream_queued(self) -> bool:
        return {sid for sid, *_ in self._queue} >= self._streams.keys()

    def _submit_chain(self, batch: list[tuple[str, _Stream, _Push]]) -> _Chain:
        """Chain the pushes of ``batch`` through the actors: one call to the ingest and the
        feature actor, and one to each acoustic and decoder actor that has streams in the
        batch (those run in parallel)."""
        items = [
            StageItem(sid, p.seq, p.audio is None, None if p.audio is None else (p.audio, p.rate_hz), acoustic=st.acoustic, decoder=st.decoder)
            for sid, st, p in batch
        ]
        self.stats.chains += 1
        self.stats.max_pushes_per_chain = max(self.stats.max_pushes_per_chain, len(items))
        try:
            chunks = self._ingest.push_many.remote(items)
            feats = self._features.push_many.remote(chunks)
            log_probs = {a: self._acoustics[a].process_many.remote(feats, a) for a in sorted({i.acoustic for i in items})}
            decoders = sorted({item.decoder for item in items})
            return _Chain([
                self._decoders[d].push_many.remote(d, *[log_probs[a] for a in sorted({i.acoustic for i in items if i.decoder == d})])
                for d in decoders
            ])
        except Exception as exc:  # e.g. Ray shut down under us: the pushes fail, the thread lives
            return _Chain(failure=exc)

    def _wait_submitted(self, push: _Push) -> _Chain:
        with self._cond:
            self._cond.wait_for(lambda: push.chain is not None)
        return push.chain

    def _make_room(self, stream_id: str, stream: _Stream) -> list[RecognitionResult]:
        """Backpressure: wait for the oldest pushes until another one may be queued."""
        results: list[RecognitionResult] = []
        if len(stream.inflight) >= self.streaming.max_inflight_chunks:
            self.stats.blocked_pushes += 1
        while len(stream.inflight) >= self.streaming.max_inflight_chunks:
            self._wait_submitted(stream.inflight[0]).results()
            results += self._collect(stream_id, stream, block=False)
        return results

    def _collect(self, stream_id: str, stream: _Stream, block: bool) -> list[RecognitionResult]:
        """Results of the finished pushes at the front of the queue (``block``: of all of them)."""
        results: list[RecognitionResult] = []
        while stream.inflight:
            push = stream.inflight[0]
            if not block and (push.chain is None or not push.chain.done()):
                break
            outcome = self._wait_submitted(push).results()
            stream.inflight.popleft()
            item = outcome if isinstance(outcome, BaseException) else outcome[(stream_id, push.seq)]
            error = item if isinstance(item, BaseException) else item.error
            if error is not None:
                self._abort(stream_id)
                raise StreamError(f"stream {stream_id} failed and was dropped: {error}") from (item if isinstance(item, BaseException) else None)
            results += item.data
        return results

    def _abort(self, stream_id: str) -> None:
        """Forget a failed stream everywhere (best effort: an actor may be restarting)."""
        with self._cond:
            self._streams.pop(stream_id, None)
            self._queue = [entry for entry in self._queue if entry[0] != stream_id]
        self._recovering = True
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get([actor.drop.remote(stream_id) for actor in self.actors.values()], timeout=10)


# --------------------------------------------------------------------------- `asr stream`


class MicError(RuntimeError):
    """No usable input device: PortAudio missing, no input device, or capture failed."""


def add_stream_arguments(parser: argparse.ArgumentParser, config_options: bool = False) -> argparse.ArgumentParser:
    """Options of ``asr stream`` / ``scripts/stream_mic.py``. ``config_options`` also adds
    ``--config`` and ``--set`` (``asr`` adds those itself, to every subcommand)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mic", action="store_true", help="capture 16 kHz mono from an input device (the default)")
    source.add_argument("--file", default=None, help="stream an audio file instead, paced in real time")
    parser.add_argument("--device", default=None, help="input device index or name (see --list-devices)")
    parser.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    parser.add_argument("--fast", action="store_true", help="with --file: send as fast as the pipeline takes it")
    parser.add_argument("--model", default=None, help="model bundle directory (default: the shipped models/default)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None, help="decoder kind (default: from config)")
    parser.add_argument("--chunk-ms", type=float, default=None, help="acoustic chunk length (default: from config)")
    parser.add_argument("--lookahead-ms", type=float, default=None, help="right context per chunk (default: from config)")
    parser.add_argument("--endpoint-ms", type=float, default=None, help="silence that ends an utterance; 0 disables")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--show-partials", action="store_true", help="print partial results as lines when not on a terminal")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after this much audio")
    if config_options:
        parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                            help="override a config value, e.g. --set streaming.max_inflight_chunks=4 (repeatable)")
    return parser


def stream_settings(args: argparse.Namespace, config: AppConfig) -> tuple[AppConfig, DecoderConfig]:
    """The config with the command line's streaming options applied, and the decoder config."""
    changes = {"chunk_ms": args.chunk_ms, "lookahead_ms": args.lookahead_ms, "endpoint_silence_ms": args.endpoint_ms}
    streaming = dataclasses.replace(config.streaming, **{k: v for k, v in changes.items() if v is not None})
    decoder = dataclasses.replace(config.decoder, kind=args.decoder) if args.decoder else config.decoder
    return dataclasses.replace(config, streaming=streaming), decoder


def format_final(result: RecognitionResult) -> str:
    """``[start_s - end_s] text`` with times in seconds from the start of the stream."""
    return f"[{result.start_s:.2f} - {result.end_s:.2f}] {result.text}".rstrip()


class ResultPrinter:
    """Finals as lines; the partial as a live line on a terminal (``\\r``), as ``... text``
    lines elsewhere only with ``show_partials``."""

    def __init__(self, out: TextIO, show_partials: bool = False) -> None:
        self.out = out
        self.live = out.isatty()
        self.show_partials = show_partials
        self._partial = ""

    def show(self, results: list[RecognitionResult]) -> None:
        for result in results:
            if result.is_final:
                self._clear()
                print(format_final(result), file=self.out, flush=True)
            elif result.text != self._partial:
                self._show_partial(result.text)

    def _show_partial(self, text: str) -> None:
        if self.live:  # one terminal line: the tail of a long partial
            width = shutil.get_terminal_size().columns - 1
            self.out.write(f"\r{text[-width:]}\x1b[K")
            self.out.flush()
        elif self.show_partials:
            print(f"... {text}", file=self.out, flush=True)
        self._partial = text

    def _clear(self) -> None:
        if self.live and self._partial:
            self.out.write("\r\x1b[K")
        self._partial = ""


def file_blocks(
    path: str | Path, block_ms: float, paced: bool, raw_format: RawFormat | None = None, max_seconds: float | None = None
) -> tuple[Iterator[np.ndarray], int]:
    """A file as blocks of ``block_ms`` (samples, channels) float32, and its rate. ``paced``:
    each block is released when a microphone would have delivered it (at its end time)."""
    samples, rate = read_audio(path, raw_format)
    if max_seconds is not None:
        samples = samples[: int(max_seconds * rate)]
    block = max(1, int(rate * block_ms / 1000))

    def blocks() -> Iterator[np.ndarray]:
        print(f"Streaming {path} ({len(samples) / rate:.1f} s); Ctrl-C to stop.", file=sys.stderr, flush=True)
        start = time.monotonic()
        for begin in range(0, len(samples), block):
            piece = samples[begin : begin + block]
            if paced:
                time.sleep(max(0.0, start + (begin + len(piece)) / rate - time.monotonic()))
            yield piece

    return blocks(), rate


def import_sounddevice() -> Any:
    """The ``sounddevice`` module, or ``MicError`` when it or PortAudio is missing."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise MicError(f"cannot use the microphone: {exc} (install libportaudio2 and the 'mic' extra)") from exc
    return sounddevice


def parse_device(device: str | None) -> int | str | None:
    """``"3"`` -> 3 (an index); other strings are device names; None is the default input."""
    return int(device) if device is not None and device.strip().isdigit() else device


def check_input_device(sd: Any, device: int | str | None) -> str:
    """The name of the input device that will be used, or ``MicError`` if there is none."""
    try:
        sd.check_input_settings(device=device, channels=1, samplerate=MIC_RATE_HZ, dtype="float32")
        info = sd.query_devices(device, kind="input") if device is not None else sd.query_devices(kind="input")
    except (sd.PortAudioError, ValueError) as exc:
        raise MicError(f"no usable input device {device if device is not None else '(default)'}: {exc}") from exc
    return str(info["name"])


def mic_blocks(sd: Any, device: int | str | None, block_ms: float, max_seconds: float | None, log: TextIO) -> Iterator[np.ndarray]:
    """Capture 16 kHz mono: blocks (samples,) float32 as the device delivers them, until
    ``max_seconds`` of audio (or forever). The stream is stopped when the generator closes."""
    captured: queue.Queue[np.ndarray] = queue.Queue()

    def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        captured.put(indata[:, 0].copy())

    limit = None if max_seconds is None else int(max_seconds * MIC_RATE_HZ)
    block = max(1, int(MIC_RATE_HZ * block_ms / 1000))
    try:
        stream = sd.InputStream(samplerate=MIC_RATE_HZ, channels=1, dtype="float32", device=device, blocksize=block, callback=callback)
    except sd.PortAudioError as exc:
        raise MicError(f"cannot open input device: {exc}") from exc
    with stream:
        print(f"Listening at {MIC_RATE_HZ} Hz; Ctrl-C to stop.", file=log, flush=True)
        total = 0
        while limit is None or total < limit:
            try:
                piece = captured.get(timeout=MIC_NO_AUDIO_TIMEOUT_S)
            except queue.Empty:
                raise MicError(f"the input device delivered no audio for {MIC_NO_AUDIO_TIMEOUT_S:.0f} s") from None
            piece = piece if limit is None else piece[: limit - total]
            total += len(piece)
            yield piece


def _audio_source(args: argparse.Namespace, config: AppConfig, log: TextIO) -> tuple[Iterator[np.ndarray], int]:
    """Blocks and their rate from ``--file`` or the microphone (checked before Ray starts)."""
    block_ms = config.streaming.ingest_chunk_ms
    if args.file:
        a = config.audio
        raw = RawFormat(a.raw_sample_rate_hz, a.raw_sample_width_bytes, a.raw_big_endian)
        raw_format = raw if Path(args.file).suffix.lower() in RAW_SUFFIXES else None
        return file_blocks(args.file, block_ms, not args.fast, raw_format, args.max_seconds)
    sd = import_sounddevice()
    device = parse_device(args.device)
    name = check_input_device(sd, device)
    print(f"Input device: {name}", file=log, flush=True)
    return mic_blocks(sd, device, block_ms, args.max_seconds, log), MIC_RATE_HZ


def _list_devices(out: TextIO) -> int:
    """Print PortAudio's devices; exit code 2 when there are none (or no PortAudio)."""
    try:
        devices = import_sounddevice().query_devices()
    except MicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not len(devices):
        print("error: PortAudio finds no audio devices (no sound card, no PulseAudio server?)", file=sys.stderr)
        return 2
    print(devices, file=out)
    return 0


def run_stream(args: argparse.Namespace, config: AppConfig | None = None, out: TextIO | None = None) -> int:
    """``asr stream``: mic or file -> pipeline -> finals on ``out`` (default stdout).

    Exit codes: 0 done (also after Ctrl-C, which flushes the last result); 1 bad model or
    audio file; 2 no microphone (PortAudio missing, no input device) or a bad config; 130
    Ctrl-C while Ray starts or while flushing.
    """
    out = out or sys.stdout
    if args.list_devices:
        return _list_devices(out)
    try:
        config = config or load_config(getattr(args, "config", None), getattr(args, "overrides", None))
        config, decoder_config = stream_settings(args, config)
        blocks, rate = _audio_source(args, config, sys.stderr)
        pipeline = StreamingPipeline(config, args.model, decoder_config, args.address)
    except (MicError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (BundleError, AudioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        return run_session(pipeline, blocks, rate, ResultPrinter(out, args.show_partials))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        pipeline.shutdown()


def run_session(pipeline: StreamingPipeline, blocks: Iterator[np.ndarray], rate_hz: int, printer: ResultPrinter) -> int:
    """Push every block of one stream, then close it; Ctrl-C ends the capture early."""
    stream_id = pipeline.open_stream()
    code = 0
    try:
        with contextlib.closing(blocks):  # stops the capture however the loop ends
            for block in blocks:
                printer.show(pipeline.push(stream_id, block, rate_hz))
    except KeyboardInterrupt:
        print("\nstopping: flushing the last result", file=sys.stderr, flush=True)
    except MicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    printer.show(pipeline.close(stream_id))
    return code
