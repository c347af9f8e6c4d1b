"""The four stages as plain classes that keep per-stream state keyed by stream id.

The in-process ``StreamingRecognizer`` chains them directly; the Ray pipeline wraps each
one in an actor shared by many streams. Same classes, same numbers.

    IngestStage    audio of any size/rate  -> fixed-size model-rate chunks (samples,)
    FeatureStage   model-rate chunk        -> normalised stacked MFCC (frames, feature_dim)
    AcousticStage  features of many streams -> CTC log-probs (frames, num_tokens), batched
    DecoderStage   log-probs               -> partial / final ``RecognitionResult``
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.audio import StreamingIngest
from workers.decoder import (
    NUM_TOKENS,
    Alternative,
    CtcDecoder,
    Hypothesis,
    StreamState,
    WordTiming,
    alternative_confidences,
    normalize_phrases,
    word_confidences,
)
from workers.features import FeatureState, MfccExtractor, StreamingFeatures
from workers.model import BiLSTMCTC
from workers.tokens import BLANK_ID, SEPARATOR_ID
from workers.vad import WINDOW_S, SpeechDetector, VadState, gate_words

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
    are checked and normalised here (``workers.decoder.normalize_phrases``: ValueError for
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

    On finals from ``DecoderStage`` every word has its ``conf`` (``workers.decoder.word_confidences``);
    ``alternatives`` is filled on finals of streams whose ``StreamOptions.max_alternatives`` > 0."""

    stream_id: str
    text: str
    is_final: bool
    start_s: float
    end_s: float
    words: list[WordTiming] = field(default_factory=list)
    alternatives: list[Alternative] = field(default_factory=list)


class IngestStage:
    def __init__(self, target_rate_hz: int, chunk_samples: int) -> None:
        self.target_rate_hz = target_rate_hz
        self.chunk_samples = chunk_samples
        self._streams: dict[str, StreamingIngest] = {}

    def push(self, stream_id: str, samples: np.ndarray | torch.Tensor, rate_hz: int) -> list[torch.Tensor]:
        ingest = self._streams.setdefault(stream_id, StreamingIngest(self.target_rate_hz, self.chunk_samples))
        return ingest.push(samples, rate_hz, source=f"stream {stream_id}")

    def finish(self, stream_id: str) -> torch.Tensor:
        ingest = self._streams.pop(stream_id, None)
        return ingest.flush() if ingest else torch.zeros(0)

    def stream_ids(self) -> set[str]:
        """The streams this stage holds state for."""
        return set(self._streams)


