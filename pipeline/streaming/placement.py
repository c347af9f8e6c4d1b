"""Where and how the stage actors run: GPUs and actor counts, actor options, and shipping
the model bundle's files to the actors. (Connecting to Ray: ``pipeline.cluster.session``.)

Torch-free at import (the ingest and decoder actors import it): ``unpacked_bundle``, which
loads the model, imports ``workers.model.bundle`` when called."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from pipeline.config import StreamingConfig
    from workers.model.bundle import Bundle

ACTOR_MAX_RESTARTS = 3  # a crashed stage actor comes back; the driver replays its streams there (recovery.StreamRecovery._recover)
ACOUSTIC_MAX_CONCURRENCY = 10_000  # concurrent calls the batching actor accepts (held ones included)
ACTOR_START_TIMEOUT_S = 300.0  # model loading included; longer means resources no node offers


def read_bundle_files(path: str | Path) -> dict[str, bytes]:
    """The bundle directory's files (name -> bytes), to ``ray.put`` once for all actors."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


@contextlib.contextmanager
def unpacked_files(files: dict[str, bytes], names: tuple[str, ...] | None = None) -> Iterator[Path]:
    """Write the files (those of ``names`` only, when given) to a temporary directory, removed
    on exit, so build everything that reads them (decoder LM, lexicon) inside."""
    with tempfile.TemporaryDirectory(prefix="asr-bundle-") as tmp:
        for name, data in files.items():
            if names is None or name in names:
                (Path(tmp) / name).write_bytes(data)
        yield Path(tmp)


@contextlib.contextmanager
def unpacked_bundle(files: dict[str, bytes], device: str = "cpu", quantize: str = "none") -> Iterator[Bundle]:
    """``unpacked_files`` loaded as a bundle (model included: torch); see ``unpacked_files``."""
    from workers.model.bundle import load_bundle  # here, not at the top: the torch-free actors import this module

    with unpacked_files(files) as path:
        yield load_bundle(path, device, quantize)


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


def feature_actor_count(streaming: StreamingConfig) -> int:
    """``feature_actors``, or with 0: one per 4 CPUs of the cluster (MFCC and voice activity
    detection cost about 2 % of a core per real-time stream; one actor saturated near 64
    streams on a 16-core GPU machine), at least one."""
    if streaming.feature_actors:
        return streaming.feature_actors
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // 4)


STREAMS_PER_CPU = 8  # real-time streams per CPU core the stage actors kept within their latency target (docs/RESULTS.md, "Performance on 2 cores")
STREAMS_PER_GPU = 64  # and per GPU (docs/RESULTS.md, "Performance on a GPU": 64 streams p95 170 ms on one H100)


def max_stream_count(streaming: StreamingConfig) -> int:
    """``max_streams``, or with 0: ``STREAMS_PER_CPU`` per CPU plus ``STREAMS_PER_GPU`` per
    GPU of the cluster, at least one."""
    if streaming.max_streams:
        return streaming.max_streams
    resources = ray.cluster_resources()
    return max(1, int(STREAMS_PER_CPU * resources.get("CPU", 1) + STREAMS_PER_GPU * resources.get("GPU", 0)))


def _actor_options(resources: dict | None = None, **extra: Any) -> dict[str, Any]:
    # max_task_retries=0: a retried call would replay audio into per-stream state.
    # num_cpus=0: stage actors are long-lived services placed by custom resources; without
    # it Ray reserves a CPU for the lifetime of any actor that names a resource, and the
    # acoustic actor plus two decoders would not fit a 2-CPU node.
    # enable_task_events=False: Ray's GCS keeps an event record of every call (for the State API
    # and dashboard); a stream makes ~10 calls a second per actor, which grew the GCS by 200 MB
    # over a 30-minute stream (`asr bench`'s pss_growth_mb_by_process).
    return {"max_restarts": ACTOR_MAX_RESTARTS, "max_task_retries": 0, "num_cpus": 0, "resources": dict(resources or {}),
            "enable_task_events": False, **extra}
