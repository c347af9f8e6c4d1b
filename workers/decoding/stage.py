"""The decoder stage, torch-free: CTC log-probs of many streams -> partial / final
``RecognitionResult``s, with endpointing, voice activity gating, word confidences,
n-best alternatives and phrase lists; and building its decoders from a bundle's files.

The in-process recogniser (``workers.recognizer``) and the Ray decoder actors use it; the
actors never load torch. ``workers.stages`` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from workers.audio.vad_gate import WINDOW_S, bool_flags, gate_words
from workers.decoding.decoder import (
    NUM_TOKENS,
    Alternative,
    CtcDecoder,
    DecoderConfig,
    Hypothesis,
    StreamState,
    WordTiming,
    alternative_confidences,
    check_emissions,
    normalize_phrases,
    word_confidences,
)
from workers.decoding.lm import write_lexicon
from workers.features.config import FeatureConfig
from workers.model.tokens import BLANK_ID, SEPARATOR_ID

#: Most alternatives a stream may ask for (``StreamOptions.max_alternatives``).
MAX_ALTERNATIVES = 10
#: Phrase-list decoders a ``DecoderStage`` keeps, least recently used dropped first.
PHRASE_DECODER_CACHE = 32


@dataclass(frozen=True)
class StreamOptions:
    """Per-stream decoding options.

    ``max_alternatives``: 0 (none) to ``MAX_ALTERNATIVES``; with n > 0 each final result
    also lists up to n distinct transcripts (``RecognitionResult.alternatives``).
    ``phrase_list``: restrict recognition to the words of these phrases (beam search over
    a lexicon of exactly those words, no LM); empty: the stage's own decoder. The phrases
    are checked and normalised here (``workers.decoding.decoder.normalize_phrases``: ValueError for
    words the model cannot spell; the Vosk token ``[unk]`` is ignored).
    """

    max_alternatives: int = 0
    phrase_list: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_alternatives, bool) or not isinstance(self.max_alternatives, int) or not (
            0 <= self.max_alternatives <= MAX_ALTERNATIVES
        ):
            raise ValueError(f"max_alternatives must be an integer from 0 to {MAX_ALTERNATIVES}, got {self.max_alternatives!r}")
        if isinstance(self.phrase_list, str):
            raise ValueError(f"phrase_list must be a list of phrases, got the string {self.phrase_list!r}")
        if self.phrase_list:
            object.__setattr__(self, "phrase_list", normalize_phrases(self.phrase_list))
        else:
            object.__setattr__(self, "phrase_list", ())


@dataclass
class RecognitionResult:
    """A partial (``is_final=False``) or final result of one stream; times in seconds from stream start.

    On finals from ``DecoderStage`` every word has its ``conf`` (``workers.decoding.decoder.word_confidences``);
    ``alternatives`` is filled on finals of streams whose ``StreamOptions.max_alternatives`` > 0."""

    stream_id: str
    text: str
    is_final: bool
    start_s: float
    end_s: float
    words: list[WordTiming] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)


class DecoderFiles(Protocol):
    """What a decoder is built from: a loaded ``workers.model.bundle.Bundle`` or a torch-free
    ``workers.model.bundle_config.BundleFiles``."""

    features: FeatureConfig
    lexicon_path: Path | None
    lm_path: Path | None

    @property
    def tokens_path(self) -> Path: ...


def build_decoder(bundle: DecoderFiles, config: DecoderConfig) -> CtcDecoder:
    """A decoder for this bundle: beam search uses the bundle's lexicon and LM when present, the
    lexicon with ``config.extra_words`` added (written to a temporary file flashlight reads once)."""
    frame_ms = bundle.features.frame_ms
    if not (config.extra_words and config.kind == "beam" and bundle.lexicon_path):
        return CtcDecoder(config, frame_ms, bundle.lexicon_path, bundle.lm_path, bundle.tokens_path)
    known = [line.split("\t", 1)[0] for line in Path(bundle.lexicon_path).read_text(encoding="utf-8").splitlines() if line]
    with tempfile.TemporaryDirectory(prefix="asr-words-") as tmp:
        lexicon = write_lexicon({*known, *config.extra_words}, Path(tmp) / "lexicon.txt")
        return CtcDecoder(config, frame_ms, lexicon, bundle.lm_path, bundle.tokens_path)


def phrase_decoder_factory(bundle: DecoderFiles, config: DecoderConfig) -> Callable[[Sequence[str]], CtcDecoder]:
    """``phrases -> phrase_decoder(bundle, config, phrases)``, for ``DecoderStage(phrase_decoder=)``.

    Keeps only the bundle's frame duration and reads no bundle file: the token list is the
    one ``load_bundle`` / ``load_bundle_files`` checked the bundle's ``tokens.txt`` against, so it keeps working once
    a temporary bundle directory is gone (as in the Ray decoder actors). The lexicon is
    written to a temporary directory that is removed once flashlight has loaded it."""
    frame_ms = bundle.features.frame_ms
    beam = dataclasses.replace(config, kind="beam")

    def build(phrases: Sequence[str]) -> CtcDecoder:
        words = {word for phrase in normalize_phrases(phrases) for word in phrase.split()}
        with tempfile.TemporaryDirectory(prefix="asr-phrases-") as tmp:
            return CtcDecoder(beam, frame_ms, write_lexicon(words, Path(tmp) / "lexicon.txt"))

    return build


class _Segment:
    """Decoder state of the current utterance of one stream, for endpointing, and the
    log-probs it was fed (for word confidences; freed with the segment at its final)."""

    def __init__(self, decoder: CtcDecoder, start_s: float, options: StreamOptions | None) -> None:
        self.decoder = decoder
        self.state: StreamState = decoder.begin()
        self.options = options
        self.start_s = start_s  # stream time of the segment's frame 0
        self.frames = 0
        self.last_speech_frame = -1  # within the segment
        self.latest = Hypothesis("", [], 0.0)
        self.log_probs: list[np.ndarray] = []

    def step(self, log_probs: np.ndarray) -> Hypothesis:
        if len(log_probs):
            self.log_probs.append(log_probs)
        self.frames += len(log_probs)
        return self.decoder.step(self.state, log_probs)

    def end(self) -> list[Hypothesis]:
        """The final hypotheses: the best, then up to ``max_alternatives`` - 1 more."""
        wanted = self.options.max_alternatives if self.options is not None else 0
        if wanted > 0:
            return self.decoder.end_nbest(self.state, wanted)
        return [self.decoder.end(self.state)]

    def emissions(self) -> np.ndarray:
        """(frames, num_tokens) float32: the log-probs of the segment so far."""
        return np.concatenate(self.log_probs) if self.log_probs else np.zeros((0, NUM_TOKENS), np.float32)


class DecoderStage:
    """Streaming CTC decoding with endpointing: after ``endpoint_silence_ms`` of frames whose
    best token is blank or the word separator, following speech, the utterance is finalised
    and a new one begins. ``endpoint_silence_ms=0`` disables endpointing.

    With ``vad_pad_ms`` set, words are kept only where the stream's voice activity flags
    (pushed alongside the log-probs) show speech within that distance of the word.

    Final results carry each word's confidence (``workers.decoding.decoder.word_confidences`` over the
    utterance's log-probs, which the stage keeps until the final: memory grows with the
    utterance, i.e. with the whole stream when endpointing is off); partials leave it None.

    Per-stream ``StreamOptions`` (``push(..., options=)``) ask for n-best alternatives on
    finals and/or restrict the vocabulary to a phrase list; the latter needs
    ``phrase_decoder``, which builds the decoder of a (normalised) phrase tuple; the stage
    keeps the last ``PHRASE_DECODER_CACHE`` of them."""

    def __init__(
        self,
        decoder: CtcDecoder,
        endpoint_silence_ms: float = 0.0,
        vad_pad_ms: float | None = None,
        phrase_decoder: Callable[[tuple[str, ...]], CtcDecoder] | None = None,
    ) -> None:
        self.decoder = decoder
        self.frame_ms = decoder.frame_ms
        self.endpoint_frames = int(round(endpoint_silence_ms / self.frame_ms)) if endpoint_silence_ms > 0 else 0
        self.vad_pad_ms = vad_pad_ms
        self.phrase_decoder = phrase_decoder
        self._phrase_decoders: OrderedDict[tuple[str, ...], CtcDecoder] = OrderedDict()
        self._segments: dict[str, _Segment] = {}
        self._options: dict[str, StreamOptions] = {}
        self._emitted_final: set[str] = set()
        self._speech: dict[str, np.ndarray] = {}  # (windows,) bool flags since window _speech_from[stream_id]
        self._speech_from: dict[str, int] = {}
        self._next_start_s: dict[str, float] = {}  # where a stream's next utterance starts when no event says

    def decoder_for(self, options: StreamOptions | None) -> CtcDecoder:
        """The decoder a stream with these options uses: the phrase list's (built once, then
        cached) or the stage's own."""
        if options is None or not options.phrase_list:
            return self.decoder
        key = options.phrase_list
        decoder = self._phrase_decoders.get(key)
        if decoder is not None:
            self._phrase_decoders.move_to_end(key)
            return decoder
        if self.phrase_decoder is None:
            raise ValueError("this decoder stage cannot restrict the vocabulary: it was built without a phrase_decoder")
        decoder = self.phrase_decoder(key)
        if decoder.frame_ms != self.frame_ms:
            raise ValueError(f"phrase decoder frame_ms {decoder.frame_ms} != the stage's {self.frame_ms}")
        self._phrase_decoders[key] = decoder
        while len(self._phrase_decoders) > PHRASE_DECODER_CACHE:
            self._phrase_decoders.popitem(last=False)
        return decoder

    def _new_segment(self, stream_id: str, start_s: float, options: StreamOptions | None) -> _Segment:
        seg = self._segments[stream_id] = _Segment(self.decoder_for(options), start_s, options)
        return seg

    def _words(self, seg: _Segment, hyp: Hypothesis, emissions: np.ndarray | None) -> list[WordTiming]:
        """The hypothesis' words shifted to stream time; with emissions, with their confidences."""
        offset_s = seg.start_s
        confs: list[float | None] = [None] * len(hyp.words)
        if emissions is not None and hyp.words:
            confs = list(word_confidences(emissions, hyp.words, self.frame_ms))  # segment-relative times
        return [WordTiming(w.word, w.start_s + offset_s, w.end_s + offset_s, c) for w, c in zip(hyp.words, confs, strict=True)]

    def _gate(self, stream_id: str, text: str, words: list[WordTiming], until_s: float | None = None) -> tuple[str, list[WordTiming]]:
        """Words kept where the stream's flags show speech; ``until_s``: only flags of windows that
        end by then count (an utterance's final does not look past its end)."""
        if self.vad_pad_ms is None:
            return text, words
        flags = self._speech.get(stream_id, np.zeros(0, dtype=bool))
        first = self._speech_from.get(stream_id, 0)
        if until_s is not None:
            flags = flags[: max(0, int(round(until_s / WINDOW_S)) - first)]
        return gate_words(text, words, flags, self.vad_pad_ms, first * WINDOW_S)

    def _result(self, stream_id: str, seg: _Segment, hyp: Hypothesis, emissions: np.ndarray | None = None,
                end_s: float | None = None) -> RecognitionResult:
        """A final result when given the segment's emissions (for the word confidences), else a partial;
        ``end_s``: where the segment ended (default: after its last frame)."""
        text, words = self._gate(stream_id, hyp.text, self._words(seg, hyp, emissions), end_s)
        end_s = seg.start_s + seg.frames * self.frame_ms / 1000 if end_s is None else end_s
        return RecognitionResult(stream_id, text, emissions is not None, seg.start_s, end_s, words)

    def _final(self, stream_id: str, seg: _Segment, hyps: list[Hypothesis], end_s: float | None = None) -> RecognitionResult:
        """The final result of a segment from its decoder's final hypotheses (best first).

        With alternatives asked for, each hypothesis becomes an ``Alternative`` (its words
        gated like the result's); hypotheses whose texts gating made equal are merged, their
        confidences added, and the list re-sorted: the result's text and words are the first
        alternative's (the best hypothesis's unless such a merge outranked it)."""
        emissions = seg.emissions()
        result = self._result(stream_id, seg, hyps[0], emissions, end_s)
        if seg.options is None or seg.options.max_alternatives == 0:
            return result
        merged: dict[str, Alternative] = {}
        for hyp, confidence in zip(hyps, alternative_confidences([h.score for h in hyps]), strict=True):
            text, words = self._gate(stream_id, hyp.text, self._words(seg, hyp, emissions), end_s)
            if text in merged:
                merged[text].confidence += confidence
            else:
                merged[text] = Alternative(text, words, confidence)
        result.alternatives = sorted(merged.values(), key=lambda a: -a.confidence)
        result.text, result.words = result.alternatives[0].text, result.alternatives[0].words
        return result

    def drop(self, stream_id: str) -> None:
        self._segments.pop(stream_id, None)
        self._options.pop(stream_id, None)
        self._emitted_final.discard(stream_id)
        self._speech.pop(stream_id, None)
        self._speech_from.pop(stream_id, None)
        self._next_start_s.pop(stream_id, None)

    def _forget_speech_before(self, stream_id: str, start_s: float) -> None:
        """Drop the flags no word from ``start_s`` on can need (memory stays bounded on long streams)."""
        if self.vad_pad_ms is None or stream_id not in self._speech:
            return
        first = self._speech_from.get(stream_id, 0)
        drop = max(0, int((start_s - self.vad_pad_ms / 1000) / WINDOW_S) - first)
        if drop:
            self._speech[stream_id] = self._speech[stream_id][drop:]
            self._speech_from[stream_id] = first + drop

    @property
    def stream_count(self) -> int:
        return len(self._segments)

    def stream_ids(self) -> set[str]:
        """The streams this stage holds state for (search, endpointing, voice activity flags)."""
        return (set(self._segments) | self._emitted_final | set(self._speech) | set(self._speech_from) | set(self._options)
                | set(self._next_start_s))

    def push(
        self,
        stream_id: str,
        log_probs: Any,
        is_last: bool = False,
        speech: Any = None,
        options: StreamOptions | None = None,
        events: Sequence[tuple[int, str, float]] = (),
    ) -> list[RecognitionResult]:
        """Feed (frames, num_tokens) log-probs and the voice activity flags (windows,) bool that came
        with them (numpy arrays or torch CPU tensors); returns finals (utterance ends, endpoints,
        end of stream) and the latest partial.

        ``events``: the utterances' edges in these log-probs (``AcousticStage.process_events``):
        (index, "start", time_s) opens an utterance whose frame 0 is log_probs[index] at stream
        time time_s; (index, "end", time_s) ends the open one after log_probs[index - 1] with
        its final. Frames that come with no utterance open start one where the last ended.
        An utterance whose final has no words gives no final; the end of a stream that gave
        no final at all gives one, empty (a caller always gets an answer).

        ``options`` (None: keep the stream's, or none) are stored for the stream and taken
        when its decoding state is created: at each utterance's start; so options that change
        mid-utterance apply from the next utterance. ``drop`` and the end of the stream forget them."""
        if options is not None and not isinstance(options, StreamOptions):
            raise TypeError(f"options must be a StreamOptions or None, got {type(options).__name__}")
        if options is not None:
            self.decoder_for(options)  # a phrase list this stage cannot serve fails here, before it is kept
            self._options[stream_id] = options
        log_probs = check_emissions(log_probs)
        speech = bool_flags(speech) if speech is not None else None
        if speech is not None and speech.size:
            self._speech[stream_id] = np.concatenate([self._speech.get(stream_id, np.zeros(0, dtype=bool)), speech])
        results: list[RecognitionResult] = []
        position = 0
        for index, kind, time_s in events:
            results += self._feed(stream_id, log_probs[position:index])
            position = index
            if kind == "start":
                self._close(stream_id, results)  # (none open: an utterance's end comes before the next start)
                self._new_segment(stream_id, time_s, self._options.get(stream_id))
            elif kind == "end":
                self._close(stream_id, results, time_s)
            else:
                raise ValueError(f"unknown utterance event {kind!r}")
        results += self._feed(stream_id, log_probs[position:])
        if is_last:
            self._close(stream_id, results)
            if stream_id not in self._emitted_final:
                seg = self._segments.get(stream_id) or self._new_segment(stream_id, self._next_start_s.get(stream_id, 0.0), None)
                results.append(self._final(stream_id, seg, seg.end()))
            self.drop(stream_id)
        else:
            seg = self._segments.get(stream_id)
            if seg is not None and len(log_probs) and seg.frames:
                results.append(self._result(stream_id, seg, seg.latest))
        return results

    def _feed(self, stream_id: str, log_probs: np.ndarray) -> list[RecognitionResult]:
        """Step the open utterance (one opens where the last ended when none is) through these
        frames, with the decoder's own endpointing when it has one; -> the finals it gave."""
        if not len(log_probs):
            return []
        seg = self._segments.get(stream_id) or self._new_segment(stream_id, self._next_start_s.get(stream_id, 0.0), self._options.get(stream_id))
        results: list[RecognitionResult] = []
        start = 0
        if self.endpoint_frames:
            best = log_probs.argmax(axis=1).tolist()
            for t, token in enumerate(best):
                if token not in (BLANK_ID, SEPARATOR_ID):
                    seg.last_speech_frame = seg.frames + (t - start)
                elif seg.last_speech_frame >= 0 and seg.frames + (t - start) - seg.last_speech_frame >= self.endpoint_frames:
                    seg.step(log_probs[start : t + 1])
                    self._close(stream_id, results)
                    seg = self._new_segment(stream_id, self._next_start_s[stream_id], self._options.get(stream_id))
                    start = t + 1
        rest = log_probs[start:]
        if len(rest):
            seg.latest = seg.step(rest)
        return results

    def _close(self, stream_id: str, results: list[RecognitionResult], end_s: float | None = None) -> None:
        """End the stream's open utterance (if any) at ``end_s`` (default: after its last frame);
        its final goes to ``results`` unless it has no words."""
        seg = self._segments.pop(stream_id, None)
        if seg is None:
            return
        final = self._final(stream_id, seg, seg.end(), end_s)
        self._next_start_s[stream_id] = final.end_s
        self._forget_speech_before(stream_id, final.end_s)
        if final.text:
            results.append(final)
            self._emitted_final.add(stream_id)
