"""`asr eval --continuous`: each speaker's utterances joined into one stream with pauses,
recognised as one stream, its finals scored against the same references as the files.

The modes: ``offline`` (the batch path: the recording cut at pauses, ``Recognizer``),
``streaming`` (in-process ``StreamingRecognizer``, 100 ms pushes, endpointing as configured)
and ``actors`` (the Ray ``StreamingPipeline``). ``asr serve`` is scored the same way by
``recognize_server`` (tests, the bench). The report adds what a per-file figure cannot show:
splits and merges of utterances, empty finals, and finals with words outside the lexicon.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.evaluate import EvalReport, format_report, score, select
from workers.data.continuous import PAUSE_NOISE_DBFS, Final, JoinedStream, assign_finals, join_utterances
from workers.data.corpus import Utterance
from workers.decoding.stage import RecognitionResult
from workers.recognizer import Recognizer, StreamingRecognizer

CONTINUOUS_MODES = ("offline", "streaming", "actors")
PUSH_MS = 100.0  # what a client sends at a time


@dataclass
class ContinuousReport:
    """The scored streams: ``report`` is the usual WER report over the utterances (each
    utterance's hypothesis: the final words assigned to it), plus the stream-level counts."""

    report: EvalReport
    streams: int = 0
    finals: int = 0
    splits: int = 0
    merges: int = 0
    empty_finals: int = 0
    stray_words: int = 0
    non_lexicon_words: list[str] = field(default_factory=list)
    hypotheses: dict[str, str] = field(default_factory=dict)  # utterance id -> its words in the stream

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "report"}
        out["report"] = self.report.to_json()
        return out

    def summary(self) -> str:
        n = max(1, self.report.utterances)
        return (f"continuous: {self.streams} streams, {self.report.utterances} utterances, {self.finals} finals; "
                f"splits {self.splits} + merges {self.merges} = {100 * (self.splits + self.merges) / n:.1f}% of utterances; "
                f"empty finals {self.empty_finals}; words outside the lexicon {len(self.non_lexicon_words)}; "
                f"stray words {self.stray_words}")


def join_speakers(utterances: list[Utterance], load: Callable[[Utterance], object], rate_hz: int, seed: int = 0,
                  pause_range_s: tuple[float, float] | None = None, noise_dbfs: float | None = None) -> list[JoinedStream]:
    """One ``JoinedStream`` per speaker (in first-seen order), utterances in corpus order."""
    from workers.data.continuous import PAUSE_NOISE_DBFS, PAUSE_RANGE_S

    by_speaker: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_speaker.setdefault(u.speaker, []).append(u)
    return [join_utterances(spk, [(u.id, u.text, load(u)) for u in us], rate_hz, seed,
                            pause_range_s or PAUSE_RANGE_S, PAUSE_NOISE_DBFS if noise_dbfs is None else noise_dbfs)
            for spk, us in by_speaker.items()]


def finals_of(results: Iterable[RecognitionResult]) -> list[Final]:
    return [Final(r.text, tuple(r.words)) for r in results if r.is_final]


def recognize_offline(rec: Recognizer, stream: JoinedStream) -> list[Final]:
    """The batch path on the whole recording: one 'final' per piece is not kept by the
    batch path, so its words come back as one final (splits and merges are not counted)."""
    transcript = rec.transcribe_wave(stream.wave, stream.speaker)
    return [Final(transcript.text, tuple(transcript.words))]


def blocks(stream: JoinedStream, push_ms: float = PUSH_MS) -> list[np.ndarray]:
    """The stream's samples (float32) in the pieces a client pushes, ``push_ms`` each."""
    step = max(1, int(stream.rate_hz * push_ms / 1000))
    wave = stream.wave.numpy().astype(np.float32)
    return [wave[start : start + step] for start in range(0, len(wave), step)]


def recognize_streaming(rec: StreamingRecognizer, stream: JoinedStream, push_ms: float = PUSH_MS) -> list[Final]:
    results = [r for block in blocks(stream, push_ms) for r in rec.push(block, stream.rate_hz)]
    return finals_of(results + rec.finish())


def recognize_actors(pipeline: object, stream: JoinedStream, push_ms: float = PUSH_MS) -> list[Final]:
    """Through a ``pipeline.streaming.StreamingPipeline`` (Ray actors)."""
    sid = pipeline.open_stream()
    results = [r for block in blocks(stream, push_ms) for r in pipeline.push(sid, block, stream.rate_hz)]
    return finals_of(results + pipeline.close(sid))


def recognize_server(url: str, stream: JoinedStream, push_ms: float = PUSH_MS) -> list[Final]:
    """Through a Vosk-protocol server (``asr serve``): its ``result`` replies are the finals (the
    client sends 16-bit PCM: ``pipeline.serve.client.pcm16``)."""
    from pipeline.serve.client import VoskClient, reply_result

    finals: list[Final] = []
    with VoskClient(url, sample_rate_hz=stream.rate_hz) as client:
        replies = [client.send_audio(block) for block in blocks(stream, push_ms)] + [client.eof()]
    for i, reply in enumerate(replies):
        result = reply_result(reply)
        if result is not None and (result.is_final or i == len(replies) - 1):
            finals.append(Final(result.text, tuple(result.words)))
    return finals


