"""``asr stream`` (and ``scripts/stream_mic.py``): options, the audio source, the pipeline,
and results printed as they come."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import sys
from collections.abc import Iterator
from typing import TextIO

import numpy as np

from pipeline.cluster.session import ray_log_dir
from pipeline.config import AppConfig, ConfigError, add_words_argument, load_config
from pipeline.streaming.items import StreamError
from pipeline.streaming.session import StreamingPipeline
from pipeline.streaming.sources import MicError, _audio_source, _list_devices
from workers.audio.checks import AudioError
from workers.decoding.decoder import DecoderConfig
from workers.decoding.stage import RecognitionResult
from workers.model.bundle_config import BundleError


def add_stream_arguments(parser: argparse.ArgumentParser, config_options: bool = False) -> argparse.ArgumentParser:
    """Options of ``asr stream`` / ``scripts/stream_mic.py``. ``config_options`` also adds
    ``--config`` and ``--set`` (``asr`` adds those itself, to every subcommand)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mic", action="store_true", help="capture 16 kHz mono from an input device (the default)")
    source.add_argument("--file", default=None, help="stream an audio file instead, paced in real time")
    parser.add_argument("--device", default=None, help="input device index or name (see --list-devices)")
    parser.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    parser.add_argument("--fast", action="store_true", help="with --file: send as fast as the pipeline takes it")
    parser.add_argument("--model", default=None, help="model bundle directory (default: the shipped models/default)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None, help="decoder kind (default: from config)")
    parser.add_argument("--chunk-ms", type=float, default=None, help="acoustic chunk length (default: from config)")
    parser.add_argument("--lookahead-ms", type=float, default=None, help="right context per chunk (default: from config)")
    parser.add_argument("--endpoint-ms", type=float, default=None, help="silence that ends an utterance; 0 disables")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--server", default=None, metavar="ws://HOST:PORT",
                        help="stream to a running `asr serve` (or any Vosk websocket server) instead of a pipeline here")
    parser.add_argument("--show-partials", action="store_true", help="print partial results as lines when not on a terminal")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after this much audio")
    if config_options:
        parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                            help="override a config value, e.g. --set streaming.max_inflight_chunks=4 (repeatable)")
        add_words_argument(parser)
    return parser


def stream_settings(args: argparse.Namespace, config: AppConfig) -> tuple[AppConfig, DecoderConfig]:
    """The config with the command line's streaming options applied, and the decoder config."""
    changes = {"chunk_ms": args.chunk_ms, "lookahead_ms": args.lookahead_ms, "endpoint_silence_ms": args.endpoint_ms}
    try:
        streaming = dataclasses.replace(config.streaming, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as exc:  # a bad --chunk-ms / --lookahead-ms / --endpoint-ms: a user error, exit 2
        raise ConfigError(str(exc)) from None
    decoder = dataclasses.replace(config.decoder, kind=args.decoder) if args.decoder else config.decoder
    return dataclasses.replace(config, streaming=streaming), decoder


def format_final(result: RecognitionResult) -> str:
    """``[start_s - end_s] text`` with times in seconds from the start of the stream."""
    return f"[{result.start_s:.2f} - {result.end_s:.2f}] {result.text}".rstrip()


class ResultPrinter:
    """Finals as lines; the partial as a live line on a terminal (``\\r``), as ``... text``
    lines elsewhere only with ``show_partials``."""

    def __init__(self, out: TextIO, show_partials: bool = False) -> None:
        self.out = out
        self.live = out.isatty()
        self.show_partials = show_partials
        self._partial = ""

    def show(self, results: list[RecognitionResult]) -> None:
        for result in results:
            if result.is_final:
                self._clear()
                if result.text:  # an empty final (the end of a stream that said nothing) prints nothing
                    print(format_final(result), file=self.out, flush=True)
            elif result.text != self._partial:
                self._show_partial(result.text)

    def _show_partial(self, text: str) -> None:
        if self.live:  # one terminal line: the tail of a long partial
            width = shutil.get_terminal_size().columns - 1
            self.out.write(f"\r{text[-width:]}\x1b[K")
            self.out.flush()
        elif self.show_partials:
            print(f"... {text}", file=self.out, flush=True)
        self._partial = text

    def _clear(self) -> None:
        if self.live and self._partial:
            self.out.write("\r\x1b[K")
        self._partial = ""


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is when written to: a local Ray points file
    descriptor 2 at its log and ``sys.stderr`` at the terminal (``pipeline.cluster.session``) after
    the audio source is made, so the source must not keep the ``sys.stderr`` of before."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def run_stream(args: argparse.Namespace, config: AppConfig | None = None, out: TextIO | None = None) -> int:
    """``asr stream``: mic or file -> pipeline -> finals on ``out`` (default stdout).

    Exit codes: 0 done (also after Ctrl-C, which flushes the last result); 1 bad model or
    audio file; 2 no microphone (PortAudio missing, no input device) or a bad config; 130
    Ctrl-C while Ray starts or while flushing.
    """
    out = out or sys.stdout
    if args.list_devices:
        return _list_devices(out)
    try:
        config = config or load_config(getattr(args, "config", None), getattr(args, "overrides", None))
        config, decoder_config = stream_settings(args, config)
        blocks, rate = _audio_source(args, config, _CurrentStderr())  # it prints once capture starts, Ray running
        if args.server:
            return run_server_session(args.server, blocks, rate, ResultPrinter(out, args.show_partials))
        pipeline = StreamingPipeline(config, args.model, decoder_config, args.address)
    except (MicError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (BundleError, AudioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        return run_session(pipeline, blocks, rate, ResultPrinter(out, args.show_partials))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        pipeline.shutdown()
        if ray_log_dir():
            print(f"Ray's logs: {ray_log_dir()}", file=sys.stderr)


def run_server_session(url: str, blocks: Iterator[np.ndarray], rate_hz: int, printer: ResultPrinter) -> int:
    """Stream the blocks to a Vosk-protocol server (``asr serve``) and print its replies as
    ``asr stream`` prints results; Ctrl-C ends the capture and asks for the last result."""
    from pipeline.serve.client import ServerError, VoskClient, reply_result

    try:
        with VoskClient(url, sample_rate_hz=rate_hz) as client:
            try:
                with contextlib.closing(blocks):
                    for block in blocks:
                        printer.show([r for r in [reply_result(client.send_audio(block))] if r is not None])
            except KeyboardInterrupt:
                print("\nstopping: flushing the last result", file=sys.stderr, flush=True)
            except MicError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            final = reply_result(client.eof())
            printer.show([final] if final is not None and final.text else [])
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_session(pipeline: StreamingPipeline, blocks: Iterator[np.ndarray], rate_hz: int, printer: ResultPrinter) -> int:
    """Push every block of one stream, then close it; Ctrl-C ends the capture early."""
    stream_id = pipeline.open_stream()
    code = 0
    try:
        try:
            with contextlib.closing(blocks):  # stops the capture however the loop ends
                for block in blocks:
                    printer.show(pipeline.push(stream_id, block, rate_hz))
        except KeyboardInterrupt:
            print("\nstopping: flushing the last result", file=sys.stderr, flush=True)
        except MicError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        printer.show(pipeline.close(stream_id))
    except StreamError as exc:  # a crash the pipeline could not replay (see streaming.replay_buffer_s)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code
