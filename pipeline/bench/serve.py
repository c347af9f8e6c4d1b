"""``asr bench --serve``: what the websocket front door costs. Prints JSON.

For each N of ``--streams``, on one local Ray and the same stage-actor settings:

- ``in_driver``: N real-time streams pushed by this process straight into a
  ``StreamingPipeline`` (``pipeline.bench.run.bench_streams``: latency from a push to its chain's
  results, over the pushes that completed a model chunk);
- ``websocket``: N real-time clients of ``asr serve`` as the command deploys it on its own
  Ray (deployed here, on loopback, the ingress replica serving its port itself: Serve's
  direct ingress), each a coroutine of one event loop sending a ``--frame-ms`` frame (default
  200 ms, as Vosk's clients send) every ``--frame-ms`` and waiting for the reply (the server waits for
  the stages when the frame completes a model chunk); latency from sending a frame to its
  reply, over every frame and over the chunk-completing ones (``chunk_frames``); a frame sent
  more than a frame period after its due time is late. The in-driver streams push the same
  frame size.
- ``websocket_via_proxy``: the same clients through the Serve proxy (how ``asr serve``
  reaches the ingress on a cluster or with several replicas): every message and reply is
  relayed as a Ray call.

The server and the in-driver pipeline (each with its own stage actors) are both up for the
whole run, and at each N the ways in (``--ways``) are measured one after the other, so that the
machine's speed, which drifts by tens of percent over minutes on a shared VM, weighs on each
alike; ``--repeats`` sweeps over the N again, the first way of each sweep alternating. Each
way first runs ``WARM_UP_S`` of audio at the first N, not counted (the replica's first
connections, the actors' first batches). A configuration keeps real time when its p95
latency is within ``--max-p95-ms`` and no push or frame was late; the websocket's p95 is
taken over the replies that waited for a model chunk, the same pushes the in-driver figure
counts. ``capacity`` of a sweep: the largest N kept by each way, and each ratio to the driver's
(the front door's cost); of the run: those of every sweep, and each ratio's median and range.
``server_rss_mb``: the largest summed RSS of the server's processes (its stage actors, Serve
controller, proxy and ingress) after a websocket run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from pipeline.config import AppConfig
from pipeline.serve.protocol import ChunkClock

WARM_UP_S = 3.0  # audio seconds of a first, uncounted run in each mode
TARGET_RATIO = 0.8  # the websocket keeps at least this share of the in-driver capacity (median over the sweeps)


def websocket_clients(url: str, waves: list[np.ndarray], n_clients: int, seconds: float, rate_hz: int, max_p95_ms: float,
                      frame_ms: float = 200.0, clock: Callable[[], ChunkClock] | None = None) -> dict:
    """N paced clients for ``seconds`` of audio each; per-frame reply latency (all frames, and
    with ``clock`` also over the frames that complete a model chunk: those whose reply waits
    for the stages, as every push counted by the in-driver benchmark does).

    The clients are coroutines of one asyncio event loop on one thread (the Vosk protocol over
    ``websockets``' asyncio client): they share the machine with the server, so they should
    cost it as little as possible, and a reply is timed when it arrives rather than when one
    of N client threads next gets Python's interpreter lock."""
    return asyncio.run(_websocket_clients(url, waves, n_clients, seconds, rate_hz, max_p95_ms, frame_ms, clock))


async def _websocket_clients(url: str, waves: list[np.ndarray], n_clients: int, seconds: float, rate_hz: int, max_p95_ms: float,
                             frame_ms: float, clock: Callable[[], ChunkClock] | None) -> dict:
    from websockets.asyncio.client import connect

    from pipeline.bench.run import _percentiles
    from pipeline.serve.client import pcm16

    block = int(rate_hz * frame_ms / 1000)
    n_frames = int(seconds * 1000 / frame_ms)
    one = clock() if clock else None
    chunk_frame = [one.advance(frame_ms) if one else False for _ in range(n_frames)]
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    late = [0] * n_clients
    errors: list[str] = []
    connected = [asyncio.Event() for _ in range(n_clients)]
    go = asyncio.Event()
    t0 = [0.0]

    async def client(k: int) -> None:
        source = np.concatenate([waves[(k + j) % len(waves)] for j in range(len(waves))])
        frames = [pcm16(source[(i * block) % max(1, len(source) - block):][:block]) for i in range(n_frames)]
        try:
            async with connect(url, open_timeout=30, max_size=None) as ws:
                await ws.send(json.dumps({"config": {"sample_rate": rate_hz}}))
                connected[k].set()
                await go.wait()  # every client on the same tick, as the in-driver run's streams
                for i, frame in enumerate(frames):
                    due = t0[0] + i * frame_ms / 1000
                    now = time.perf_counter()
                    if now < due:
                        await asyncio.sleep(due - now)
                    elif now - due > frame_ms / 1000:
                        late[k] += 1
                    sent = time.perf_counter()
                    await ws.send(frame)
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 120))
                    latencies[k].append(1000 * (time.perf_counter() - sent))
                    if "error" in reply:
                        raise RuntimeError(reply["error"])
                await ws.send(json.dumps({"eof": 1}))
                await asyncio.wait_for(ws.recv(), 120)
        except Exception as exc:  # reported, and the run counts as not kept
            errors.append(f"client {k}: {type(exc).__name__}: {exc}")
            connected[k].set()

    tasks = [asyncio.create_task(client(k)) for k in range(n_clients)]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in connected)), 120)
    t0[0] = time.perf_counter() + 0.05
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), seconds * 10 + 120)
    per_client_p95 = [float(np.percentile(lat, 95)) for lat in latencies if lat]
    flat = [x for lat in latencies for x in lat]
    waited = [x for lat in latencies for i, x in enumerate(lat) if clock and chunk_frame[i]]
    result = {"clients": n_clients, "audio_s_per_client": seconds, "frame_ms": frame_ms, **_percentiles(flat),
              "chunk_frames": {k: v for k, v in _percentiles(waited).items() if k in ("p50_ms", "p95_ms", "n")},
              "late_frames": sum(late), "frames": n_frames * n_clients,
              "clients_within_p95_bound": sum(p <= max_p95_ms for p in per_client_p95), "errors": errors[:5]}
    # Kept real time: judged on the replies that waited for the stages when they are known (the
    # pushes the in-driver benchmark counts), else on every reply.
    judged_p95 = result["chunk_frames"].get("p95_ms") if clock else result["p95_ms"]
    result["kept_real_time"] = bool(not errors and judged_p95 is not None and judged_p95 <= max_p95_ms and not result["late_frames"])
    return result


