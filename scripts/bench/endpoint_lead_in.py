"""How a model's streaming WER depends on the audio before each endpointed utterance.

Each dev utterance is cut into utterances as the streaming path cuts it
(``Recognizer.utterance_spans``: voice activity, the endpointer, its pre-roll), and each is
recognised offline, chunked as the stream is (300 + 150 ms by default), with ``L`` seconds
more audio before it (never before the previous cut); the words stay gated by the stream's
voice activity. At L = 0 this is what ``asr eval --mode streaming`` gives (the path the
property tests hold equal to streaming); with a ``rate_hz`` perturbation only nearly, as the
file is resampled whole here and chunk by chunk in a stream (8 kHz, shipped model: 16.58 % here).

    python scripts/bench/endpoint_lead_in.py ../shared/data/an4 --model models/default --lead-s 0,0.3,0.7
"""

from __future__ import annotations

import argparse

import jiwer
import torch

from pipeline.config import load_config
from pipeline.evaluate import _Loader, select_split
from workers.audio.reader import to_model_rate
from workers.audio.vad_gate import WINDOW_SAMPLES
from workers.data.corpus import read_corpus
from workers.data.perturb import Perturbation
from workers.recognizer import Recognizer


def lead_in_text(rec: Recognizer, wave: torch.Tensor, endpoint_ms: float, lead_s: float) -> str:
    """(samples,) at the model rate -> the stream's finals joined, each utterance recognised with
    ``lead_s`` more audio before it."""
    rate = rec.bundle.features.sample_rate_hz
    texts, previous_cut = [], 0
    for span in rec.utterance_spans(wave, endpoint_ms):
        start = max(previous_cut, span.start - int(lead_s * rate)) // WINDOW_SAMPLES * WINDOW_SAMPLES
        silent = torch.zeros((span.start - start) // WINDOW_SAMPLES, dtype=span.speech.dtype)
        (text, _), = rec.transcribe_features([rec.extractor(wave[start : span.stop])], [torch.cat([silent, span.speech])])
        texts.append(text)
        previous_cut = span.stop
    return " ".join(t for t in texts if t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="corpus root (its dev speakers are used)")
    parser.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--lead-s", default="0,0.3,0.7", help="comma-separated extra lead-ins, seconds")
    parser.add_argument("--perturb", action="append", default=[], metavar="KIND=VALUE")
    parser.add_argument("--chunk-ms", type=float, default=None)
    parser.add_argument("--lookahead-ms", type=float, default=None)
    args = parser.parse_args()
    config = load_config()
    leads = [float(x) for x in args.lead_s.split(",")]
    chunk_ms = args.chunk_ms if args.chunk_ms is not None else config.streaming.chunk_ms
    lookahead_ms = args.lookahead_ms if args.lookahead_ms is not None else config.streaming.lookahead_ms
    rec = Recognizer(args.model, config.decoder, chunk_ms, lookahead_ms, vad=config.vad)
    load = _Loader(rec, [Perturbation.parse(p) for p in args.perturb], 0, None)  # as asr eval reads and degrades each file
    utterances = select_split(read_corpus(args.data).utterances, config, "dev", None)
    if not utterances:
        raise SystemExit(f"error: {args.data}: no dev utterances")
    refs, hyps = [], {lead: [] for lead in leads}
    for u in utterances:
        wave, rate_hz = load(u)
        if rate_hz != load.rate_hz:  # a rate_hz perturbation: back to the model rate, as the audio intake does
            wave = to_model_rate(wave.numpy(), rate_hz, load.rate_hz)
        refs.append(load.reference(u))
        for lead in leads:
            hyps[lead].append(lead_in_text(rec, wave, config.streaming.endpoint_silence_ms, lead))
    for lead in leads:
        print(f"lead_in_s {lead:g}: WER {100 * jiwer.wer(refs, hyps[lead]):.2f} % ({len(refs)} utterances, "
              f"model {args.model or 'default'}, perturb {','.join(args.perturb) or 'none'})")


if __name__ == "__main__":
    main()
