"""`asr bench`: batch throughput through Ray vs in-process, streaming latency, memory. Prints JSON.

All figures come from one run on the machine it runs on:

- ``batch`` (``pipeline.bench.batch``): the stage costs per audio second in-process on one
  thread and the cost model's predictions from them, then the same files transcribed
  (whole utterances, default decoder) in-process and through Ray Data (``transcribe_inputs``,
  Ray already started); real-time factors and their speed ratio, end to end and after the
  first row (Ray's start-up of the workers is a fixed cost that longer jobs amortise).
- ``streaming``: N concurrent streams, each fed 100 ms of audio every 100 ms (real time,
  all streams on the same 100 ms tick);
  latency per push, from the push to its chain's results coming back, over the pushes
  that returned a partial (p50/p95/p99); whether the pipeline kept up; and where that
  latency goes (``latency_breakdown``: p50/p95 per stage and per hop between stages).
- ``max_realtime_streams``: the largest N tried whose p95 latency stayed within
  ``--max-p95-ms`` and whose results kept pace with the audio.
- ``long_stream``: one stream of ``--long-minutes`` of speech pushed as fast as the pipeline
  takes it, with the RSS of the stage actors sampled along the way (flat = no leak).
- ``idle_stream_memory``: PSS (and RSS) of a stream driver and every Ray process it started, by
  process, with one stream open and idle (``pipeline.bench.stream_memory``, run first in a subprocess:
  a torch-free driver like `asr stream`'s and `asr serve`'s, with its own Ray); the long stream
  samples the total of this driver's tree (torch included).
- ``peak_rss_mb``: the largest sum of RSS over the driver and Ray's worker processes seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from pipeline.config import AppConfig
from workers.audio.reader import load_audio
from workers.data.corpus import read_corpus

STAGE_ACTORS = ("ray::IngestActor", "ray::FeatureActor", "ray::AcousticActor", "ray::DecoderActor")
# Where a push's latency goes: waits/transfers between stages and the time inside each stage
# (the acoustic span includes waiting for its batch). From the stages' wall-clock stamps.
# The streaming stages other than the acoustic one: their CPU time per stream-second is what the
# cost model scales with the cores (pipeline/bench/cost.py).
HOST_STAGE_ACTORS = ("ray::IngestActor", "ray::FeatureActor", "ray::DecoderActor")
STAGE_SPANS = ("queue_and_send", "ingest", "to_features", "features", "to_acoustic", "acoustic", "to_decoder", "decoder", "to_driver")


class RssSampler:
    """Samples, in a thread, the summed RSS (MB) of this process and every process whose
    command line holds one of ``patterns`` (default: Ray's workers; empty: this process alone);
    ``peak_mb`` is the largest sum seen, a last sample taken on exit included."""

    def __init__(self, interval_s: float = 0.5, patterns: tuple[str, ...] = ("ray::",)) -> None:
        self.interval_s = interval_s
        self.patterns = patterns
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_mb(patterns: tuple[str, ...] = ("ray::",), include_self: bool = True) -> float:
        """Summed RSS of this process (optional) and processes whose command line holds a pattern."""
        total = psutil.Process().memory_info().rss if include_self else 0
        for proc in psutil.process_iter(["cmdline", "memory_info"]) if patterns else ():
            cmd = " ".join(proc.info["cmdline"] or [])
            if any(p in cmd for p in patterns) and proc.info["memory_info"] is not None:
                total += proc.info["memory_info"].rss
        return total / 2**20

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, self.current_mb(self.patterns))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "n": 0}
    q = np.percentile(np.array(values_ms), [50, 95, 99])
    return {"p50_ms": round(float(q[0]), 1), "p95_ms": round(float(q[1]), 1), "p99_ms": round(float(q[2]), 1), "n": len(values_ms)}


class _CompletionWatcher:
    """Timestamps pushes as their chains complete, in a thread, so latency is not quantised
    by the push loop. A push counts when its results hold a partial (it completed a chunk)."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe
        self._lock = threading.Lock()
        self._pending: list = []  # (PushHandle, send time)
        self.latencies_ms: list[float] = []
        self.breakdowns_ms: list[list[float]] = []  # per counted push: time in each STAGE_SPANS span
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, push, t_sent: float) -> None:
        with self._lock:
            self._pending.append((push, t_sent))

    def _run(self) -> None:
        while not self._stop.is_set() or self._pending:
            with self._lock:
                pending = list(self._pending)
            if not any(p.submitted() for p, _ in pending):
                time.sleep(0.001)
                continue
            # block until the oldest chain is back (chains finish about in order); no busy
            # polling, which would take CPU from the pipeline being measured
            done = {id(p) for p in self._pipe.completed([p for p, _ in pending], timeout_s=0.05)}
            t_done = time.perf_counter()
            finished = [(p, t) for p, t in pending if id(p) in done]
            t_done_wall = time.time()
            for push, t_sent in finished:
                item = push.item()
                if item is not None and item.data:  # this push completed a model chunk and returned a partial
                    latency_s = t_done - t_sent
                    self.latencies_ms.append(1000 * latency_s)
                    if len(item.stage_times) == 2 * len(STAGE_ACTORS):
                        marks = [t_done_wall - latency_s, *item.stage_times, t_done_wall]
                        self.breakdowns_ms.append([1000 * (b - a) for a, b in zip(marks, marks[1:])])
            with self._lock:
                self._pending = [e for e in self._pending if id(e[0]) not in done]

    def finish(self) -> float:
        """Wait for every push; returns the seconds that took."""
        t0 = time.perf_counter()
        self._stop.set()
        self._thread.join()
        return time.perf_counter() - t0


