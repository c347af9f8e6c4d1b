#!/usr/bin/env python
"""Does a long continuous stream drift? The same 5 minutes of speech at the start and at the
end of one ~30-minute stream, the WER of each.

    python scripts/bench/continuous_drift.py ../shared/data/an4 --minutes 30 --json docs/benchmarks/drift.json

The stream: the dev speakers' utterances joined with seeded 0.3-3 s pauses of faint noise
(``workers.data.continuous``), as many as fill the first ``--window-minutes`` (F), then other
passes over the dev set in other orders up to ``--minutes`` less a window (M), then F again,
the same samples. One in-process ``StreamingRecognizer`` at the config's settings hears it
all as one stream; its finals are assigned to the utterances by time and F's two copies are
scored. Prints a JSON line: WER of each copy, their ratio, splits and merges.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.evaluate import score, select_split
from pipeline.evaluate_continuous import recognize_streaming
from workers.audio.vad_gate import WINDOW_SAMPLES
from workers.data.continuous import JoinedStream, Placed, assign_finals, join_utterances
from workers.data.corpus import read_corpus
from workers.recognizer import Recognizer, StreamingRecognizer


def _grid(samples: int) -> int:
    """``samples`` rounded down to whole voice activity windows: the second copy of the window
    then lies on the detector's 32 ms grid as the first does (a stream's windows count from its
    first sample; a shift of a few ms moves utterance edges and changes a few words)."""
    return samples // WINDOW_SAMPLES * WINDOW_SAMPLES


def build(utts, rec: Recognizer, minutes: float, window_minutes: float) -> tuple[JoinedStream, list[Placed], list[Placed]]:
    """The stream and F's utterances in its first and in its last copy."""
    rate = rec.bundle.features.sample_rate_hz
    waves = {u.id: rec.load(u.audio) for u in utts}
    first = join_utterances("f", [(u.id, u.text, waves[u.id]) for u in utts], rate, seed=0)
    keep = [p for p in first.utterances if p.end_s <= window_minutes * 60]
    window = first.wave[: _grid(int(round((keep[-1].end_s + 0.3) * rate)))]
    middle, seconds, k = [], 0.0, 1
    while seconds < (minutes - 2 * window_minutes) * 60:
        order = list(utts)
        random.Random(k).shuffle(order)
        part = join_utterances(f"m{k}", [(u.id, u.text, waves[u.id]) for u in order], rate, seed=k)
        part.wave = part.wave[: _grid(part.wave.numel())]  # the last pause, cut to the detector's window grid
        middle.append(part)
        seconds += part.duration_s
        k += 1
    pieces, placed, offset = [], [], 0.0
    for part in [JoinedStream("f", window, rate, keep), *middle, JoinedStream("f", window, rate, keep)]:
        pieces.append(part.wave)
        placed += [Placed(p.id, p.text, p.start_s + offset, p.end_s + offset) for p in part.utterances]
        offset += part.wave.numel() / rate
    stream = JoinedStream("drift", torch.cat(pieces), rate, placed)
    return stream, placed[: len(keep)], placed[-len(keep) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="corpus root (AN4)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--window-minutes", type=float, default=5.0)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config()
    s = config.streaming
    utts = select_split(read_corpus(args.data).utterances, config, "dev", None)
    rec = Recognizer(None, config.decoder, s.chunk_ms, s.lookahead_ms, vad=config.vad)
    stream, head, tail = build(utts, rec, args.minutes, args.window_minutes)
    print(f"{stream.duration_s / 60:.1f} min, {len(stream.utterances)} utterances; the window: {len(head)}", file=sys.stderr)
    t0 = time.perf_counter()
    srec = StreamingRecognizer(rec.bundle, config.decoder, s.chunk_ms, s.lookahead_ms, s.endpoint_silence_ms, vad=config.vad)
    finals = recognize_streaming(srec, stream)
    compute_s = time.perf_counter() - t0
    assigned = assign_finals(stream.utterances, finals)
    hyps = dict(zip([id(p) for p in stream.utterances], assigned.hypotheses))
    reports = [score([p.id for p in w], [p.text for p in w], [hyps[id(p)] for p in w]) for w in (head, tail)]
    out = {
        "stream_minutes": round(stream.duration_s / 60, 2), "window_utterances": len(head),
        "first_window_wer": round(reports[0].wer, 4), "last_window_wer": round(reports[1].wer, 4),
        "last_over_first": round(reports[1].wer / reports[0].wer, 3) if reports[0].wer else None,
        "splits": assigned.splits, "merges": assigned.merges, "empty_finals": assigned.empty_finals,
        "utterances": len(stream.utterances), "finals": len(finals), "compute_s": round(compute_s, 1),
        "settings": {"chunk_ms": s.chunk_ms, "lookahead_ms": s.lookahead_ms, "endpoint_ms": s.endpoint_silence_ms,
                     "decoder": config.decoder.kind},
    }
    print(json.dumps(out))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
