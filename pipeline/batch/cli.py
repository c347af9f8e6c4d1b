"""``asr transcribe``: its arguments, the summary line, transcripts on stdout without
``--out``, and ``python -m pipeline.batch.cli`` (the job itself: ``pipeline.batch.job``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.batch.files import (
    collect_inputs,
    read_records,
    render,
)
from pipeline.batch.job import BATCH_FILES, BATCH_SECONDS, LOCAL_MAX_AUDIO_S, _check_options, transcribe_inputs
from pipeline.config import AppConfig, AudioConfig, ConfigError, load_config
from workers.audio.reader import RawFormat
from workers.decoding.decoder import DecoderConfig
from workers.model.bundle import BundleError


def format_summary(summary: dict) -> str:
    """One human-readable line for the end of a run."""
    redone = summary.get("redone_new_settings")
    return (
        f"{summary['files']} files: {summary['transcribed']} transcribed, {summary['skipped']} skipped (done earlier), "
        + (f"{redone} of them redone (done earlier with other settings), " if redone else "")
        + f"{summary['errors']} errors; ran: {summary.get('ran', 'ray')}; {summary['audio_hours']:.4f} h of audio in {summary['wall_s']:.1f} s wall "
        f"(compute {summary['compute_s']:.1f} s, real-time factor {summary['rtf']:.3f})"
        + (f" -> {summary['out']}" if summary.get("out") else "")
        + (f"; Ray's logs: {summary['ray_logs']}" if summary.get("ray_logs") else "")
    )


# --------------------------------------------------------------------------- CLI


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``asr transcribe``; ``--config``/``--set`` (read by ``run_transcribe``) are the CLI's common options."""
    parser.add_argument("input", nargs="+", help="audio file, directory (recursive) or .jsonl manifest")
    parser.add_argument("--out", default=None,
                        help="output directory (transcripts.jsonl and --format files; reruns resume). Without it the "
                             "transcripts go to stdout: 'path: text' per input, or the --format")
    parser.add_argument("--model", default=None, help="model bundle directory (default: models/default)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None, help="override decoder.kind")
    parser.add_argument("--chunk-ms", type=float, default=None, help="latency-controlled chunk in ms (default: whole utterance)")
    parser.add_argument("--lookahead-ms", type=float, default=0.0, help="right context per chunk in ms (with --chunk-ms)")
    parser.add_argument(
        "--format", action="append", default=[], metavar="txt|srt|json",
        help="with --out: also write a file per input (repeat or comma-separate); without: print this format"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", dest="backend", action="store_const", const="local",
                       help=f"run in this process, without Ray (default below {LOCAL_MAX_AUDIO_S:g} s of audio to do)")
    where.add_argument("--ray", dest="backend", action="store_const", const="ray",
                       help="run under Ray Data even for a small job (--address implies it)")
    parser.set_defaults(backend="auto")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs already in transcripts.jsonl")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--batch-size", type=int, default=BATCH_FILES, help=f"files per batch at most (default {BATCH_FILES})")
    parser.add_argument("--batch-seconds", type=float, default=BATCH_SECONDS,
                        help="padded audio per batch at most: files x the longest, seconds (a longer file is alone)")
    parser.add_argument("--concurrency", type=int, default=1, help="acoustic actors (one GPU each when GPUs exist)")
    return parser


def _raw_format(audio: AudioConfig) -> RawFormat:
    return RawFormat(audio.raw_sample_rate_hz, audio.raw_sample_width_bytes, audio.raw_big_endian)


def run_transcribe(args: argparse.Namespace, config: AppConfig | None = None) -> int:
    """Run ``asr transcribe``; returns the exit code: 0 all transcribed, 1 some input errored, 2 could not start.

    ``config``: the loaded configuration; by default read from ``args.config`` with ``args.overrides``.
    The decoder comes from ``config.decoder`` (``--decoder`` overrides its kind), headerless
    PCM is read as ``config.audio`` says.
    """
    formats = tuple(f.strip() for spec in args.format for f in spec.split(",") if f.strip())
    to_stdout = args.out is None
    try:
        _check_options(formats, 1, 1)
        if to_stdout and len(formats) > 1:
            raise ValueError(f"without --out, give one --format to print (got {', '.join(formats)})")
        if config is None:
            config = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
        decoder = config.decoder if args.decoder is None else dataclasses.replace(config.decoder, kind=args.decoder)
        with tempfile.TemporaryDirectory(prefix="asr-transcribe-") as scratch:
            summary = _transcribe(args, config, decoder, formats if args.out else (), args.out or scratch)
            if to_stdout:
                records = {row["path"]: row for row in read_records(Path(summary["out"]))}
                summary["out"] = None
                order = [item.path for item in collect_inputs(args.input)]
                sys.stdout.write(stdout_text([records[p] for p in order], formats[0] if formats else None))
                sys.stdout.flush()
    except (ConfigError, BundleError, FileNotFoundError, ValueError) as exc:
        print(f"asr transcribe: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary), file=sys.stderr if to_stdout else sys.stdout)
    return 1 if summary["errors"] else 0


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when inside it, else as it is (absolute)."""
    try:
        return Path(path).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path


def stdout_text(records: Sequence[dict], fmt: str | None) -> str:
    """What ``asr transcribe`` without ``--out`` prints for ``records`` (in input order).

    ``fmt=None``: one line per input, ``path: text`` or ``path: error: reason``; ``"json"``: the
    records as JSON lines; ``"txt"``/``"srt"``: each input's file as ``--out`` would write it, under a
    ``==> path <==`` line when there are several inputs (an errored input: ``error: reason``)."""
    lines = []
    for rec in records:
        if fmt is None:
            shown = rec["text"] if rec["error"] is None else f"error: {rec['error']}"
            lines.append(f"{_display_path(rec['path'])}: {shown}\n")
        elif fmt == "json":
            lines.append(render(rec, fmt))
        else:
            body = render(rec, fmt) if rec["error"] is None else f"error: {rec['error']}\n"
            lines.append(body if len(records) == 1 else f"==> {_display_path(rec['path'])} <==\n{body}")
    return ("\n" if fmt in ("txt", "srt") and len(records) > 1 else "").join(lines)


def _transcribe(args: argparse.Namespace, config: AppConfig, decoder: DecoderConfig, formats: Sequence[str], out: str) -> dict:
    """``transcribe_inputs`` with the command's options."""
    return transcribe_inputs(
        args.input,
        out,
        bundle_path=args.model,
        decoder_config=decoder,
        chunk_ms=args.chunk_ms,
        lookahead_ms=args.lookahead_ms,
        overwrite=args.overwrite,
        formats=formats,
        batch_size=args.batch_size,
        batch_seconds=args.batch_seconds,
        concurrency=args.concurrency,
        raw_format=_raw_format(config.audio),
        address=args.address,
        vad=config.vad,
        backend=getattr(args, "backend", "auto"),
        quantize=config.inference.quantize,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.batch.cli INPUT --out OUTDIR ...`` (same as ``asr transcribe``)."""
    parser = add_transcribe_arguments(argparse.ArgumentParser(prog="asr transcribe", description=__doc__.split("\n")[0]))
    parser.add_argument("--config", default=None, help="config YAML (default: configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return run_transcribe(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