def processes_cpu_s(patterns: tuple[str, ...]) -> float:
    """CPU seconds (user + system) used so far by the processes whose command line holds a pattern."""
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(p in " ".join(proc.info["cmdline"] or []) for p in patterns):
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:  # gone meanwhile
            pass
    return total


def bench_streams(pipe, waves: list[np.ndarray], n_streams: int, seconds: float, rate_hz: int, push_ms: float = 100.0,
                  predict_cpus: int = 16) -> dict:
    """N real-time streams for ``seconds``; latency from each push to its chain's results, and the
    CPU time of the stage actors other than the acoustic one per second of one stream (with the
    streams ``predict_cpus`` cores would carry on it)."""
    from pipeline.bench import cost

    block = int(rate_hz * push_ms / 1000)
    cpu0 = processes_cpu_s(HOST_STAGE_ACTORS)
    sids = [pipe.open_stream() for _ in range(n_streams)]
    sources = [np.concatenate([waves[(i + k) % len(waves)] for k in range(len(waves))]) for i in range(n_streams)]
    watcher = _CompletionWatcher(pipe)
    late_pushes, n_push = 0, int(seconds * 1000 / push_ms)
    t_start = time.perf_counter()
    for k in range(n_push):
        due = t_start + k * push_ms / 1000
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        elif now - due > push_ms / 1000:
            late_pushes += 1
        for sid, src in zip(sids, sources):
            offset = (k * block) % max(1, len(src) - block)
            t_sent = time.perf_counter()
            pipe.push(sid, src[offset : offset + block], rate_hz)
            watcher.add(pipe.last_push(sid), t_sent)
    drain_s = watcher.finish()
    stream_cpu_ms = 1000 * (processes_cpu_s(HOST_STAGE_ACTORS) - cpu0) / (n_streams * n_push * push_ms / 1000)
    for sid in sids:
        pipe.close(sid)
    spans = np.array(watcher.breakdowns_ms).reshape(-1, len(STAGE_SPANS))
    breakdown = {name: {k: v for k, v in _percentiles(list(spans[:, i])).items() if k in ("p50_ms", "p95_ms")}
                 for i, name in enumerate(STAGE_SPANS)}
    return {"streams": n_streams, "audio_s_per_stream": seconds, **_percentiles(watcher.latencies_ms),
            "late_pushes": late_pushes, "pushes": n_push * n_streams, "drain_after_audio_s": round(drain_s, 3),
            "latency_breakdown": breakdown, "stream_cpu_ms_per_stream_s": round(stream_cpu_ms, 2),
            "predicted_streams": cost.streams_sustained(stream_cpu_ms, predict_cpus) if stream_cpu_ms > 0 else None,
            "predict_cpus": predict_cpus}


