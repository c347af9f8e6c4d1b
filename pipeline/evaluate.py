"""`asr eval`: word and character error rates of any mode against reference transcripts (jiwer)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
import torch

from pipeline.config import AppConfig
from workers.audio.reader import AudioError, to_model_rate
from workers.audio.vad import VadConfig
from workers.data.corpus import Utterance, read_corpus
from workers.data.perturb import Perturbation, perturb, removes_speech
from workers.decoding.decoder import DecoderConfig
from workers.model.bundle import BundleError, load_bundle
from workers.recognizer import Recognizer, StreamingRecognizer

BABBLE_POOL_SIZE = 100  # utterances of speakers not evaluated, mixed into babble noise


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
    hypothesis_words: int = 0  # words recognised in all files (what counts when the references are empty)
    files_with_words: int = 0

    @property
    def real_time_factor(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else float("nan")

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["real_time_factor"] = round(self.real_time_factor, 4)
        return out


def score(ids: list[str], refs: list[str], hyps: list[str], worst_n: int = 5) -> EvalReport:
    """jiwer's WER/CER and counts over the pairs, and the ``worst_n`` utterances with alignments.

    When every reference is empty (audio with no speech) WER is undefined (NaN) and the
    report counts the words recognised instead."""
    hyp_words = [len(h.split()) for h in hyps]
    if not refs or not any(r.strip() for r in refs):
        report = EvalReport(float("nan"), float("nan"), 0, 0, sum(hyp_words), 0, 0, len(refs))
        report.hypothesis_words, report.files_with_words = sum(hyp_words), sum(1 for n in hyp_words if n)
        report.worst = [{"id": i, "errors": n, "reference": "", "hypothesis": h, "alignment": f"HYP: {h}"}
                        for n, i, h in sorted(zip(hyp_words, ids, hyps), key=lambda p: -p[0])[:worst_n] if n]
        return report
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
        hypothesis_words=sum(hyp_words),
        files_with_words=sum(1 for n in hyp_words if n),
    )


def _stream_wave(rec: StreamingRecognizer, wave: torch.Tensor, rate_hz: int, ingest_ms: float = 100.0) -> str:
    """Push (samples,) at ``rate_hz`` in ``ingest_ms`` pieces, as a client would; the finals' text."""
    step = max(1, int(rate_hz * ingest_ms / 1000))
    finals = []
    for start in range(0, len(wave), step):
        finals += [r for r in rec.push(wave[start : start + step], rate_hz) if r.is_final]
    finals += [r for r in rec.finish() if r.is_final]
    return " ".join(r.text for r in finals if r.text)


class _Loader:
    """Reads an utterance at the model rate and applies the evaluation's perturbations."""

    def __init__(self, rec: Recognizer, perturbations: list[Perturbation], seed: int, babble_pool: list[torch.Tensor] | None) -> None:
        self.rec, self.perturbations, self.seed, self.babble_pool = rec, perturbations, seed, babble_pool
        self.rate_hz = rec.bundle.features.sample_rate_hz

    def __call__(self, u: Utterance) -> tuple[torch.Tensor, int]:
        """-> (samples,) and its rate (the model rate unless a ``rate_hz`` perturbation changed it)."""
        wave = self.rec.load(u.audio)
        if not self.perturbations:
            return wave, self.rate_hz
        return perturb(wave, self.rate_hz, self.perturbations, u.id, self.seed, self.babble_pool)

    def reference(self, u: Utterance) -> str:
        return "" if removes_speech(self.perturbations) else u.text


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
    perturbations: list[Perturbation] | None = None,
    seed: int = 0,
    babble_pool: list[torch.Tensor] | None = None,
    vad: VadConfig | None = None,
    quantize: str = "none",
    endpoint_ms: float = 0.0,
) -> EvalReport:
    """Transcribe ``utterances`` in ``mode`` ("offline" or "streaming") and score them.

    ``perturbations`` degrade each utterance's audio first (seeded by ``seed`` and the
    utterance id); ``babble_pool``: speech for ``babble_snr_db``; ``vad``: voice activity gating;
    ``endpoint_ms``: streaming's endpointing (each file is one stream, as ``asr stream --file``)."""
    if mode not in ("offline", "streaming"):
        raise ValueError(f"mode must be 'offline' or 'streaming', got {mode!r}")
    if mode == "streaming" and chunk_ms is None:
        raise ValueError("streaming mode needs chunk_ms")
    perturbations = list(perturbations or [])
    rec = Recognizer(bundle_path, decoder_config, chunk_ms, lookahead_ms, vad=vad, quantize=quantize)
    load = _Loader(rec, perturbations, seed, babble_pool)
    ids, refs, hyps, failed = [], [], [], []
    audio_s = 0.0
    t0 = time.perf_counter()
    if mode == "offline":
        loaded = []
        for u in utterances:
            try:
                wave, rate_hz = load(u)
                if rate_hz != load.rate_hz:  # what the audio intake does with 8 kHz input
                    wave = to_model_rate(wave.numpy(), rate_hz, load.rate_hz)
                loaded.append((u, rec.analyse(wave)))
            except AudioError as exc:
                failed.append({"id": u.id, "audio": u.audio, "error": str(exc)})
            except Exception as exc:  # e.g. a perturbation that cannot apply to this audio: one utterance, not the run
                failed.append({"id": u.id, "audio": u.audio, "error": f"{u.audio}: {type(exc).__name__}: {exc}"})
        loaded.sort(key=lambda p: len(p[1][0]))
        for start in range(0, len(loaded), batch_size):
            batch = loaded[start : start + batch_size]
            results = rec.transcribe_features([f for _, (f, _) in batch], [s for _, (_, s) in batch])
            for (u, (feats, _)), (text, _) in zip(batch, results):
                ids.append(u.id)
                refs.append(load.reference(u))
                hyps.append(text)
                audio_s += len(feats) * rec.bundle.features.frame_ms / 1000
            if progress:
                print(f"\r{len(ids)}/{len(utterances)} utterances", end="", file=sys.stderr)
    else:
        stream = StreamingRecognizer(rec.bundle, decoder_config, chunk_ms, lookahead_ms, endpoint_ms, vad=vad)
        for n, u in enumerate(utterances, 1):
            try:
                wave, rate_hz = load(u)
                hyps.append(_stream_wave(stream, wave, rate_hz))
            except AudioError as exc:
                failed.append({"id": u.id, "audio": u.audio, "error": str(exc)})
                continue
            except Exception as exc:  # e.g. a perturbation that cannot apply to this audio: one utterance, not the run
                failed.append({"id": u.id, "audio": u.audio, "error": f"{u.audio}: {type(exc).__name__}: {exc}"})
                stream = StreamingRecognizer(rec.bundle, decoder_config, chunk_ms, lookahead_ms, endpoint_ms, vad=vad)  # state unknown now
                continue
            ids.append(u.id)
            refs.append(load.reference(u))
            audio_s += len(wave) / rate_hz
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
                       "algorithmic_latency_ms": latency, "model": str(rec.bundle.path),
                       "perturbations": [str(p) for p in perturbations], "seed": seed, "vad": rec.vad is not None,
                       "quantize": rec.bundle.quantize, "endpoint_ms": endpoint_ms if mode == "streaming" else None}
    return report


