"""``asr serve``: options, and the command that starts the stage actors, deploys the
websocket ingress (``pipeline.serve``) on Ray Serve and serves until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from typing import Any

from pipeline.config import AppConfig, ConfigError

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


def run_serve(args: argparse.Namespace, config: AppConfig, stop: threading.Event | None = None) -> int:
    """Start (or join) Ray, start the stage actors, deploy the ingress, print the ``serving``
    line and block until Ctrl-C / SIGTERM (or ``stop``); then take everything down."""
    from ray import serve

    from pipeline.ray_session import VERBOSE, connect_ray, shutdown_ray
    from pipeline.serve import AsrIngress
    from pipeline.streaming.placement import max_stream_count
    from pipeline.streaming.stage_actors import start_stage_actors
    from workers.bundle import BundleError, load_bundle

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1-65535, got {args.port}")
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    try:
        bundle = load_bundle(args.model)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    decoder = dataclasses.replace(config.decoder, kind=args.decoder) if args.decoder else config.decoder
    owns_ray = connect_ray(args.address)
    actors = None
    if not VERBOSE:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        actors = start_stage_actors(config, bundle, decoder)
        max_streams = max_stream_count(config.streaming)
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=_serve_logging(VERBOSE))
        deployment = AsrIngress.options(num_replicas=args.replicas, logging_config=_serve_logging(VERBOSE))
        serve.run(deployment.bind(config, actors, max_streams), name=APP_NAME, route_prefix="/")
        print(f"serving ws://{args.host}:{args.port} (model {actors.info['model']}, chunk {actors.chunk_ms:g} ms + lookahead "
              f"{actors.lookahead_ms:g} ms, {decoder.kind} decoder, up to {max_streams} connections)", flush=True)
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        _take_down(owns_ray, actors)
        if owns_ray:
            shutdown_ray()


def _take_down(owns_ray: bool, actors: Any) -> None:
    """Remove the app (all of Serve when this command started Ray), then the stage actors."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.shutdown() if owns_ray else serve.delete(APP_NAME)
    except Exception as exc:  # best effort: Ray's own shutdown follows
        print(f"warning: stopping Serve: {exc}", file=sys.stderr)
    if actors is not None:
        actors.kill()


def _serve_logging(verbose: bool) -> dict[str, Any]:
    return {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}