def bench_long_stream(pipe, waves: list[np.ndarray], minutes: float, rate_hz: int) -> dict:
    """One stream of ``minutes`` of speech with 0.6 s gaps (endpointing on), unpaced; RSS over time."""
    gap = np.zeros(int(0.6 * rate_hz), dtype=np.float32)
    sid = pipe.open_stream()
    block = int(rate_hz * 0.1)
    from pipeline.bench.memory import memory_report, process_tree_memory

    pushed_s, samples_mb, pss_mb, finals, k, t0 = 0.0, [], [], 0, 0, time.perf_counter()
    next_sample_s = 0.0
    first = last = None  # PSS by process at the first and the last sample
    while pushed_s < minutes * 60:
        wave = np.concatenate([waves[k % len(waves)], gap])
        k += 1
        for start in range(0, len(wave), block):
            finals += sum(r.is_final for r in pipe.push(sid, wave[start : start + block], rate_hz))
        pushed_s += len(wave) / rate_hz
        if pushed_s >= next_sample_s:
            samples_mb.append((round(pushed_s / 60, 2), round(RssSampler.current_mb(STAGE_ACTORS, include_self=False), 1)))
            last = process_tree_memory()
            first = first or last
            pss_mb.append((round(pushed_s / 60, 2), memory_report(last)["total_pss_mb"]))
            next_sample_s += 60
    finals += sum(r.is_final for r in pipe.close(sid))
    wall = time.perf_counter() - t0
    return {"audio_min": round(pushed_s / 60, 2), "wall_s": round(wall, 1), "rtf": round(wall / pushed_s, 4),
            "utterances_sent": k, "finals": finals, "stage_actors_rss_mb_by_audio_minute": samples_mb,
            "total_pss_mb_by_audio_minute": pss_mb, "pss_growth_mb_by_process": pss_growth(first or [], last or [])}


def pss_growth(first: list, last: list, top: int = 6) -> dict[str, float]:
    """PSS growth (MB) from ``first`` to ``last`` (``process_tree_memory`` lists) of the processes
    in both, by "name pid", largest absolute change first, at most ``top``."""
    before = {p.pid: p for p in first}
    growth = {f"{p.name} {p.pid}": round(p.pss_mb - before[p.pid].pss_mb, 1) for p in last if p.pid in before}
    return dict(sorted(growth.items(), key=lambda kv: -abs(kv[1]))[:top])