def run_bench_serve(args: argparse.Namespace, config: AppConfig) -> int:
    import os

    from pipeline.bench.run import bench_streams, print_result, stream_kept_real_time
    from pipeline.cluster.session import ray_log_dir, shutdown_ray, start_local_ray
    from pipeline.serve.cli import deploy, direct_ingress_environment, take_down
    from pipeline.streaming.session import StreamingPipeline
    from workers.audio.reader import load_audio
    from workers.data.corpus import read_corpus
    from workers.model.bundle_config import check_bundle

    try:
        utts = read_corpus(args.data).utterances[:40]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not utts:
        print(f"error: {args.data}: no utterances to benchmark", file=sys.stderr)
        return 2
    rate = config.features.sample_rate_hz
    waves = [load_audio(u.audio, rate).numpy() for u in utts]
    result: dict = {"cpu_count": os.cpu_count(), "model": str(args.model or "models/default"),
                    "settings": {"chunk_ms": config.streaming.chunk_ms, "lookahead_ms": config.streaming.lookahead_ms,
                                 "frame_ms": args.frame_ms, "decoder": config.decoder.kind, "max_p95_ms": args.max_p95_ms},
                    "repeats": []}
    start_local_ray(num_cpus=os.cpu_count(), environment=direct_ingress_environment(args.serve_port))
    deployment = None
    try:
        bundle = check_bundle(args.model)
        serve_config = _with_max_streams(config, max(args.streams))
        deployment = deploy(serve_config, bundle, serve_config.decoder, port=args.serve_port, direct=True)
        a = deployment.actors
        clock = functools.partial(ChunkClock, a.chunk_ms, a.lookahead_ms, a.frame_ms, a.feature_span_ms, config.streaming.ingest_chunk_ms)
        urls = {"websocket": deployment.url, "websocket_via_proxy": deployment.proxy_url}
        server_rss_mb = 0.0

        def measure(way: str, n: int, seconds: float) -> dict:
            nonlocal server_rss_mb
            if way == "in_driver":
                r = bench_streams(pipe, waves, n, seconds, rate, push_ms=args.frame_ms)
                r["kept_real_time"] = stream_kept_real_time(r, args.max_p95_ms)
                r.pop("latency_breakdown", None)
                return r
            _wait_until_no_connections(args.serve_port)  # the last run's connections are closed
            r = websocket_clients(urls[way], waves, n, seconds, rate, args.max_p95_ms, args.frame_ms, clock)
            server_rss_mb = max(server_rss_mb, _server_rss_mb(a))
            return r

        with StreamingPipeline(config, args.model) as pipe:  # its own stage actors, idle while the server's work
            for way in args.ways:  # warm-ups: not counted
                measure(way, args.streams[0], WARM_UP_S)
            for repeat in range(args.repeats):
                order = list(args.ways) if repeat % 2 == 0 else list(reversed(args.ways))  # who goes first alternates
                sweep = sweep_streams(args.streams, order, measure, args.stream_seconds)
                result["repeats"].append({"order": order, "runs": sweep, "capacity": capacity(sweep, args.ways, args.max_p95_ms)})
        result["server_rss_mb"] = round(server_rss_mb, 1)
    finally:
        take_down(deployment)
        shutdown_ray()
    result["capacity"] = summarize_capacity([r["capacity"] for r in result["repeats"]], args.ways)
    if "websocket_over_in_driver" in result["capacity"]:  # the target: the front door costs at most 20 %
        median = result["capacity"]["websocket_over_in_driver"]["median"]
        result["capacity"]["target"] = {"websocket_over_in_driver_median_at_least": TARGET_RATIO, "met": median >= TARGET_RATIO}
    result["added_at_equal_n_ms"] = {way: added_at_equal_n_ms(result["repeats"], way) for way in args.ways if way != "in_driver" and "in_driver" in args.ways}
    result["ray_logs"] = ray_log_dir()
    return print_result(result, args.json_path)