class FeatureStage:
    """MFCC of each stream and, with a ``SpeechDetector``, its voice activity per 32 ms window."""

    def __init__(self, extractor: MfccExtractor, vad: SpeechDetector | None = None) -> None:
        self.streaming = StreamingFeatures(extractor)
        self.vad = vad
        self._states: dict[str, FeatureState] = {}
        self._vad_states: dict[str, VadState] = {}

    def push(self, stream_id: str, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples,) -> features (frames, feature_dim) and speech flags (windows,) bool (empty without a VAD)."""
        state = self._states.get(stream_id) or self.streaming.initial_state()
        feats, self._states[stream_id] = self.streaming.online_inference(wave, state)
        speech = torch.zeros(0, dtype=torch.bool)
        if self.vad is not None:
            vad_state = self._vad_states.get(stream_id) or self.vad.initial_state()
            probs, self._vad_states[stream_id] = self.vad.online(wave, vad_state)
            speech = probs > self.vad.config.threshold
        return feats, speech

    def finish(self, stream_id: str, wave: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.push(stream_id, wave if wave is not None else torch.zeros(0))
        self.drop(stream_id)
        return out

    def drop(self, stream_id: str) -> None:
        self._states.pop(stream_id, None)
        self._vad_states.pop(stream_id, None)

    @property
    def stream_count(self) -> int:
        return len(self._states)

    def stream_ids(self) -> set[str]:
        """The streams this stage holds state for (MFCC or voice activity)."""
        return set(self._states) | set(self._vad_states)


@dataclass
class _AcousticStream:
    h: torch.Tensor  # (num_layers, 1, hidden)
    c: torch.Tensor
    pending: torch.Tensor  # (frames, feature_dim) not yet run through the model


class AcousticStage:
    """Runs latency-controlled chunks of many streams in one forward pass per round."""

    def __init__(self, model: BiLSTMCTC, chunk_frames: int, right_context_frames: int, device: torch.device | str = "cpu") -> None:
        if chunk_frames < 1 or right_context_frames < 0:
            raise ValueError(f"chunk_frames must be >= 1 and right_context_frames >= 0, got {chunk_frames}, {right_context_frames}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.chunk_frames = chunk_frames
        self.right_context_frames = right_context_frames if model.config.bidirectional else 0
        self._streams: dict[str, _AcousticStream] = {}

    def stream_ids(self) -> set[str]:
        """The streams this stage holds state for (LSTM state, frames awaiting a chunk)."""
        return set(self._streams)

    def _stream(self, stream_id: str) -> _AcousticStream:
        if stream_id not in self._streams:
            h, c = self.model.initial_state(1, self.device)
            self._streams[stream_id] = _AcousticStream(h, c, torch.zeros(0, self.model.config.input_dim))
        return self._streams[stream_id]

    def process(self, items: list[tuple[str, torch.Tensor, bool]]) -> list[torch.Tensor]:
        """items: (stream_id, new features (frames, dim), is_last). Returns log-probs per item.

        Every chunk whose lookahead has arrived is run (all streams batched together);
        on the last call of a stream the remaining frames are run with whatever lookahead
        exists, and the stream's state is dropped.
        """
        window = self.chunk_frames + self.right_context_frames
        streams = []
        for stream_id, feats, _ in items:
            s = self._stream(stream_id)
            s.pending = torch.cat([s.pending, feats.to(s.pending.dtype)])
            streams.append(s)
        outputs: list[list[torch.Tensor]] = [[] for _ in items]
        while True:
            ready = [i for i, (s, (_, _, last)) in enumerate(zip(streams, items)) if len(s.pending) >= window or (last and len(s.pending))]
            if not ready:
                break
            windows = [streams[i].pending[:window] for i in ready]
            lengths = torch.tensor([len(w) for w in windows])
            x = torch.nn.utils.rnn.pad_sequence(windows, batch_first=True).to(self.device)
            h = torch.cat([streams[i].h for i in ready], dim=1)
            c = torch.cat([streams[i].c for i in ready], dim=1)
            with torch.no_grad():
                log_probs, (h, c) = self.model.forward_window(x, lengths, self.chunk_frames, (h, c))
            log_probs = log_probs.cpu()
            for j, i in enumerate(ready):
                s = streams[i]
                n = min(self.chunk_frames, len(s.pending))
                outputs[i].append(log_probs[j, :n])
                s.h, s.c = h[:, j : j + 1], c[:, j : j + 1]
                s.pending = s.pending[n:]
        for stream_id, _, last in items:
            if last:
                self._streams.pop(stream_id, None)
        num_tokens = self.model.config.num_tokens
        return [torch.cat(o) if o else torch.zeros(0, num_tokens) for o in outputs]

    def offline(self, features: list[torch.Tensor], chunk_frames: int | None = None, right_context_frames: int = 0) -> list[torch.Tensor]:
        """Whole utterances (each (frames, dim)) in one padded batch -> log-probs per utterance."""
        lengths = torch.tensor([len(f) for f in features])
        x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True).to(self.device)
        with torch.no_grad():
            log_probs = self.model(x, lengths, chunk_frames, right_context_frames).cpu()
        return [log_probs[i, : lengths[i]] for i in range(len(features))]


class _Segment:
    """Decoder state of the current utterance of one stream, for endpointing, and the
    log-probs it was fed (for word confidences; freed with the segment at its final)."""

    def __init__(self, decoder: CtcDecoder, start_frame: int, options: StreamOptions | None) -> None:
        self.decoder = decoder
        self.state: StreamState = decoder.begin()
        self.options = options
        self.start_frame = start_frame
        self.frames = 0
        self.last_speech_frame = -1  # within the segment
        self.latest = Hypothesis("", [], 0.0)
        self.log_probs: list[torch.Tensor] = []

    def step(self, log_probs: torch.Tensor) -> Hypothesis:
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

    def emissions(self) -> torch.Tensor:
        return torch.cat(self.log_probs) if self.log_probs else torch.zeros(0, NUM_TOKENS)


class DecoderStage:
    """Streaming CTC decoding with endpointing: after ``endpoint_silence_ms`` of frames whose
    best token is blank or the word separator, following speech, the utterance is finalised
    and a new one begins. ``endpoint_silence_ms=0`` disables endpointing.

    With ``vad_pad_ms`` set, words are kept only where the stream's voice activity flags
    (pushed alongside the log-probs) show speech within that distance of the word.

    Final results carry each word's confidence (``workers.decoder.word_confidences`` over the
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
        self._speech: dict[str, torch.Tensor] = {}  # flags since window _speech_from[stream_id]
        self._speech_from: dict[str, int] = {}

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

    def _new_segment(self, stream_id: str, start_frame: int, options: StreamOptions | None) -> _Segment:
        seg = self._segments[stream_id] = _Segment(self.decoder_for(options), start_frame, options)
        return seg

    def _words(self, seg: _Segment, hyp: Hypothesis, emissions: torch.Tensor | None) -> list[WordTiming]:
        """The hypothesis' words shifted to stream time; with emissions, with their confidences."""
        offset_s = seg.start_frame * self.frame_ms / 1000
        confs: list[float | None] = [None] * len(hyp.words)
        if emissions is not None and hyp.words:
            confs = list(word_confidences(emissions, hyp.words, self.frame_ms))  # segment-relative times
        return [WordTiming(w.word, w.start_s + offset_s, w.end_s + offset_s, c) for w, c in zip(hyp.words, confs, strict=True)]

    def _gate(self, stream_id: str, text: str, words: list[WordTiming]) -> tuple[str, list[WordTiming]]:
        if self.vad_pad_ms is None:
            return text, words
        flags = self._speech.get(stream_id, torch.zeros(0, dtype=torch.bool))
        return gate_words(text, words, flags, self.vad_pad_ms, self._speech_from.get(stream_id, 0) * WINDOW_S)

    def _result(self, stream_id: str, seg: _Segment, hyp: Hypothesis, emissions: torch.Tensor | None = None) -> RecognitionResult:
        """A final result when given the segment's emissions (for the word confidences), else a partial."""
        offset_s = seg.start_frame * self.frame_ms / 1000
        text, words = self._gate(stream_id, hyp.text, self._words(seg, hyp, emissions))
        end_s = (seg.start_frame + seg.frames) * self.frame_ms / 1000
        return RecognitionResult(stream_id, text, emissions is not None, offset_s, end_s, words)

    def _final(self, stream_id: str, seg: _Segment, hyps: list[Hypothesis]) -> RecognitionResult:
        """The final result of a segment from its decoder's final hypotheses (best first).

        With alternatives asked for, each hypothesis becomes an ``Alternative`` (its words
        gated like the result's); hypotheses whose texts gating made equal are merged, their
        confidences added, and the list re-sorted: the result's text and words are the first
        alternative's (the best hypothesis's unless such a merge outranked it)."""
        emissions = seg.emissions()
        result = self._result(stream_id, seg, hyps[0], emissions)
        if seg.options is None or seg.options.max_alternatives == 0:
            return result
        merged: dict[str, Alternative] = {}
        for hyp, confidence in zip(hyps, alternative_confidences([h.score for h in hyps]), strict=True):
            text, words = self._gate(stream_id, hyp.text, self._words(seg, hyp, emissions))
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
        return set(self._segments) | self._emitted_final | set(self._speech) | set(self._speech_from) | set(self._options)

    def push(
        self,
        stream_id: str,
        log_probs: torch.Tensor,
        is_last: bool = False,
        speech: torch.Tensor | None = None,
        options: StreamOptions | None = None,
    ) -> list[RecognitionResult]:
        """Feed (frames, num_tokens) log-probs and the voice activity flags (windows,) that came with
        them; returns finals (endpoints, end of stream) and the latest partial.

        ``options`` (None: keep the stream's, or none) are stored for the stream and taken
        when its decoding state is created: at its first push and after each endpoint; so
        options that change mid-utterance apply from the next utterance. ``drop`` and the
        end of the stream forget them."""
        if options is not None and not isinstance(options, StreamOptions):
            raise TypeError(f"options must be a StreamOptions or None, got {type(options).__name__}")
        options = options if options is not None else self._options.get(stream_id)
        seg = self._segments.get(stream_id) or self._new_segment(stream_id, 0, options)
        if options is not None:
            self._options[stream_id] = options
        if speech is not None and speech.numel():
            self._speech[stream_id] = torch.cat([self._speech.get(stream_id, torch.zeros(0, dtype=torch.bool)), speech.bool()])
        results: list[RecognitionResult] = []
        start = 0
        if self.endpoint_frames:
            best = log_probs.argmax(-1).tolist()
            for t, token in enumerate(best):
                if token not in (BLANK_ID, SEPARATOR_ID):
                    seg.last_speech_frame = seg.frames + (t - start)
                elif seg.last_speech_frame >= 0 and seg.frames + (t - start) - seg.last_speech_frame >= self.endpoint_frames:
                    seg.step(log_probs[start : t + 1])
                    results.append(self._final(stream_id, seg, seg.end()))
                    self._emitted_final.add(stream_id)
                    seg = self._new_segment(stream_id, seg.start_frame + seg.frames, self._options.get(stream_id))
                    self._forget_speech_before(stream_id, seg.start_frame * self.frame_ms / 1000)
                    start = t + 1
        rest = log_probs[start:]
        if len(rest) or is_last:
            seg.latest = seg.step(rest)
        if is_last:
            hyps = seg.end()
            if hyps[0].text or seg.last_speech_frame >= 0 or stream_id not in self._emitted_final:
                results.append(self._final(stream_id, seg, hyps))
            self.drop(stream_id)
        elif len(rest):
            results.append(self._result(stream_id, seg, seg.latest))
        return results
