"""Peak memory of transcribing one long file in a batch worker, and its WER.

Builds a recording of ``--minutes`` from the AN4 dev speakers' utterances (cycled, joined
with 0.3-0.8 s of silence, seeded), written piece by piece to a temporary headerless
big-endian ``.raw`` file (as AN4 ships) or ``.wav``; then, in this process, transcribes it
with the batch stages in-process (``pipeline.batch.stages.transcribe_batch``, one thread) while a thread samples
the resident set size every 20 ms. Prints the RSS when idle (model loaded, one short
utterance transcribed), the peak during the long file, the difference, the time, and the
WER of the long file's transcript against the references and against the same utterances
transcribed one by one.

Usage: python scripts/bench/bench_long_file_memory.py [--minutes 60] [--format raw|wav]
       [--no-vad] [--an4 ../shared/data/an4] [--model DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import jiwer
import numpy as np
import psutil
import soundfile as sf
import torch

from pipeline.batch.stages import transcribe_batch
from pipeline.bench.run import RssSampler
from pipeline.config import load_config
from workers.audio.reader import RawFormat, load_audio
from workers.audio.vad import VadConfig
from workers.data.corpus import read_corpus
from workers.decoding.decoder import DecoderConfig
from workers.recognizer import Recognizer

RATE_HZ = 16000


def build_recording(path: Path, waves: list[np.ndarray], minutes: float, seed: int = 0) -> list[int]:
    """Write utterances (cycled) with 0.3-0.8 s pauses until ``minutes`` of audio; returns the utterance order."""
    rng = np.random.default_rng(seed)
    target, written, order = int(minutes * 60 * RATE_HZ), 0, []
    raw = path.suffix == ".raw"
    out = path.open("wb") if raw else sf.SoundFile(str(path), "w", RATE_HZ, 1, "PCM_16")
    with out:
        while written < target:
            i = len(order) % len(waves)
            pause = np.zeros(int(RATE_HZ * rng.uniform(0.3, 0.8)), dtype=np.float32)
            piece = np.concatenate([waves[i], pause])
            if raw:
                out.write((np.clip(piece, -1, 1 - 1 / 32768) * 32768).astype(">i2").tobytes())
            else:
                out.write(piece)
            written += piece.size
            order.append(i)
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--format", choices=("raw", "wav"), default="raw")
    parser.add_argument("--no-vad", action="store_true", help="voice activity detection off (pieces cut at quiet points)")
    parser.add_argument("--an4", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "an4"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    dev = set(load_config().data.an4_dev_speakers)
    utts = [u for u in read_corpus(args.an4).utterances if u.speaker in dev]
    waves = [load_audio(u.audio).numpy() for u in utts]
    vad = VadConfig(enabled=not args.no_vad)
    rec = Recognizer(args.model, DecoderConfig(kind="beam"), None, 0.0, "cpu", vad)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"long.{args.format}"
        order = build_recording(path, waves, args.minutes)
        short = Path(tmp) / "short.wav"
        sf.write(short, waves[0], RATE_HZ)
        transcribe_batch(rec, [str(short)], RawFormat())  # warm up: first calls allocate lazily
        idle = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        with RssSampler(interval_s=0.02, patterns=()) as peak:  # this process alone
            (record,) = transcribe_batch(rec, [str(path)], RawFormat())
        wall_s = time.perf_counter() - t0
    if record["error"]:
        sys.exit(f"transcription failed: {record['error']}")
    ref = " ".join(utts[i].text for i in order)
    texts = {}
    for i in sorted(set(order)):  # each distinct utterance transcribed as a file of its own
        texts[i] = rec.transcribe_wave(torch.from_numpy(waves[i])).text
    separate = " ".join(texts[i] for i in order)
    figures = {
        "minutes": round(record["duration_s"] / 60, 2), "format": args.format, "vad": not args.no_vad,
        "utterances": len(order), "idle_rss_mb": round(idle / 2**20), "peak_rss_mb": round(peak.peak_mb),
        "above_idle_mb": round(peak.peak_mb - idle / 2**20), "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "wall_s": round(wall_s, 1), "rtf": round(wall_s / record["duration_s"], 4),
        "wer_long_pct": round(100 * jiwer.wer(ref, record["text"]), 2),
        "wer_separate_pct": round(100 * jiwer.wer(ref, separate), 2),
        "wer_long_vs_separate_pct": round(100 * jiwer.wer(separate, record["text"]), 2),
    }
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