def sweep_streams(streams: list[int], order: list[str], measure: Callable[[str, int, float], dict], seconds: float) -> list[dict]:
    """At each N of ``streams`` (ascending), every way of ``order`` one after the other, so that
    the machine's drift weighs on each alike; stops after the N at which no way kept real time
    for the second N in a row (larger N would only cost time)."""
    sweep: list[dict] = []
    for n in streams:
        run: dict = {"streams": n}
        for way in order:
            run[way] = measure(way, n, seconds)
            print(json.dumps({"streams": n, way: run[way]}), flush=True)
        sweep.append(run)
        if len(sweep) >= 2 and not any(r[way]["kept_real_time"] for r in sweep[-2:] for way in order):
            break
    return sweep


def capacity(sweep: list[dict], ways: list[str], max_p95_ms: float) -> dict:
    """The largest N each way kept in real time over a sweep, and each way's over the driver's."""
    kept = {way: max([run["streams"] for run in sweep if run[way]["kept_real_time"]], default=0) for way in ways}
    out: dict = {f"{way}_streams": n for way, n in kept.items()}
    for way in ways:
        if way != "in_driver" and "in_driver" in kept:
            out[f"{way}_over_in_driver"] = round(kept[way] / kept["in_driver"], 3) if kept["in_driver"] else None
    out["criterion"] = f"p95 <= {max_p95_ms:g} ms (websocket: over the replies that waited for a model chunk), nothing late"
    return out


def summarize_capacity(per_repeat: list[dict], ways: list[str]) -> dict:
    """Over the repeats: each way's kept N, and the median and the range of each ratio (over
    the sweeps in which the driver kept some N; ``each`` lists every sweep's, None where not)."""
    out: dict = {f"{way}_streams": [c[f"{way}_streams"] for c in per_repeat] for way in ways}
    for way in ways:
        ratios = [c.get(f"{way}_over_in_driver") for c in per_repeat]
        known = [r for r in ratios if r is not None]
        if way == "in_driver" or not known:
            continue
        out[f"{way}_over_in_driver"] = {"each": ratios, "median": round(float(np.median(known)), 3), "min": min(known), "max": max(known)}
    return out


def added_at_equal_n_ms(repeats: list[dict], way: str) -> dict:
    """What ``way`` adds to the driver's latency at equal N: the median and quartiles, over every
    N of every sweep, of its p50 and p95 (over the replies that waited for a model chunk) minus
    the driver's."""
    gaps: dict[str, list[float]] = {"p50_ms": [], "p95_ms": []}
    for run in (run for repeat in repeats for run in repeat["runs"]):
        ours = run[way].get("chunk_frames") or run[way]
        for key, values in gaps.items():
            if ours.get(key) is not None and run["in_driver"].get(key) is not None:
                values.append(ours[key] - run["in_driver"][key])
    return {key: {"median": round(float(np.median(v)), 1), "quartiles": [round(float(q), 1) for q in np.percentile(v, [25, 75])], "n": len(v)}
            for key, v in gaps.items() if v}


def _server_rss_mb(actors) -> float:
    """Summed RSS of the server's processes: its stage actors, and Serve's controller, proxy and
    ingress replica (shared pages counted in each)."""
    from pipeline.bench.run import RssSampler

    return sum(actors.rss_mb().values()) + RssSampler.current_mb(("ServeController", "ProxyActor", "ServeReplica"), include_self=False)


def _wait_until_no_connections(port: int, timeout_s: float = 30.0) -> None:
    """Until the ingress counts no open connection (a client's close reaches it a little later)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            if json.loads(reply.read())["connections"] == 0:
                return
        time.sleep(0.2)


def _with_max_streams(config: AppConfig, max_streams: int) -> AppConfig:
    import dataclasses

    return dataclasses.replace(config, streaming=dataclasses.replace(config.streaming, max_streams=max_streams))
