"""The cost model: what a node of C cores (and G accelerators) sustains, from costs per audio second.

Measured on any machine (``asr bench``), in-process on one thread:

- ``host_cpu_ms_per_audio_s``: CPU time of everything a batch job does except the acoustic
  forward pass (read, resample, MFCC, voice activity, search, records), per second of audio;
- ``acoustic_ms_per_audio_s``: the forward pass alone, on the device it ran on, at the job's batch size;
- ``stream_cpu_ms_per_stream_s``: CPU time of the streaming stage actors other than the acoustic
  one (ingest, features + voice activity, search), per second of one real-time stream.

Work that parallelises over cores (the analysis tasks, the decode actors, the feature and
decoder actors of many streams) scales with C; the acoustic stage scales with the devices.
"""

from __future__ import annotations

import math


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def host_capacity_rtfx(host_cpu_ms_per_audio_s: float, cpus: int) -> float:
    """Audio seconds per second that ``cpus`` cores sustain on everything but the acoustic model."""
    _positive("host_cpu_ms_per_audio_s", host_cpu_ms_per_audio_s)
    _positive("cpus", cpus)
    return cpus * 1000.0 / host_cpu_ms_per_audio_s


def in_process_rtfx(host_cpu_ms_per_audio_s: float, acoustic_ms_per_audio_s: float) -> float:
    """One process, one thread, the stages one after the other: 1000 / (host + acoustic)."""
    _positive("host_cpu_ms_per_audio_s + acoustic_ms_per_audio_s", host_cpu_ms_per_audio_s + acoustic_ms_per_audio_s)
    return 1000.0 / (host_cpu_ms_per_audio_s + acoustic_ms_per_audio_s)


def node_rtfx(host_cpu_ms_per_audio_s: float, acoustic_ms_per_audio_s: float, cpus: int, accelerators: int = 0) -> float:
    """Batch RTFx of a node: with accelerators, the smaller of what the cores sustain on the host
    work and what the accelerators sustain on the model (``acoustic_ms_per_audio_s`` measured on
    one of them); without, every stage shares the cores."""
    if accelerators > 0:
        _positive("acoustic_ms_per_audio_s", acoustic_ms_per_audio_s)
        return min(host_capacity_rtfx(host_cpu_ms_per_audio_s, cpus), accelerators * 1000.0 / acoustic_ms_per_audio_s)
    _positive("cpus", cpus)
    return cpus * in_process_rtfx(host_cpu_ms_per_audio_s, acoustic_ms_per_audio_s)


def streams_sustained(stream_cpu_ms_per_stream_s: float, cpus: int) -> int:
    """Real-time streams that ``cpus`` cores carry on the stages other than the acoustic one."""
    _positive("stream_cpu_ms_per_stream_s", stream_cpu_ms_per_stream_s)
    _positive("cpus", cpus)
    return math.floor(cpus * 1000.0 / stream_cpu_ms_per_stream_s)


def agreement(predicted: float, measured: float) -> float:
    """|predicted - measured| / measured: how far a prediction is off."""
    _positive("measured", measured)
    return abs(predicted - measured) / measured