def run_bench(args: argparse.Namespace, config: AppConfig) -> int:
    """``asr bench`` (``--serve``: ``pipeline.bench.serve.run_bench_serve``, dispatched by the CLI)."""
    import dataclasses

    from pipeline.bench.batch import bench_batch, first_files
    from pipeline.bench.stream_memory import run_in_subprocess
    from pipeline.cluster.session import ray_log_dir, shutdown_ray, start_local_ray
    from pipeline.streaming import StreamingPipeline

    try:
        utts = read_corpus(args.data).utterances
    except (OSError, ValueError) as exc:  # no such corpus, unreadable or bad manifest: nothing started yet
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not utts:
        print(f"error: {args.data}: no utterances to benchmark", file=sys.stderr)
        return 2
    files, _ = first_files(utts, args.seconds)
    rate = config.features.sample_rate_hz
    waves = [load_audio(f, rate).numpy() for f in files[:40]]
    result: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
                    "model": str(args.model or "models/default"), "decoder": dataclasses.asdict(config.decoder)}
    # First, in a subprocess: the streaming pipeline's memory from a driver like `asr stream`'s and `asr
    # serve`'s, which do not import torch (this one does, for the batch benchmark), with its own Ray.
    result["idle_stream_memory"] = run_in_subprocess(args.data, args.model, getattr(args, "config", None),
                                                     getattr(args, "overrides", []))
    print(json.dumps({k: v for k, v in result["idle_stream_memory"].items() if k != "by_process"}), flush=True)
    start_local_ray(num_cpus=os.cpu_count())
    try:
        with RssSampler() as sampler:
            # The batch job runs alone: on a GPU host the streaming acoustic actor holds the GPU, and the
            # Ray Data actors (which ask for a share of it) would wait for it forever.
            result["batch"] = bench_batch(files, args.model, config, args.batch_actors, args.predict_cpus)
            pipe = StreamingPipeline(config, args.model)
            result["streaming_settings"] = {"chunk_ms": config.streaming.chunk_ms, "lookahead_ms": config.streaming.lookahead_ms,
                                            "push_ms": 100}
            runs = []
            for n in args.streams:
                r = bench_streams(pipe, waves, n, args.stream_seconds, rate, predict_cpus=args.predict_cpus)
                r["kept_real_time"] = stream_kept_real_time(r, args.max_p95_ms)
                runs.append(r)
                print(json.dumps(r), flush=True)
            result["streaming"] = runs
            kept = [r["streams"] for r in runs if r["kept_real_time"]]
            result["max_realtime_streams"] = {"streams": max(kept) if kept else 0, "criterion": f"p95 <= {args.max_p95_ms} ms, no late pushes"}
            if args.long_minutes > 0:
                result["long_stream"] = bench_long_stream(pipe, waves, args.long_minutes, rate)
            pipe.shutdown()
        result["peak_rss_mb"] = round(sampler.peak_mb, 1)
    finally:
        shutdown_ray()
    result["ray_logs"] = ray_log_dir()
    return print_result(result, args.json_path)


def print_result(result: dict, json_path: str | None) -> int:
    """Print the benchmark's JSON (and write it to ``json_path``); returns exit code 0."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    return 0


def stream_kept_real_time(run: dict, max_p95_ms: float) -> bool:
    """Whether a ``bench_streams`` run kept real time: p95 within the bound, no late push,
    and its results drained within 1 s of the audio's end."""
    return bool(run["p95_ms"] is not None and run["p95_ms"] <= max_p95_ms and run["late_pushes"] == 0 and run["drain_after_audio_s"] <= 1.0)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="../shared/data/an4", help="corpus root or manifest to benchmark on")
    parser.add_argument("--seconds", type=float, default=600.0, help="audio seconds for the batch benchmark")
    parser.add_argument("--batch-actors", type=int, default=1, help="acoustic actors of the Ray Data batch job")
    parser.add_argument("--predict-cpus", type=int, default=16, help="cores of the node the cost model predicts for")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16, 32], help="concurrent stream counts to try")
    parser.add_argument("--stream-seconds", type=float, default=20.0, help="audio seconds per stream per run")
    parser.add_argument("--max-p95-ms", type=float, default=150.0, help="p95 latency bound for 'kept in real time'")
    parser.add_argument("--long-minutes", type=float, default=30.0, help="minutes of audio for the memory-flatness stream (0: skip)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the JSON here")
    parser.add_argument("--serve", action="store_true",
                        help="instead: websocket clients of asr serve against the in-driver pipeline at each --streams N (pipeline/bench/serve.py)")
    parser.add_argument("--serve-port", type=int, default=2799, help="with --serve: the loopback port to serve on")
    parser.add_argument("--frame-ms", type=float, default=200.0, help="with --serve: audio per frame and per in-driver push")
    parser.add_argument("--ways", nargs="+", default=["in_driver", "websocket", "websocket_via_proxy"],
                        choices=["in_driver", "websocket", "websocket_via_proxy"], help="with --serve: the ways in to measure")
    parser.add_argument("--repeats", type=int, default=1, help="with --serve: sweeps over --streams (who goes first alternates)")
