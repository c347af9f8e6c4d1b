"""Grid-search the beam decoder's LM weight and word score for a bundle on held-out speakers.

Emissions are computed once per setting (offline, and latency-controlled chunks); then
every (lm_weight, word_score) pair is decoded and scored with jiwer. Besides the best pair
on all dev speakers it reports a 2-fold cross-validated WER (tune on half the speakers,
score on the other half, and the reverse), which shows how much of the gain is tuning
on the test speakers.

    python scripts/tables/tune_decoder.py ../shared/data/an4 --model models/default --json runs/tune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import jiwer

from pipeline.config import load_config
from pipeline.evaluate import select_split
from workers.data.corpus import read_corpus
from workers.decoding.decoder import CtcDecoder, DecoderConfig
from workers.recognizer import Recognizer


def emissions_for(rec: Recognizer, utts) -> list:
    feats = [rec.features(u.audio) for u in utts]
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]))
    out: list = [None] * len(feats)
    for start in range(0, len(order), 16):
        idx = order[start : start + 16]
        for i, e in zip(idx, rec.acoustic.offline([feats[i] for i in idx], rec.chunk_frames, rec.right_context_frames)):
            out[i] = e
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="corpus root or manifest (the config's dev speakers are used)")
    p.add_argument("--model", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--lm-weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    p.add_argument("--word-scores", type=float, nargs="+", default=[-1.0, 0.0, 1.0, 2.0, 3.0])
    p.add_argument("--streaming", type=float, nargs=2, default=[300, 150], metavar=("CHUNK_MS", "LOOKAHEAD_MS"))
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)

    config = load_config(args.config)
    utts = select_split(read_corpus(args.data).utterances, config, "dev", None)
    speakers = sorted({u.speaker for u in utts})
    folds = [set(speakers[0::2]), set(speakers[1::2])]
    refs = [u.text for u in utts]
    settings = {"offline": Recognizer(args.model), "streaming": Recognizer(args.model, chunk_ms=args.streaming[0], lookahead_ms=args.streaming[1])}
    result: dict = {"speakers": speakers, "folds": [sorted(f) for f in folds], "utterances": len(utts), "grid": {}}
    for name, rec in settings.items():
        emissions = emissions_for(rec, utts)
        grid = {}
        for lw, ws in itertools.product(args.lm_weights, args.word_scores):
            cfg = dataclasses.replace(DecoderConfig(), kind="beam", lm_weight=lw, word_score=ws)
            dec = CtcDecoder(cfg, rec.bundle.features.frame_ms, rec.bundle.lexicon_path, rec.bundle.lm_path, rec.bundle.tokens_path)
            hyps = [dec.decode(e).text for e in emissions]
            per_fold = []
            for fold in folds:
                pairs = [(r, h) for u, r, h in zip(utts, refs, hyps) if u.speaker in fold]
                per_fold.append(jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs]))
            wer = jiwer.wer(refs, hyps)
            grid[(lw, ws)] = (wer, per_fold)
            print(f"{name} lm_weight={lw} word_score={ws}: WER {100 * wer:.2f}%", file=sys.stderr)
        best = min(grid, key=lambda k: grid[k][0])
        # 2-fold CV: pick the pair on one fold, count its errors on the other.
        errors = words = 0
        picks = []
        for tune, test in ((0, 1), (1, 0)):
            pick = min(grid, key=lambda k: grid[k][1][tune].wer)
            m = grid[pick][1][test]
            errors += m.substitutions + m.deletions + m.insertions
            words += m.hits + m.substitutions + m.deletions
            picks.append(pick)
        result["grid"][name] = {
            "best": {"lm_weight": best[0], "word_score": best[1], "wer": round(grid[best][0], 4)},
            "cross_validated_wer": round(errors / words, 4),
            "cross_validation_picks": picks,
            "table": [{"lm_weight": k[0], "word_score": k[1], "wer": round(v[0], 4)} for k, v in grid.items()],
        }
        print(f"{name}: best {best} WER {100 * grid[best][0]:.2f}%, 2-fold CV WER {100 * errors / words:.2f}% (picks {picks})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
