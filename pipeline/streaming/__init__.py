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
latency on 2 cores from ~1.8 s to ~0.14 s (docs/RESULTS.md, "Performance on 2 cores"). Arrays travel between stages
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
call would replay audio into per-stream state. A stream whose actor lost its state is
replayed from the audio it kept since its last final (``ReplayBuffer``) under a new key on
the restarted actors (``recovery``); a stream that cannot be replayed, or whose own input
failed, raises ``StreamError`` and is dropped, while new streams use the restarted actors.

Modules: ``items`` (what travels between the actors, stream errors), ``actors`` (ingest and
decoder, torch-free), ``feature_actor``, ``acoustic_actor`` (the batching acoustic actor), ``placement`` (actor
counts and options, shipping the bundle; connecting to Ray is ``pipeline.cluster.session``), ``session``
(``StreamingPipeline``: submitter thread, backpressure), ``recovery`` (its replay of a stream
on restarted actors, or the stream's end when that cannot be done), ``chain`` (what it keeps
per chain, push and stream; a chain's results are taken as they arrive, and futures let an
event loop wait for them), ``sources`` (file and
microphone capture) and ``cli`` (``asr stream``). The public names are re-exported here,
lazily: the ingest and decoder actors (``actors``) never import torch, and importing them
must not drag in the rest of the package.
"""

import importlib
from typing import Any

_EXPORTS = {  # public name -> the module that defines it, imported on first use (PEP 562)
    "connect_ray": "pipeline.cluster.session",
    "TURN_TIMEOUT_S": "pipeline.streaming.acoustic_actor",
    "AcousticActor": "pipeline.streaming.acoustic_actor",
    "DecoderActor": "pipeline.streaming.actors",
    "IngestActor": "pipeline.streaming.actors",
    "FeatureActor": "pipeline.streaming.feature_actor",
    "ResultPrinter": "pipeline.streaming.cli",
    "add_stream_arguments": "pipeline.streaming.cli",
    "format_final": "pipeline.streaming.cli",
    "run_session": "pipeline.streaming.cli",
    "run_stream": "pipeline.streaming.cli",
    "stream_settings": "pipeline.streaming.cli",
    "StageItem": "pipeline.streaming.items",
    "StreamError": "pipeline.streaming.items",
    "StreamOrderError": "pipeline.streaming.items",
    "ACOUSTIC_MAX_CONCURRENCY": "pipeline.streaming.placement",
    "ACTOR_MAX_RESTARTS": "pipeline.streaming.placement",
    "ACTOR_START_TIMEOUT_S": "pipeline.streaming.placement",
    "acoustic_actor_count": "pipeline.streaming.placement",
    "acoustic_num_gpus": "pipeline.streaming.placement",
    "feature_actor_count": "pipeline.streaming.placement",
    "read_bundle_files": "pipeline.streaming.placement",
    "unpacked_bundle": "pipeline.streaming.placement",
    "PipelineStats": "pipeline.streaming.chain",
    "PushHandle": "pipeline.streaming.chain",
    "StreamingPipeline": "pipeline.streaming.session",
    "MIC_NO_AUDIO_TIMEOUT_S": "pipeline.streaming.sources",
    "MIC_RATE_HZ": "pipeline.streaming.sources",
    "MicError": "pipeline.streaming.sources",
    "check_input_device": "pipeline.streaming.sources",
    "file_blocks": "pipeline.streaming.sources",
    "import_sounddevice": "pipeline.streaming.sources",
    "mic_blocks": "pipeline.streaming.sources",
    "parse_device": "pipeline.streaming.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The re-exported names, imported when first asked for: importing one module of this
    package (Ray does so in every actor process) must not import them all, torch with them."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
