"""`asr eval`: word and character error rates of any mode against reference transcripts (jiwer)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jiwer

from pipeline.config import AppConfig
from workers.audio import AudioError
from workers.corpus import Utterance, read_corpus
from workers.decoder import DecoderConfig
from workers.recognizer import Recognizer, StreamingRecognizer


@dataclass
class EvalReport:
    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    reference_words: int
    utterances: int
    failed: list[dict] = field(default_factory=list)  # {"id", "audio", "error"}
    worst: list[dict] = field(default_factory=list)  # {"id", "errors", "alignment"}
    audio_s: float = 0.0
    compute_s: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def real_time_factor(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else float("nan")

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["real_time_factor"] = round(self.real_time_factor, 4)
        return out


def score(ids: list[str], refs: list[str], hyps: list[str], worst_n: int = 5) -> EvalReport:
    """jiwer's WER/CER and counts over the pairs, and the ``worst_n`` utterances with alignments."""
    if not refs:
        return EvalReport(float("nan"), float("nan"), 0, 0, 0, 0, 0, 0)
    words = jiwer.process_words(refs, hyps)
    per_utt = []
    for i, chunks in enumerate(words.alignments):
        errors = sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx) for c in chunks if c.type != "equal")
        per_utt.append((errors, i))
    worst = []
    for errors, i in sorted(per_utt, key=lambda p: (-p[0], p[1]))[:worst_n]:
        if errors == 0:
            break
        single = jiwer.process_words(refs[i], hyps[i])
        alignment = jiwer.visualize_alignment(single, show_measures=False).split("\n", 2)[-1].strip("\n")
        worst.append({"id": ids[i], "errors": errors, "reference": refs[i], "hypothesis": hyps[i], "alignment": alignment})
    return EvalReport(
        wer=words.wer,
        cer=jiwer.cer(refs, hyps),
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
        hits=words.hits,
        reference_words=words.hits + words.substitutions + words.deletions,
        utterances=len(refs),
        worst=worst,
    )


def _stream_file(rec: StreamingRecognizer, features_loader: Recognizer, path: str, ingest_samples: int) -> str:
    from workers.audio import load_audio

    wave = load_audio(path, rec.bundle.features.sample_rate_hz, min_samples=rec.bundle.features.min_samples)
    for start in range(0, len(wave), ingest_samples):
        rec.push(wave[start : start + ingest_samples], rec.bundle.features.sample_rate_hz)
    finals = [r for r in rec.finish() if r.is_final]
    return " ".join(r.text for r in finals if r.text)


