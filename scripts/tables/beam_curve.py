"""Beam search cost against accuracy: dev WER and decoding time for beam sizes and thresholds.

The acoustic model's emissions (offline, whole utterances) are computed once on the config's
held-out dev speakers; each (beam_size, beam_threshold) pair then decodes all of them with the
bundle's lexicon + LM, timed on this thread alone. Prints one JSON line per pair.

    OMP_NUM_THREADS=1 python scripts/tables/beam_curve.py ../shared/data/an4 --beam-sizes 4 8 16 32 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jiwer
import torch
from scripts.tune_decoder import emissions_for

from pipeline.config import load_config
from pipeline.evaluate import select_split
from workers.data.corpus import read_corpus
from workers.recognizer import Recognizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="corpus root or manifest (the config's dev speakers are used)")
    p.add_argument("--model", default=None)
    p.add_argument("--beam-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--thresholds", type=float, nargs="+", default=[10.0, 25.0])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = load_config()
    utts = select_split(read_corpus(args.data).utterances, config, "dev", None)
    rec = Recognizer(args.model)
    emissions = emissions_for(rec, utts)
    audio_s = sum(len(e) for e in emissions) * rec.bundle.features.frame_ms / 1000
    refs = [u.text for u in utts]
    for size in args.beam_sizes:
        for threshold in args.thresholds:
            cfg = dataclasses.replace(config.decoder, kind="beam", beam_size=size, beam_threshold=threshold)
            decoder = Recognizer(rec.bundle, cfg).decoder  # (loads the LM again: not timed)
            t0 = time.perf_counter()
            hyps = [decoder.decode(e).text for e in emissions]
            decode_s = time.perf_counter() - t0
            print(json.dumps({"beam_size": size, "beam_threshold": threshold, "wer_pct": round(100 * jiwer.wer(refs, hyps), 2),
                              "decode_s": round(decode_s, 2), "decode_rtfx": round(audio_s / decode_s, 1),
                              "utterances": len(utts), "audio_s": round(audio_s, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
