"""``asr serve``: options, and the command that starts the stage actors, deploys the
websocket ingress (``pipeline.serve.app``) on Ray Serve and serves until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import AppConfig
from pipeline.serve.protocol import token_digest

APP_NAME = "asr"
TOKEN_VARIABLE = "ASR_SERVE_TOKEN"
DEFAULT_IDLE_TIMEOUT_S = 300.0  # a client that holds a slot and sends nothing is let go after 5 minutes
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 2700


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to listen on (default loopback only; 0.0.0.0 exposes the server to the network, unauthenticated)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, Vosk's)")
    parser.add_argument("--address", default=None, help="Ray cluster to deploy on (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None, help="decoder kind (default: from config)")
    parser.add_argument("--replicas", type=int, default=1, help="ingress replicas (front doors; recognition is shared)")
    parser.add_argument("--idle-timeout-s", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help=f"close a connection that sends no audio this long (default {DEFAULT_IDLE_TIMEOUT_S:g}; 0: never)")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="on SIGTERM / Ctrl-C: /healthz turns 503 at once, and open streams get this long to receive "
                             "the final of what they sent and a 1001 close (default 10)")
    parser.add_argument("--token", default=None,
                        help=f"clients must present this access token ('Authorization: Bearer TOKEN' or '?token=TOKEN'); "
                             f"default: ${TOKEN_VARIABLE}, else none")
    return parser


@dataclass
class Deployment:
    """A running ``asr serve`` application: its stage actors and its limits."""

    actors: Any  # StageActors
    max_streams: int
    url: str  # where clients connect
    owns_serve: bool  # Serve was started here (take_down shuts it down, not just the app)
    proxy_url: str = ""  # the Serve proxy's address (with direct ingress, a second way in)
    drain_flag: Any = None  # pipeline.serve.app.DrainFlag: set on shutdown, every replica drains


def direct_ingress_environment(port: int) -> dict[str, str]:
    """What a local Ray starts with for Serve's direct ingress: the ingress replica itself
    listens on ``port`` (HTTP and websockets), so frames and replies are not relayed through
    the Serve proxy, one Ray call per message each way. The drain that Serve would otherwise
    wait for on shutdown (30 s, for load balancers) is off: the server stops at once."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def deploy(config: AppConfig, bundle: Any, decoder: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           replicas: int = 1, verbose: bool = False, direct: bool = False, token: str | None = None,
           idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> Deployment:
    """Start the stage actors and deploy the websocket ingress on the connected Ray; returns
    once ``/healthz`` would answer. ``take_down`` undoes it. ``direct``: the Ray was started
    with ``direct_ingress_environment(port)`` and one replica serves ``port`` itself (the Serve
    proxy then listens on a free port of its own)."""
    import ray
    from ray import serve

    from pipeline.serve.app import AsrIngress, DrainFlag
    from pipeline.streaming.placement import max_stream_count
    from pipeline.streaming.stage_actors import start_stage_actors

    if direct and replicas != 1:
        raise ValueError(f"direct ingress serves one replica on one port, got {replicas} replicas")
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    owns_serve = not _serve_running(ray)
    actors = start_stage_actors(config, bundle, decoder)
    proxy_port = _free_port(host) if direct else port
    deployment = Deployment(actors, max_stream_count(config.streaming), f"ws://{host}:{port}", owns_serve, f"ws://{host}:{proxy_port}",
                            DrainFlag.remote())
    try:
        serve.start(http_options={"host": host, "port": proxy_port}, logging_config=_serve_logging(verbose))
        ingress = AsrIngress.options(num_replicas=replicas, logging_config=_serve_logging(verbose))
        front_door = {"direct": direct, "proxy_port": proxy_port}
        digest = token_digest(token) if token else None
        serve.run(ingress.bind(config, actors, deployment.max_streams, front_door, digest, idle_timeout_s, deployment.drain_flag),
                  name=APP_NAME,
                  route_prefix="/")
        if direct:
            _wait_for_health(host, port)
    except BaseException:
        take_down(deployment)
        raise
    return deployment


