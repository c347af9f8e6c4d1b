"""WER of one long recording against the same utterances as separate files.

The first N utterances of the AN4 dev speakers are joined with 0.3-0.8 s of silence
(seeded) into one recording, which is recognised three ways (offline, beam + LM): each
utterance as a file of its own, the recording cut at pauses (the default for recordings
longer than ``vad.max_segment_s``), and the recording decoded whole.

Usage: python scripts/bench/long_recording_wer.py [MODEL_DIR] [AN4_ROOT] [N]
"""

from __future__ import annotations

import sys
import time

import jiwer
import torch

from pipeline.config import load_config
from workers.audio.reader import load_audio
from workers.audio.vad import VadConfig
from workers.data.corpus import read_corpus
from workers.decoding.decoder import DecoderConfig
from workers.recognizer import Recognizer


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    root = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/an4"
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    dev = set(load_config().data.an4_dev_speakers)
    utts = [u for u in read_corpus(root).utterances if u.speaker in dev][:n]
    waves = [load_audio(u.audio) for u in utts]
    gen = torch.Generator().manual_seed(0)
    parts = []
    for w in waves:
        parts += [w, torch.zeros(int(16000 * (0.3 + 0.5 * float(torch.rand(1, generator=gen)))))]
    long = torch.cat(parts)
    ref = " ".join(u.text for u in utts)
    rec = Recognizer(model, DecoderConfig(kind="beam"))
    whole = Recognizer(rec.bundle, DecoderConfig(kind="beam"), vad=VadConfig(max_segment_s=1e9))
    separate = " ".join(rec.transcribe_wave(w).text for w in waves)
    t0 = time.perf_counter()
    pieces = rec.transcribe_wave(long).text
    t1 = time.perf_counter()
    whole_text = whole.transcribe_wave(long).text
    t2 = time.perf_counter()
    print(f"{len(utts)} utterances, {long.numel() / 16000:.1f} s, model {rec.bundle.path}")
    print(f"  separate files:   WER {100 * jiwer.wer(ref, separate):.1f} %")
    print(f"  cut at pauses:    WER {100 * jiwer.wer(ref, pieces):.1f} % ({t1 - t0:.1f} s)")
    print(f"  decoded whole:    WER {100 * jiwer.wer(ref, whole_text):.1f} % ({t2 - t1:.1f} s)")


if __name__ == "__main__":
    main()
