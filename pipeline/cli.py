"""The `asr` command: transcribe | stream | serve | eval | train | bench | submit."""

from __future__ import annotations

import argparse
import sys

from pipeline.cluster import session as ray_session
from pipeline.config import ConfigError, add_words_argument, load_config


def _common(parser: argparse.ArgumentParser, words: bool = True) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set decoder.beam_size=64 (repeatable)")
    if not any(a.dest == "model" for a in parser._actions):
        parser.add_argument("--model", default=None, help="model bundle directory (default: the shipped models/default)")
    if words and not any(a.dest == "words" for a in parser._actions):
        add_words_argument(parser)


def _verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs and progress bars (by default they stay in the log directory the summary names)")


def version_text() -> str:
    """``asr --version``: the package's version and the shipped model's name and training date
    (from ``models/default/config.json`` without loading the weights)."""
    import importlib.metadata
    import json

    from workers.model.bundle import DEFAULT_BUNDLE

    try:
        version = importlib.metadata.version("lcasr")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    try:
        info = json.loads((DEFAULT_BUNDLE / "config.json").read_text()).get("info", {})
    except (OSError, ValueError) as exc:
        return f"asr (lcasr) {version}; model: {DEFAULT_BUNDLE} unreadable ({exc})"
    name = info.get("name", DEFAULT_BUNDLE.name)
    trained = info.get("trained_date", "not recorded")
    return f"asr (lcasr) {version}; model: {name} ({DEFAULT_BUNDLE}), trained {trained}"


def build_parser() -> argparse.ArgumentParser:
    from pipeline.batch.cli import add_transcribe_arguments
    from pipeline.bench.run import add_bench_arguments
    from pipeline.cluster.jobs import add_submit_arguments
    from pipeline.evaluate import add_eval_arguments
    from pipeline.serve.cli import add_serve_arguments
    from pipeline.streaming import add_stream_arguments

    parser = argparse.ArgumentParser(prog="asr", description="Streaming speech recognition on Ray",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # --version on one line
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("transcribe", help="batch-transcribe a file, directory or manifest (Ray Data)")
    add_transcribe_arguments(p)
    _common(p)
    _verbose(p)
    p = sub.add_parser("stream", help="stream from the microphone or a file through the Ray actor pipeline")
    add_stream_arguments(p)
    _common(p)
    _verbose(p)
    p = sub.add_parser("serve", help="serve streaming recognition over a websocket (Vosk protocol, Ray Serve)")
    add_serve_arguments(p)
    _common(p)
    _verbose(p)
    p = sub.add_parser("eval", help="WER/CER of a mode against reference transcripts")
    add_eval_arguments(p)
    _common(p)
    p = sub.add_parser("train", help="train a model and export a bundle")
    p.add_argument("--run-dir", default="runs/default", help="checkpoints, logs and the exported bundle go here")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint")
    p.add_argument("--export", default=None, help="bundle directory to export the best model to (default RUN_DIR/bundle)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="for smoke tests")
    p.add_argument("--workers", type=int, default=0, help="train data-parallel with this many Ray Train workers (0: in-process)")
    p.add_argument("--use-gpu", action="store_true",
                   help="with --workers: one GPU per worker, waiting for GPU nodes (an autoscaling cluster starts them); "
                        "default: GPUs when the cluster has one per worker now")
    p.add_argument("--train", nargs="+", default=None, metavar="DATA",
                   help="training data: corpus roots (AN4, FSDD, LibriSpeech layouts), folders of audio + .txt, .jsonl manifests "
                        "(default: the AN4 + FSDD split of the config)")
    p.add_argument("--dev", nargs="+", default=None, metavar="DATA",
                   help="held-out data (other speakers than --train), for dev WER and choosing the exported epoch")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error (exit 2) if any line of --train/--dev data is unusable (by default: skipped and counted)")
    _common(p, words=False)
    p = sub.add_parser("bench", help="throughput and latency benchmark (prints JSON)")
    add_bench_arguments(p)
    _common(p)
    _verbose(p)
    p = sub.add_parser("submit", help="submit an asr command to a Ray cluster as a job")
    add_submit_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``asr`` command; returns its exit code (130 after Ctrl-C; SIGTERM raises
    ``SystemExit(143)``). However the command ends, the Ray it started is shut down first."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ray_session.VERBOSE = getattr(args, "verbose", False)
    ray_session.exit_on_sigterm()
    try:
        return _run(parser, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        ray_session.shutdown_ray()


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "submit":
        from pipeline.cluster.jobs import run_submit

        return run_submit(args)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "transcribe":
        from pipeline.batch.cli import run_transcribe

        return run_transcribe(args, config)
    if args.command == "stream":
        from pipeline.streaming import run_stream

        return run_stream(args, config)
    if args.command == "serve":
        from pipeline.serve.cli import run_serve

        return run_serve(args, config)
    if args.command == "eval":
        from pipeline.evaluate import run_eval

        if args.continuous or args.mode == "actors":
            from pipeline.evaluate_continuous import run_continuous_eval as run_eval

        return run_eval(args, config)
    if args.command == "train":
        from pipeline.training.run import run_training_cli

        return run_training_cli(args, config)
    if args.command == "bench":
        from pipeline.bench.run import run_bench

        if args.serve:
            from pipeline.bench.serve import run_bench_serve as run_bench

        return run_bench(args, config)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