def _port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (another server holds it), or None. Checked before
    anything starts, as the replica will bind it (SO_REUSEADDR, no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_for_health(host: str, port: int, timeout_s: float = 60.0) -> None:
    """Until the ingress replica answers ``GET /healthz`` on ``port``; RuntimeError if it does not."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the websocket ingress did not start listening on {host}:{port} "
                                   f"within {timeout_s:g} s ({exc}); is the port in use?") from None
        time.sleep(0.2)


def drain(deployment: Deployment, grace_s: float) -> int:
    """Stop taking clients and finish the open streams: every replica's ``/healthz`` turns 503,
    each connection gets the final result of what it sent and a 1001 close. Waits until no
    connection is left (as ``/healthz`` on the port counts them) or ``grace_s`` passed; returns
    the connections still open then."""
    import json
    import urllib.error
    import urllib.request

    import ray

    ray.get(deployment.drain_flag.set.remote())
    host_port = deployment.url.split("://", 1)[1]
    deadline = time.monotonic() + grace_s
    left = -1
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host_port}/healthz", timeout=2) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:  # 503 while draining: its body still counts connections
            body = exc.read()
        except OSError:
            break
        left = json.loads(body or b"{}").get("connections", 0)
        if left == 0:
            return 0
        time.sleep(0.1)
    return max(left, 0)


def take_down(deployment: Deployment | None) -> None:
    """Remove the app (all of Serve when it was started here), then the stage actors."""
    import ray
    from ray import serve

    if deployment is None or not ray.is_initialized():
        return
    try:
        serve.shutdown() if deployment.owns_serve else serve.delete(APP_NAME)
    except Exception as exc:  # best effort: Ray's own shutdown follows
        print(f"warning: stopping Serve: {exc}", file=sys.stderr)
    deployment.actors.kill()


def _serve_running(ray: Any) -> bool:
    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return True
    except ValueError:
        return False


def run_serve(args: argparse.Namespace, config: AppConfig, stop: threading.Event | None = None) -> int:
    """Start (or join) Ray, deploy (``deploy``), print the ``serving`` line and block until
    Ctrl-C / SIGTERM (or ``stop``); then take everything down. Exit codes: 0 stopped by a
    signal, 1 bad model or the actors did not start, 2 bad options."""
    from pipeline.cluster.session import VERBOSE, connect_ray, shutdown_ray
    from workers.model.bundle_config import BundleError, check_bundle

    problems = [f"--port must be in 1-65535, got {args.port}"] * (not 1 <= args.port <= 65535)
    problems += [f"--replicas must be >= 1, got {args.replicas}"] * (args.replicas < 1)
    problems += [f"--idle-timeout-s must be >= 0, got {args.idle_timeout_s:g}"] * (not args.idle_timeout_s >= 0)
    problems += [f"--grace-s must be >= 0, got {args.grace_s:g}"] * (not args.grace_s >= 0)
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    try:
        bundle = check_bundle(args.model)  # torch-free: the weights load in the acoustic actors
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    decoder = dataclasses.replace(config.decoder, kind=args.decoder) if args.decoder else config.decoder
    token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE) or None
    if args.host not in LOOPBACK_HOSTS and not token:
        print(f"warning: listening on {args.host} with no access token and no TLS: anyone who reaches this port can stream "
              f"(--token or ${TOKEN_VARIABLE}; TLS: a reverse proxy, docs/serving.md)", file=sys.stderr, flush=True)
    import ray

    # A Ray started here serves one replica's websocket straight from that replica (direct
    # ingress); on a cluster, or with several replicas, the Serve proxy spreads connections.
    direct = args.replicas == 1 and not (args.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    if direct and (problem := _port_in_use(args.host, args.port)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    owns_ray = connect_ray(args.address, environment=direct_ingress_environment(args.port) if direct else None)
    deployment = None
    try:
        try:
            deployment = deploy(config, bundle, decoder, args.host, args.port, args.replicas, VERBOSE, direct, token,
                                args.idle_timeout_s)
        except RuntimeError as exc:  # actors that did not start, a port in use
            print(f"error: {exc}", file=sys.stderr)
            return 1
        actors = deployment.actors
        print(f"serving {deployment.url} (model {actors.info['model']}, chunk {actors.chunk_ms:g} ms + lookahead "
              f"{actors.lookahead_ms:g} ms, {decoder.kind} decoder, up to {deployment.max_streams} connections)", flush=True)
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print(f"stopping: finishing open streams (up to {args.grace_s:g} s)", file=sys.stderr, flush=True)
        left = drain(deployment, args.grace_s)
        if left:
            print(f"stopping: {left} connections still open after {args.grace_s:g} s; closing them", file=sys.stderr, flush=True)
        return 0
    finally:
        take_down(deployment)
        if owns_ray:
            shutdown_ray()


def _serve_logging(verbose: bool) -> dict[str, Any]:
    return {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