def select_split(utterances: list[Utterance], config: AppConfig, split: str, speakers: str | None) -> list[Utterance]:
    """``split`` dev: the configured held-out speakers; train: all others; all: everything."""
    if speakers:
        keep = set(speakers.split(","))
        return [u for u in utterances if u.speaker in keep]
    held = set(config.data.an4_dev_speakers) | set(config.data.fsdd_dev_speakers) | set(config.data.speechocean_dev_speakers)
    if split == "dev":
        return [u for u in utterances if u.speaker in held]
    if split == "train":
        return [u for u in utterances if u.speaker not in held]
    return utterances


def format_report(report: EvalReport) -> str:
    s = report.settings
    lines = [
        f"mode={s.get('mode')} decoder={s.get('decoder')} chunk_ms={s.get('chunk_ms')} lookahead_ms={s.get('lookahead_ms')} "
        f"latency_ms={s.get('algorithmic_latency_ms')} vad={s.get('vad')} quantize={s.get('quantize', 'none')} perturb={','.join(s.get('perturbations', [])) or 'none'}",
    ]
    if report.reference_words:
        lines.append(
            f"WER {100 * report.wer:.2f}%  CER {100 * report.cer:.2f}%  "
            f"(S={report.substitutions} D={report.deletions} I={report.insertions}, {report.reference_words} words, {report.utterances} utterances)"
        )
    else:
        lines.append(
            f"no reference words: {report.hypothesis_words} words recognised in {report.files_with_words} of {report.utterances} files "
            f"({report.hypothesis_words / max(1, report.utterances):.2f} words per file)"
        )
    lines += [
        f"real-time factor {report.real_time_factor:.4f} ({report.compute_s:.1f} s for {report.audio_s:.1f} s of audio)",
    ]
    skipped = report.settings.get("skipped") or []
    if skipped:
        lines.append(f"{len(skipped)} lines of the corpus skipped (not counted in the WER):")
        lines += [f"  {k['source']}: {k['reason']}" for k in skipped]
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
    parser.add_argument("--mode", choices=("offline", "streaming", "actors"), default="offline",
                        help="actors: the Ray streaming pipeline (with --continuous only)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default=None, help="default: the config's decoder.kind")
    parser.add_argument("--chunk-ms", type=float, default=None, help="latency-controlled chunk (offline default: whole utterance)")
    parser.add_argument("--lookahead-ms", type=float, default=None, help="right context per chunk")
    parser.add_argument("--split", choices=("dev", "train", "all"), default="all", help="dev: the config's held-out speakers")
    parser.add_argument("--speakers", default=None, help="comma-separated speakers to evaluate (overrides --split)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N utterances")
    parser.add_argument("--worst", type=int, default=5, help="how many worst utterances to show")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    parser.add_argument("--perturb", action="append", default=[], metavar="KIND=VALUE",
                        help="degrade the audio first (repeatable, applied in order): gain_db=-20, rate_hz=8000, noise_snr_db=10, "
                             "babble_snr_db=10, reverb_rt60_s=0.5, silence_s=5, noise_dbfs=-60")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations' randomness")
    parser.add_argument("--babble-from", default=None,
                        help="corpus whose speech makes babble noise (default: DATA), only speakers not evaluated")
    parser.add_argument("--no-vad", action="store_true", help="keep words where the voice activity detector hears no speech")
    parser.add_argument("--continuous", action="store_true",
                        help="join each speaker's utterances into one stream with seeded 0.3-3 s pauses of faint noise and "
                             "score the stream's finals (splits, merges, empty finals and non-lexicon words counted)")
    parser.add_argument("--endpoint-ms", type=float, default=None,
                        help="streaming's endpointing (default: streaming.endpoint_silence_ms; 0: a file or stream is one utterance)")
    parser.add_argument("--pause-noise-dbfs", type=float, default=None, help="with --continuous: the pauses' noise level (default -60)")


def babble_pool_for(source: str, exclude_speakers: set[str], rate_hz: int, size: int = BABBLE_POOL_SIZE) -> list[torch.Tensor]:
    """Up to ``size`` utterances (spread over ``source``) of speakers not in ``exclude_speakers``, at ``rate_hz``."""
    from workers.audio.reader import load_audio

    others = [u for u in read_corpus(source).utterances if u.speaker not in exclude_speakers]
    picked = others[:: max(1, len(others) // size)][:size]
    pool = []
    for u in picked:
        try:
            pool.append(load_audio(u.audio, rate_hz))
        except AudioError:
            continue
    return pool


@dataclass
class Selection:
    """What ``asr eval``'s arguments select: the utterances and the settings to run them with."""

    utterances: list[Utterance]
    skipped: list[tuple[str, str]]  # (source, reason) of the lines the corpus reader could not use
    decoder: DecoderConfig
    chunk_ms: float | None
    lookahead_ms: float
    vad: VadConfig
    perturbations: list[Perturbation]
    babble_pool: list[torch.Tensor] | None
    endpoint_ms: float


def select(args: argparse.Namespace, config: AppConfig) -> Selection | int:
    """Read the corpus and the options of ``asr eval``; an exit code (2) after a one-line error."""
    import dataclasses

    try:
        corpus = read_corpus(args.data)
        if args.model is not None:
            load_bundle(args.model)  # a refused bundle is the user's error: one line, not a traceback
    except (FileNotFoundError, NotADirectoryError, BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for source, reason in corpus.skipped:
        print(f"skipped {source}: {reason}", file=sys.stderr)
    utts = select_split(corpus.utterances, config, args.split, args.speakers)[: args.limit]
    if not utts:
        print(f"error: no utterances selected from {args.data}", file=sys.stderr)
        return 2
    decoder_config = dataclasses.replace(config.decoder, kind=args.decoder) if args.decoder else config.decoder
    streams = args.mode != "offline"
    chunk_ms = args.chunk_ms if args.chunk_ms is not None else (config.streaming.chunk_ms if streams else None)
    lookahead_ms = args.lookahead_ms if args.lookahead_ms is not None else (config.streaming.lookahead_ms if chunk_ms is not None else 0.0)
    try:
        perturbations = [Perturbation.parse(p) for p in args.perturb]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pool = None
    if any(p.kind == "babble_snr_db" for p in perturbations):
        pool = babble_pool_for(args.babble_from or args.data, {u.speaker for u in utts}, config.audio.sample_rate_hz)
        if not pool:
            print(f"error: babble_snr_db needs speech of speakers not evaluated; none found in {args.babble_from or args.data}",
                  file=sys.stderr)
            return 2
    vad = dataclasses.replace(config.vad, enabled=False) if args.no_vad else config.vad
    endpoint_ms = config.streaming.endpoint_silence_ms if args.endpoint_ms is None else args.endpoint_ms
    return Selection(utts, corpus.skipped, decoder_config, chunk_ms, lookahead_ms, vad, perturbations, pool, endpoint_ms)


def run_eval(args: argparse.Namespace, config: AppConfig) -> int:
    """``asr eval`` of separate files (``--continuous``: ``pipeline.evaluate_continuous``)."""
    sel = select(args, config)
    if isinstance(sel, int):
        return sel
    if args.mode not in ("offline", "streaming"):
        print(f"error: --mode {args.mode} needs --continuous", file=sys.stderr)
        return 2
    report = evaluate(sel.utterances, args.model, sel.decoder, args.mode, sel.chunk_ms, sel.lookahead_ms, args.worst,
                      perturbations=sel.perturbations, seed=args.seed, babble_pool=sel.babble_pool, vad=sel.vad,
                      quantize=config.inference.quantize, endpoint_ms=sel.endpoint_ms)
    report.settings["skipped_transcripts"] = len(sel.skipped)
    report.settings["skipped"] = [{"source": source, "reason": reason} for source, reason in sel.skipped]
    print(format_report(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0
