#!/usr/bin/env python
"""How often a streamed utterance's final stays the same when its audio is cut a little differently.

    python scripts/bench/shift_agreement.py ../shared/data/an4 [--model B] [--shift-ms 10] [--speakers mtos,ftal]

For each held-out AN4 speaker, the speaker's utterances are joined into one stream with seeded
pauses (``workers.data.continuous``, as ``asr eval --continuous`` and tests/unit/test_continuous.py
do). Each utterance is then streamed three ways at the config's settings (endpointing on):
inside the joined stream, alone (its file's samples), and alone with ``--shift-ms`` less audio
at its start. Prints, per speaker and in all, how many finals of the joined stream equal the
file's, and how many of the shifted file's equal the file's: the second is the model's own
sensitivity to where a cut falls, a bound on the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from pipeline.config import load_config
from pipeline.evaluate_continuous import recognize_streaming, score_streams
from workers.data.continuous import join_utterances
from workers.data.corpus import read_an4, split_by_speaker
from workers.recognizer import Recognizer, StreamingRecognizer

RATE_HZ = 16000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("an4_root")
    parser.add_argument("--model", default=None, help="bundle directory (default: the shipped model)")
    parser.add_argument("--shift-ms", type=float, default=10.0, help="audio removed from the start of the shifted file")
    parser.add_argument("--speakers", default="", help="comma-separated dev speakers (default: all)")
    args = parser.parse_args(argv)
    config = load_config()
    s = config.streaming
    _, dev = split_by_speaker(read_an4(args.an4_root).utterances, config.data.an4_dev_speakers)
    speakers = args.speakers.split(",") if args.speakers else sorted({u.speaker for u in dev})
    rec = Recognizer(args.model, config.decoder, s.chunk_ms, s.lookahead_ms, vad=config.vad)
    stream = StreamingRecognizer(rec.bundle, config.decoder, s.chunk_ms, s.lookahead_ms, s.endpoint_silence_ms, vad=config.vad)
    shift = round(args.shift_ms * RATE_HZ / 1000)
    total = {"utterances": 0, "joined_equals_file": 0, "shifted_equals_file": 0}
    for speaker in speakers:
        utts = [u for u in dev if u.speaker == speaker]
        if not utts:
            raise SystemExit(f"no dev utterances of speaker {speaker!r}")
        joined = join_utterances(speaker, [(u.id, u.text, rec.load(u.audio)) for u in utts], RATE_HZ, seed=0)
        in_stream = score_streams([joined], [recognize_streaming(stream, joined)], set()).hypotheses
        row = {"speaker": speaker, "utterances": 0, "joined_equals_file": 0, "shifted_equals_file": 0}
        for p in joined.utterances:
            start, stop = round(p.start_s * RATE_HZ), round(p.end_s * RATE_HZ)
            texts = []
            for cut in (0, shift):
                alone = dataclasses.replace(joined, wave=joined.wave[start + cut : stop],
                                            utterances=[dataclasses.replace(p, start_s=0, end_s=(stop - start - cut) / RATE_HZ)])
                texts.append(" ".join(f.text for f in recognize_streaming(stream, alone) if f.text))
            row["utterances"] += 1
            row["joined_equals_file"] += in_stream[p.id] == texts[0]
            row["shifted_equals_file"] += texts[1] == texts[0]
        print(json.dumps(row), flush=True)
        for key in total:
            total[key] += row[key]
    print(json.dumps({"all": total, "shift_ms": args.shift_ms}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
