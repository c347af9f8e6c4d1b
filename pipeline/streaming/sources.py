"""Audio sources of ``asr stream``: a file paced like a microphone, microphone capture, the
choice between them from the command line, and the list of input devices."""

from __future__ import annotations

import argparse
import queue
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pipeline.config import AppConfig
from workers.audio.reader import RAW_SUFFIXES, RawFormat, read_audio

MIC_RATE_HZ = 16000  # capture rate: 16 kHz mono
MIC_NO_AUDIO_TIMEOUT_S = 5.0  # an input device that delivers nothing for this long is an error


class MicError(RuntimeError):
    """No usable input device: PortAudio missing, no input device, or capture failed."""


def file_blocks(
    path: str | Path, block_ms: float, paced: bool, raw_format: RawFormat | None = None, max_seconds: float | None = None
) -> tuple[Iterator[np.ndarray], int]:
    """A file as blocks of ``block_ms`` (samples, channels) float32, and its rate. ``paced``:
    each block is released when a microphone would have delivered it (at its end time)."""
    samples, rate = read_audio(path, raw_format)
    if max_seconds is not None:
        samples = samples[: int(max_seconds * rate)]
    block = max(1, int(rate * block_ms / 1000))

    def blocks() -> Iterator[np.ndarray]:
        print(f"Streaming {path} ({len(samples) / rate:.1f} s); Ctrl-C to stop.", file=sys.stderr, flush=True)
        start = time.monotonic()
        for begin in range(0, len(samples), block):
            piece = samples[begin : begin + block]
            if paced:
                time.sleep(max(0.0, start + (begin + len(piece)) / rate - time.monotonic()))
            yield piece

    return blocks(), rate


def import_sounddevice() -> Any:
    """The ``sounddevice`` module, or ``MicError`` when it or PortAudio is missing."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise MicError(f"cannot use the microphone: {exc} (install libportaudio2 and the 'mic' extra)") from exc
    return sounddevice


def parse_device(device: str | None) -> int | str | None:
    """``"3"`` -> 3 (an index); other strings are device names; None is the default input."""
    return int(device) if device is not None and device.strip().isdigit() else device


def check_input_device(sd: Any, device: int | str | None) -> str:
    """The name of the input device that will be used, or ``MicError`` if there is none."""
    try:
        sd.check_input_settings(device=device, channels=1, samplerate=MIC_RATE_HZ, dtype="float32")
        info = sd.query_devices(device, kind="input") if device is not None else sd.query_devices(kind="input")
    except (sd.PortAudioError, ValueError) as exc:
        raise MicError(f"no usable input device {device if device is not None else '(default)'}: {exc}") from exc
    return str(info["name"])


def mic_blocks(sd: Any, device: int | str | None, block_ms: float, max_seconds: float | None, log: TextIO) -> Iterator[np.ndarray]:
    """Capture 16 kHz mono: blocks (samples,) float32 as the device delivers them, until
    ``max_seconds`` of audio (or forever). The stream is stopped when the generator closes."""
    captured: queue.Queue[np.ndarray] = queue.Queue()

    def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        captured.put(indata[:, 0].copy())

    limit = None if max_seconds is None else int(max_seconds * MIC_RATE_HZ)
    block = max(1, int(MIC_RATE_HZ * block_ms / 1000))
    try:
        stream = sd.InputStream(samplerate=MIC_RATE_HZ, channels=1, dtype="float32", device=device, blocksize=block, callback=callback)
    except sd.PortAudioError as exc:
        raise MicError(f"cannot open input device: {exc}") from exc
    with stream:
        print(f"Listening at {MIC_RATE_HZ} Hz; Ctrl-C to stop.", file=log, flush=True)
        total = 0
        while limit is None or total < limit:
            try:
                piece = captured.get(timeout=MIC_NO_AUDIO_TIMEOUT_S)
            except queue.Empty:
                raise MicError(f"the input device delivered no audio for {MIC_NO_AUDIO_TIMEOUT_S:.0f} s") from None
            piece = piece if limit is None else piece[: limit - total]
            total += len(piece)
            yield piece


def _audio_source(args: argparse.Namespace, config: AppConfig, log: TextIO) -> tuple[Iterator[np.ndarray], int]:
    """Blocks and their rate from ``--file`` or the microphone (checked before Ray starts)."""
    block_ms = config.streaming.ingest_chunk_ms
    if args.file:
        a = config.audio
        raw = RawFormat(a.raw_sample_rate_hz, a.raw_sample_width_bytes, a.raw_big_endian)
        raw_format = raw if Path(args.file).suffix.lower() in RAW_SUFFIXES else None
        return file_blocks(args.file, block_ms, not args.fast, raw_format, args.max_seconds)
    sd = import_sounddevice()
    device = parse_device(args.device)
    name = check_input_device(sd, device)
    print(f"Input device: {name}", file=log, flush=True)
    return mic_blocks(sd, device, block_ms, args.max_seconds, log), MIC_RATE_HZ


def _list_devices(out: TextIO) -> int:
    """Print PortAudio's devices; exit code 2 when there are none (or no PortAudio)."""
    try:
        devices = import_sounddevice().query_devices()
    except MicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not len(devices):
        print("error: PortAudio finds no audio devices (no sound card, no PulseAudio server?)", file=sys.stderr)
        return 2
    print(devices, file=out)
    return 0
