"""``StageActors``: the set of stage actors that sessions share, started once.

A ``StreamingPipeline`` normally starts its own set and kills it on shutdown. A server
starts one set in the driver and hands it (a picklable handle bundle) to each of its
ingress replicas, whose sessions attach to it: front doors and recognition then scale
separately, and every connection shares the batched acoustic model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline.config import AppConfig
from pipeline.streaming.acoustic_actor import AcousticActor
from pipeline.streaming.actors import DecoderActor, IngestActor
from pipeline.streaming.feature_actor import FeatureActor
from pipeline.streaming.placement import (
    ACOUSTIC_MAX_CONCURRENCY,
    ACTOR_START_TIMEOUT_S,
    _actor_options,
    acoustic_actor_count,
    acoustic_num_gpus,
    feature_actor_count,
    read_bundle_files,
)
from workers.audio.vad_gate import decoder_endpoint_ms
from workers.decoding.decoder import DecoderConfig
from workers.features.config import frames_for_ms
from workers.model.bundle_config import BundleError, BundleFiles


@dataclass
class StageActors:
    """Handles of one set of stage actors, and the bundle files they restart from.

    ``features``, ``acoustics`` and ``decoders`` are lists: a stream is placed on one actor
    of each (``StreamingPipeline.open_stream``). ``sample_rate_hz`` is the model's rate."""

    ingest: Any
    features: list[Any]
    acoustics: list[Any]
    decoders: list[Any]
    bundle_files: Any  # ObjectRef of the bundle's files; held so that a restarting actor can read them
    sample_rate_hz: int
    chunk_ms: float = 0.0  # acoustic chunk, as the model's frames make it
    lookahead_ms: float = 0.0  # right context, as the model's frames make it
    frame_ms: float = 0.0  # one model frame (stacked MFCC)
    feature_span_ms: float = 0.0  # audio that the first model frame needs (the stacked window)
    info: dict[str, Any] = field(default_factory=dict)  # what the set was started with, for banners and /stats

    def named(self) -> dict[str, Any]:
        """Stage name -> actor handle: ``ingest``, ``features``, ``features-2``, ``acoustic``, ..."""
        actors = {"ingest": self.ingest}
        for name, group in (("features", self.features), ("acoustic", self.acoustics), ("decoder", self.decoders)):
            actors.update({name if k == 0 else f"{name}-{k + 1}": actor for k, actor in enumerate(group)})
        return actors

    def stream_counts(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Per actor, the streams it holds any state for (0 everywhere once every stream has
        been closed or dropped)."""
        named = self.named()
        return dict(zip(named, ray.get([a.held_streams.remote() for a in named.values()], timeout=timeout_s)))

    def rss_mb(self, timeout_s: float = 30.0) -> dict[str, float]:
        """Per actor, its process's resident memory in MB."""
        named = self.named()
        return dict(zip(named, ray.get([a.rss_mb.remote() for a in named.values()], timeout=timeout_s)))

    def kill(self) -> None:
        """Stop every actor of the set (no restart)."""
        if ray.is_initialized():
            for actor in self.named().values():
                ray.kill(actor, no_restart=True)


def start_stage_actors(config: AppConfig, bundle: BundleFiles, decoder_config: DecoderConfig | None = None) -> StageActors:
    """Start the stage actors for ``bundle`` with ``config.streaming``'s placement and wait
    until they answer (model loading included). Raises ``RuntimeError`` naming the resources
    when they do not start within ``ACTOR_START_TIMEOUT_S``."""
    s, frame_ms, rate_hz = config.streaming, bundle.features.frame_ms, bundle.features.sample_rate_hz
    files = ray.put(read_bundle_files(bundle.path))  # once; held for actor restarts
    num_gpus = acoustic_num_gpus(s)
    chunk_samples = max(1, int(rate_hz * s.ingest_chunk_ms / 1000))
    acoustic_options = _actor_options(s.acoustic_resources, num_gpus=num_gpus, max_concurrency=ACOUSTIC_MAX_CONCURRENCY)
    chunk_frames, right_frames = max(1, frames_for_ms(s.chunk_ms, frame_ms)), frames_for_ms(s.lookahead_ms, frame_ms)
    actors = StageActors(
        ingest=ray.remote(IngestActor).options(**_actor_options()).remote(rate_hz, chunk_samples),
        features=[ray.remote(FeatureActor).options(**_actor_options()).remote(files, config.vad, s.endpoint_silence_ms)
                  for _ in range(feature_actor_count(s))],
        acoustics=[
            ray.remote(AcousticActor).options(**acoustic_options).remote(
                files, chunk_frames, right_frames, s.max_batch_wait_ms, s.max_batch_streams,
                "cuda" if num_gpus > 0 else "cpu", s.acoustic_num_threads, config.inference.quantize,
            )
            for _ in range(acoustic_actor_count(s, num_gpus))
        ],
        decoders=[
            ray.remote(DecoderActor).options(**_actor_options(s.decoder_resources)).remote(
                files, decoder_config or config.decoder, decoder_endpoint_ms(s.endpoint_silence_ms, config.vad), config.vad)
            for _ in range(s.decoder_actors)
        ],
        bundle_files=files,
        sample_rate_hz=rate_hz,
        chunk_ms=chunk_frames * frame_ms,
        lookahead_ms=right_frames * frame_ms,
        frame_ms=frame_ms,
        feature_span_ms=1000 * bundle.features.min_samples / rate_hz,
        info={"model": str(bundle.info.get("name", bundle.path.name)), "num_gpus": num_gpus},
    )
    try:  # surface start-up errors here, and resources no node offers
        ray.get([a.__ray_ready__.remote() for a in actors.named().values()], timeout=ACTOR_START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        actors.kill()
        raise RuntimeError(
            f"stage actors did not start in {ACTOR_START_TIMEOUT_S:.0f} s: does the cluster offer "
            f"acoustic_resources={s.acoustic_resources}, decoder_resources={s.decoder_resources}, GPUs={num_gpus}?"
        ) from None
    except ray.exceptions.RayActorError as exc:
        actors.kill()
        raise _bundle_error(bundle.path, exc) or exc from None
    except BaseException:
        actors.kill()
        raise
    return actors


def _bundle_error(path: Path, exc: Exception) -> BundleError | None:
    """The model bundle's own error when a stage actor failed to load ``path`` (the driver checks the
    bundle without torch; the weights are read in the actors, from an unpacked copy): the file named
    as the user gave it. None for other failures."""
    found = re.search(r"BundleError: \S*/([^/\s:]+): (.*)", str(exc))
    return BundleError(f"{Path(path) / found.group(1)}: {found.group(2)}") if found else None