def evaluate(
    utterances: list[Utterance],
    bundle_path: str | Path | None,
    decoder_config: DecoderConfig,
    mode: str = "offline",
    chunk_ms: float | None = None,
    lookahead_ms: float = 0.0,
    worst_n: int = 5,
    batch_size: int = 16,
    progress: bool = True,
) -> EvalReport:
    """Transcribe ``utterances`` in ``mode`` ("offline" or "streaming") and score them."""
    if mode not in ("offline", "streaming"):
        raise ValueError(f"mode must be 'offline' or 'streaming', got {mode!r}")
    if mode == "streaming" and chunk_ms is None:
        raise ValueError("streaming mode needs chunk_ms")
    rec = Recognizer(bundle_path, decoder_config, chunk_ms, lookahead_ms)
    ids, refs, hyps, failed = [], [], [], []
    audio_s = 0.0
    t0 = time.perf_counter()
    if mode == "offline":
        loaded = []
        for u in utterances:
            try:
                loaded.append((u, rec.features(u.audio)))
            except AudioError as exc:
                failed.append({"id": u.id, "audio": u.audio, "error": str(exc)})
        loaded.sort(key=lambda p: len(p[1]))
        for start in range(0, len(loaded), batch_size):
            batch = loaded[start : start + batch_size]
            for (u, feats), (text, _) in zip(batch, rec.transcribe_features([f for _, f in batch])):
                ids.append(u.id)
                refs.append(u.text)
                hyps.append(text)
                audio_s += len(feats) * rec.bundle.features.frame_ms / 1000
            if progress:
                print(f"\r{len(ids)}/{len(utterances)} utterances", end="", file=sys.stderr)
    else:
        stream = StreamingRecognizer(rec.bundle, decoder_config, chunk_ms, lookahead_ms)
        ingest = int(rec.bundle.features.sample_rate_hz * 0.1)
        for n, u in enumerate(utterances, 1):
            try:
                hyps.append(_stream_file(stream, rec, u.audio, ingest))
            except AudioError as exc:
                failed.append({"id": u.id, "audio": u.audio, "error": str(exc)})
                continue
            ids.append(u.id)
            refs.append(u.text)
            audio_s += u.duration_s
            if progress:
                print(f"\r{n}/{len(utterances)} utterances", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    report = score(ids, refs, hyps, worst_n)
    report.failed = failed
    report.audio_s = audio_s
    report.compute_s = time.perf_counter() - t0
    latency = None if chunk_ms is None else rec.bundle.model.latency_ms(rec.chunk_frames, rec.right_context_frames, rec.bundle.features.frame_ms)
    report.settings = {"mode": mode, "decoder": decoder_config.kind, "chunk_ms": chunk_ms, "lookahead_ms": lookahead_ms,
                       "algorithmic_latency_ms": latency, "model": str(rec.bundle.path)}
    return report


def select_split(utterances: list[Utterance], config: AppConfig, split: str, speakers: str | None) -> list[Utterance]:
    """``split`` dev: the configured held-out speakers; train: all others; all: everything."""
    if speakers:
        keep = set(speakers.split(","))
        return [u for u in utterances if u.speaker in keep]
    held = set(config.data.an4_dev_speakers) | set(config.data.fsdd_dev_speakers)
    if split == "dev":
        return [u for u in utterances if u.speaker in held]
    if split == "train":
        return [u for u in utterances if u.speaker not in held]
    return utterances


def format_report(report: EvalReport) -> str:
    s = report.settings
    lines = [
        f"mode={s.get('mode')} decoder={s.get('decoder')} chunk_ms={s.get('chunk_ms')} lookahead_ms={s.get('lookahead_ms')} "
        f"latency_ms={s.get('algorithmic_latency_ms')}",
        f"WER {100 * report.wer:.2f}%  CER {100 * report.cer:.2f}%  "
        f"(S={report.substitutions} D={report.deletions} I={report.insertions}, {report.reference_words} words, {report.utterances} utterances)",
        f"real-time factor {report.real_time_factor:.4f} ({report.compute_s:.1f} s for {report.audio_s:.1f} s of audio)",
    ]
    if report.failed:
        lines.append(f"{len(report.failed)} utterances failed to load:")
        lines += [f"  {f['audio']}: {f['error']}" for f in report.failed]
    if report.worst:
        lines.append("worst utterances:")
        for w in report.worst:
            lines.append(f"  {w['id']} ({w['errors']} errors)")
            lines += ["    " + line for line in w["alignment"].splitlines() if line.strip()]
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a .jsonl manifest or a corpus root (AN4, FSDD, LibriSpeech, folder of audio+.txt)")
    parser.add_argument("--mode", choices=("offline", "streaming"), default="offline")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None, help="default: the config's decoder.kind")
    parser.add_argument("--chunk-ms", type=float, default=None, help="latency-controlled chunk (offline default: whole utterance)")
    parser.add_argument("--lookahead-ms", type=float, default=None, help="right context per chunk")
    parser.add_argument("--split", choices=("dev", "train", "all"), default="all", help="dev: the config's held-out speakers")
    parser.add_argument("--speakers", default=None, help="comma-separated speakers to evaluate (overrides --split)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N utterances")
    parser.add_argument("--worst", type=int, default=5, help="how many worst utterances to show")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")


def run_eval(args: argparse.Namespace, config: AppConfig) -> int:
    import dataclasses

    corpus = read_corpus(args.data)
    for source, reason in corpus.skipped:
        print(f"skipped {source}: {reason}", file=sys.stderr)
    utts = select_split(corpus.utterances, config, args.split, args.speakers)[: args.limit]
    if not utts:
        print(f"error: no utterances selected from {args.data}", file=sys.stderr)
        return 2
    decoder_config = dataclasses.replace(config.decoder, kind=args.decoder) if args.decoder else config.decoder
    chunk_ms = args.chunk_ms if args.chunk_ms is not None else (config.streaming.chunk_ms if args.mode == "streaming" else None)
    lookahead_ms = args.lookahead_ms if args.lookahead_ms is not None else (config.streaming.lookahead_ms if chunk_ms is not None else 0.0)
    report = evaluate(utts, args.model, decoder_config, args.mode, chunk_ms, lookahead_ms, args.worst)
    report.settings["skipped_transcripts"] = len(corpus.skipped)
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0