def lexicon_words(lexicon_path: str | Path | None) -> set[str] | None:
    if lexicon_path is None:
        return None
    return {line.split()[0] for line in Path(lexicon_path).read_text().splitlines() if line.strip()}


def score_streams(streams: list[JoinedStream], finals: list[list[Final]], lexicon: set[str] | None,
                  worst_n: int = 5) -> ContinuousReport:
    """Assign each stream's finals to its utterances and score them (``ContinuousReport``).
    The last final of a stream may be empty (the end of a stream with nothing left to say
    still gets its answer) and is not counted as an empty final."""
    ids, refs, hyps = [], [], []
    out = ContinuousReport(EvalReport(0, 0, 0, 0, 0, 0, 0, 0))
    for stream, stream_finals in zip(streams, finals, strict=True):
        counted = list(stream_finals)
        if counted and not counted[-1].text.strip():
            counted = counted[:-1]
        a = assign_finals(stream.utterances, counted)
        out.streams += 1
        out.finals += len(counted)
        out.splits += a.splits
        out.merges += a.merges
        out.empty_finals += a.empty_finals
        out.stray_words += a.stray_words
        if lexicon is not None:
            out.non_lexicon_words += [w.word for f in counted for w in f.words if w.word not in lexicon]
        for u, hyp in zip(stream.utterances, a.hypotheses):
            ids.append(u.id)
            refs.append(u.text)
            hyps.append(hyp)
            out.hypotheses[u.id] = hyp
    report = score(ids, refs, hyps, worst_n)
    out.report = report
    return out


def evaluate_continuous(utterances: list[Utterance], bundle_path: str | Path | None, decoder_config, mode: str,
                        chunk_ms: float | None, lookahead_ms: float, endpoint_ms: float, vad, quantize: str = "none",
                        seed: int = 0, worst_n: int = 5, config=None, model_arg: str | None = None,
                        noise_dbfs: float | None = None) -> ContinuousReport:
    """Join each speaker's utterances (``join_speakers``), recognise every stream in ``mode``,
    and score (``score_streams``)."""
    if mode not in CONTINUOUS_MODES:
        raise ValueError(f"continuous mode must be one of {CONTINUOUS_MODES}, got {mode!r}")
    rec = Recognizer(bundle_path, decoder_config, None if mode == "offline" else chunk_ms, lookahead_ms, vad=vad, quantize=quantize)
    rate = rec.bundle.features.sample_rate_hz
    streams = join_speakers(utterances, lambda u: rec.load(u.audio), rate, seed, noise_dbfs=noise_dbfs)
    t0 = time.perf_counter()
    if mode == "offline":
        finals = [recognize_offline(rec, s) for s in streams]
    elif mode == "streaming":
        srec = StreamingRecognizer(rec.bundle, decoder_config, chunk_ms, lookahead_ms, endpoint_silence_ms=endpoint_ms, vad=vad)
        finals = [recognize_streaming(srec, s) for s in streams]
    else:
        from pipeline.streaming import StreamingPipeline

        with StreamingPipeline(config, model_arg, decoder_config) as pipeline:
            finals = [recognize_actors(pipeline, s) for s in streams]
    out = score_streams(streams, finals, lexicon_words(rec.bundle.lexicon_path) if decoder_config.kind == "beam" else None, worst_n)
    out.report.audio_s = sum(s.duration_s for s in streams)
    out.report.compute_s = time.perf_counter() - t0
    latency = None if mode == "offline" else rec.bundle.model.latency_ms(rec.chunk_frames, rec.right_context_frames, rec.bundle.features.frame_ms)
    out.report.settings = {"mode": mode, "continuous": True, "decoder": decoder_config.kind, "chunk_ms": chunk_ms,
                           "lookahead_ms": lookahead_ms, "algorithmic_latency_ms": latency, "endpoint_ms": endpoint_ms, "vad": vad.enabled, "seed": seed,
                           "model": str(rec.bundle.path), "perturbations": [], "quantize": quantize,
                           "pause_noise_dbfs": PAUSE_NOISE_DBFS if noise_dbfs is None else noise_dbfs}
    return out


def run_continuous_eval(args, config) -> int:
    """``asr eval --continuous`` (and ``--mode actors``, which needs it)."""
    import dataclasses
    import json
    import sys

    sel = select(args, config)
    if isinstance(sel, int):
        return sel
    if not args.continuous or sel.perturbations:
        print("error: --mode actors needs --continuous, and --continuous takes no --perturb", file=sys.stderr)
        return 2
    streaming = dataclasses.replace(config.streaming, endpoint_silence_ms=sel.endpoint_ms)
    config = dataclasses.replace(config, streaming=streaming, vad=sel.vad)
    out = evaluate_continuous(sel.utterances, args.model, sel.decoder, args.mode, sel.chunk_ms, sel.lookahead_ms, sel.endpoint_ms,
                              sel.vad, config.inference.quantize, args.seed, args.worst, config, args.model, args.pause_noise_dbfs)
    print(format_report(out.report))
    print(out.summary())
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out.to_json(), indent=2) + "\n")
    return 0
