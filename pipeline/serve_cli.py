"""``asr serve``: options, and the command that starts the stage actors, deploys the
websocket ingress (``pipeline.serve``) on Ray Serve and serves until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from pipeline.config import AppConfig

APP_NAME = "asr"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 2700


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="interface to listen on (default loopback only; 0.0.0.0 exposes the server to the network, unauthenticated)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, Vosk's)")
    parser.add_argument("--address", default=None, help="Ray cluster to deploy on (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None, help="decoder kind (default: from config)")
    parser.add_argument("--replicas", type=int, default=1, help="ingress replicas (front doors; recognition is shared)")
    return parser


@dataclass
class Deployment:
    """A running ``asr serve`` application: its stage actors and its limits."""

    actors: Any  # StageActors
    max_streams: int
    url: str
    owns_serve: bool  # Serve was started here (take_down shuts it down, not just the app)


def deploy(config: AppConfig, bundle: Any, decoder: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           replicas: int = 1, verbose: bool = False) -> Deployment:
    """Start the stage actors and deploy the websocket ingress on the connected Ray; returns
    once ``/healthz`` would answer. ``take_down`` undoes it."""
    import ray
    from ray import serve

    from pipeline.serve import AsrIngress
    from pipeline.streaming.placement import max_stream_count
    from pipeline.streaming.stage_actors import start_stage_actors

    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    owns_serve = not _serve_running(ray)
    actors = start_stage_actors(config, bundle, decoder)
    deployment = Deployment(actors, max_stream_count(config.streaming), f"ws://{host}:{port}", owns_serve)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=_serve_logging(verbose))
        ingress = AsrIngress.options(num_replicas=replicas, logging_config=_serve_logging(verbose))
        serve.run(ingress.bind(config, actors, deployment.max_streams), name=APP_NAME, route_prefix="/")
    except BaseException:
        take_down(deployment)
        raise
    return deployment


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
    from pipeline.ray_session import VERBOSE, connect_ray, shutdown_ray
    from workers.bundle_config import BundleError, check_bundle

    problems = [f"--port must be in 1-65535, got {args.port}"] * (not 1 <= args.port <= 65535)
    problems += [f"--replicas must be >= 1, got {args.replicas}"] * (args.replicas < 1)
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    try:
        bundle = check_bundle(args.model)  # torch-free: the weights load in the acoustic actors
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    decoder = dataclasses.replace(config.decoder, kind=args.decoder) if args.decoder else config.decoder
    owns_ray = connect_ray(args.address)
    deployment = None
    try:
        try:
            deployment = deploy(config, bundle, decoder, args.host, args.port, args.replicas, VERBOSE)
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
        print("stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        take_down(deployment)
        if owns_ray:
            shutdown_ray()


def _serve_logging(verbose: bool) -> dict[str, Any]:
    return {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
