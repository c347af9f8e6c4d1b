"""The four stages as plain classes that keep per-stream state keyed by stream id.

The in-process ``StreamingRecognizer`` chains them directly; the Ray pipeline wraps each
one in an actor shared by many streams. Same classes, same numbers.

    IngestStage    audio of any size/rate  -> fixed-size model-rate chunks (samples,)   workers.audio.ingest
    FeatureStage   model-rate chunk        -> normalised stacked MFCC (frames, feature_dim)
    AcousticStage  features of many streams -> CTC log-probs (frames, num_tokens), batched
    DecoderStage   log-probs               -> partial / final ``RecognitionResult``      workers.decoding.stage

The ingest and decoder stages live in torch-free modules (numpy in, numpy out), re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import torch

from workers.audio.endpoint import EndpointState, endpointer
from workers.audio.ingest import IngestStage
from workers.audio.vad import WINDOW_SAMPLES, SpeechDetector, VadState
from workers.decoding.stage import MAX_ALTERNATIVES, PHRASE_DECODER_CACHE, DecoderStage, RecognitionResult, StreamOptions
from workers.features.mfcc import FeatureState, MfccExtractor, StreamingFeatures
from workers.model.bilstm import BiLSTMCTC

__all__ = [  # the ingest and decoder stages are torch-free modules' (the Ray actors of those stages never load torch)
    "MAX_ALTERNATIVES", "PHRASE_DECODER_CACHE", "AcousticStage", "DecoderStage", "FeatureStage", "IngestStage", "RecognitionResult",
    "StreamOptions",
]


@dataclass
class FeaturePush:
    """What ``FeatureStage`` gives for one push of a stream.

    ``features``: (frames, feature_dim) of the stream's utterances (idle audio between them
    gives none); ``speech``: (windows,) bool voice activity of every 32 ms window the push
    completed (stream time, without gaps; empty without a detector); ``events``: the
    utterances' edges, ``(frame, kind, time_s)`` in order: "start" before ``features[frame]``
    (the utterance's first sample is at stream time ``time_s``), "end" after
    ``features[frame - 1]`` (the cut, at ``time_s``)."""

    features: torch.Tensor
    speech: torch.Tensor
    events: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class _Piece:
    """Samples of one utterance for one extractor call: from a fresh state (``start_s`` set) or
    the stream's carried one; ``end_s`` set: the utterance ends after them (partial frames dropped)."""

    samples: torch.Tensor
    start_s: float | None = None
    end_s: float | None = None


@dataclass
class _FeatureStream:
    """One stream's state in ``FeatureStage``; sample and window positions count from its start."""

    endpoint: EndpointState = field(default_factory=EndpointState)
    vad: VadState | None = None
    mfcc: FeatureState | None = None  # the open utterance's extractor state (None: none open)
    received: int = 0  # samples received
    windows: int = 0  # voice activity windows completed
    base: int = 0  # the sample where the detector last (re)started: 0 or the last cut
    buffer: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # samples [buffer_from, received) not extracted
    buffer_from: int = 0
    held_flags: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # windows [flags_from, windows)
    flags_from: int = 0  # the first window whose flags have not been given out


class FeatureStage:
    """MFCC of each stream's utterances and, with a ``SpeechDetector``, its voice activity per
    32 ms window and its utterances' edges (``workers.audio.endpoint``): each utterance's features
    start from a fresh running mean, as a file's would, and idle audio between utterances is
    not extracted. Without a detector, or with ``endpoint_ms=0``, the stream is one utterance."""

    def __init__(self, extractor: MfccExtractor, vad: SpeechDetector | None = None, endpoint_ms: float = 0.0) -> None:
        self.streaming = StreamingFeatures(extractor)
        self.vad = vad
        self.rate_hz = extractor.config.sample_rate_hz
        self.endpointer = endpointer(vad.config, endpoint_ms) if vad is not None and endpoint_ms > 0 else None
        self._streams: dict[str, _FeatureStream] = {}

    def push(self, stream_id: str, wave: torch.Tensor) -> FeaturePush:
        """(samples,) at the model rate -> ``FeaturePush``."""
        return self.push_many([(stream_id, wave)])[0]

    def finish(self, stream_id: str, wave: torch.Tensor | None = None) -> FeaturePush:
        """The last push of a stream: its open utterance ends with it; its state is dropped."""
        return self.push_many([(stream_id, wave if wave is not None else torch.zeros(0))], [True])[0]

    def push_many(self, pushes: list[tuple[str, torch.Tensor]], last: list[bool] | None = None) -> list[FeaturePush]:
        """``push`` for several streams (distinct ids) at once: the voice activity of all of them
        in one batch per window position (``SpeechDetector.online_many``) and their MFCC in
        batches (``StreamingFeatures.online_many``), each stream getting exactly what it gets
        alone. ``last[i]``: push i ends its stream (its state is dropped). Nothing is applied
        when a push fails."""
        if len({sid for sid, _ in pushes}) != len(pushes):
            raise ValueError("push_many takes one push per stream")
        last = last or [False] * len(pushes)
        streams = []
        for sid, _ in pushes:
            old = self._streams.get(sid)
            streams.append(dataclasses.replace(old, endpoint=dataclasses.replace(old.endpoint)) if old else self._new_stream())
        waves = [wave.float().reshape(-1) for _, wave in pushes]
        if self.vad is not None:
            first_pass = self.vad.online_many(waves, [s.vad for s in streams])
        else:
            first_pass = [(None, None)] * len(pushes)
        plans = [self._plan(s, w, probs, vad_state, end) for s, w, (probs, vad_state), end in zip(streams, waves, first_pass, last)]
        outputs = self._extract(streams, [pieces for pieces, _ in plans])
        for (sid, _), s, end in zip(pushes, streams, last):  # all computed: now the streams move on
            if end:
                self._streams.pop(sid, None)
            else:
                self._streams[sid] = s
        return [FeaturePush(feats, flags, events) for (_, flags), (feats, events) in zip(plans, outputs)]

    def _new_stream(self) -> _FeatureStream:
        return _FeatureStream(vad=self.vad.initial_state() if self.vad is not None else None)

    def _flags(self, probs: torch.Tensor | None) -> torch.Tensor:
        return probs > self.vad.config.threshold if probs is not None else torch.zeros(0, dtype=torch.bool)

    def _plan(self, s: _FeatureStream, wave: torch.Tensor, probs: torch.Tensor | None, vad_state: VadState | None,
              last: bool) -> tuple[list[_Piece], torch.Tensor]:
        """Walk one stream's push (``s`` is updated, all but its extractor state): the pieces of
        audio to extract, in order, and the push's voice activity flags."""
        s.buffer = torch.cat([s.buffer, wave])
        s.received += wave.numel()
        if self.endpointer is None:  # one utterance: the whole stream
            s.vad = vad_state
            piece = _Piece(s.buffer, start_s=None if s.endpoint.in_utterance else 0.0, end_s=s.received / self.rate_hz if last else None)
            s.endpoint.in_utterance, s.buffer, s.buffer_from = True, torch.zeros(0), s.received
            return [piece], self._flags(probs)
        pieces: list[_Piece] = []
        emitted = []  # flags given out in this push
        held = s.held_flags  # flags of windows [flags_from, windows) not given out yet (held-back audio)
        opened_s: float | None = None  # start of an utterance opened in this push, until its first piece
        while True:
            flags = self._flags(probs)
            event, walked = None, 0
            while (event := self.endpointer.scan(flags.numpy(), s.endpoint, walked)) is not None and event.kind == "start":
                first = max(s.base, (s.windows + event.window + event.onset - self.endpointer.preroll_windows) * WINDOW_SAMPLES)
                s.buffer, s.buffer_from = s.buffer[first - s.buffer_from :], first
                opened_s, walked = first / self.rate_hz, event.window + 1
            if event is None:
                held = torch.cat([held, flags])
                s.vad, s.windows = vad_state, s.windows + len(flags)
                break
            end = s.windows + self.endpointer.end_window(event)  # the window the utterance ends before
            cut = end * WINDOW_SAMPLES
            emitted.append(torch.cat([held, flags])[: end - s.flags_from])
            held, s.flags_from = torch.zeros(0, dtype=torch.bool), end
            pieces.append(_Piece(s.buffer[: cut - s.buffer_from], start_s=opened_s, end_s=cut / self.rate_hz))
            opened_s = None
            s.buffer, s.buffer_from = s.buffer[cut - s.buffer_from :], cut
            s.base, s.windows = cut, end
            s.vad = self.vad.initial_state()  # the detector restarts at the end: what follows depends on what follows
            probs, vad_state = self.vad.online(s.buffer, s.vad)
        onset = self.endpointer.pending_onset(s.endpoint) if last else None
        if onset is not None:  # the end of the stream opens what speech was pending
            first = max(s.base, (s.windows + onset - self.endpointer.preroll_windows) * WINDOW_SAMPLES)
            s.buffer, s.buffer_from = s.buffer[first - s.buffer_from :], first
            opened_s, s.endpoint.in_utterance = first / self.rate_hz, True
        if s.endpoint.in_utterance:  # the utterance takes its audio up to its last speech + the trail; the rest waits
            release = s.received if last else min(s.received, (s.windows - s.endpoint.silent_windows + self.endpointer.trail_windows) * WINDOW_SAMPLES)
            release = max(release, s.buffer_from)
            pieces.append(_Piece(s.buffer[: release - s.buffer_from], start_s=opened_s, end_s=s.received / self.rate_hz if last else None))
            s.buffer, s.buffer_from = s.buffer[release - s.buffer_from :], release
            give = s.windows if last else max(s.flags_from, min(s.windows, release // WINDOW_SAMPLES))
        else:  # idle: keep what a start in the next push may reach back to
            keep = max(s.base, (s.windows - self.endpointer.preroll_windows - 2 * self.endpointer.start_windows) * WINDOW_SAMPLES)
            s.buffer, s.buffer_from = s.buffer[keep - s.buffer_from :], keep
            give = s.windows
        emitted.append(held[: give - s.flags_from])
        s.held_flags, s.flags_from = held[give - s.flags_from :], give
        return pieces, torch.cat(emitted)

    def _extract(self, streams: list[_FeatureStream], pieces: list[list[_Piece]]) -> list[tuple[torch.Tensor, list[tuple[int, str, float]]]]:
        """MFCC of every stream's pieces: round k takes the k-th piece of each stream, all in one
        ``online_many`` batch; a piece with ``start_s`` starts from a fresh state, one with
        ``end_s`` drops the partial frames left after it. -> (features, events) per stream."""
        feats: list[list[torch.Tensor]] = [[] for _ in streams]
        events: list[list[tuple[int, str, float]]] = [[] for _ in streams]
        frames = [0] * len(streams)
        for k in range(max((len(p) for p in pieces), default=0)):
            rows = [i for i, p in enumerate(pieces) if k < len(p)]
            states = [self.streaming.initial_state() if pieces[i][k].start_s is not None else streams[i].mfcc for i in rows]
            out = self.streaming.online_many([pieces[i][k].samples for i in rows], states)
            for i, (f, state) in zip(rows, out):
                piece = pieces[i][k]
                if piece.start_s is not None:
                    events[i].append((frames[i], "start", piece.start_s))
                feats[i].append(f)
                frames[i] += f.shape[0]
                streams[i].mfcc = state if piece.end_s is None else None
                if piece.end_s is not None:
                    events[i].append((frames[i], "end", piece.end_s))
        dim = self.streaming.config.feature_dim
        return [(torch.cat(f) if f else torch.zeros(0, dim), e) for f, e in zip(feats, events)]

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def stream_ids(self) -> set[str]:
        """The streams this stage holds state for (MFCC, voice activity, endpointing)."""
        return set(self._streams)

    def drop(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)


@dataclass
class _AcousticStream:
    h: torch.Tensor  # (num_layers, 1, hidden)
    c: torch.Tensor
    pending: torch.Tensor  # (frames, feature_dim) not yet run through the model
    frames_in: int = 0  # features received, from the stream's start
    frames_out: int = 0  # log-probs given out
    events: deque = field(default_factory=deque)  # (feature index from the stream's start, kind, time_s), not yet given out


#: One item of ``AcousticStage.process``: (stream_id, features (frames, dim), is_last, events);
#: events as ``FeaturePush.events`` (indices into these features); may be left out (none).
AcousticItem = tuple


class AcousticStage:
    """Runs latency-controlled chunks of many streams in one forward pass per round.

    Utterance edges (``FeaturePush.events``) pass through: at an utterance's end its last
    frames run with whatever lookahead the utterance has (as at the end of a file) and the
    stream's BiLSTM state starts again from zeros, so each utterance is recognised as a file
    would be."""

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

    def _limit(self, s: _AcousticStream) -> int | None:
        """Frames left before the stream's next utterance end that has arrived (None: none)."""
        for frame, kind, _ in s.events:
            if kind == "end":
                return frame - s.frames_out
        return None

    def process(self, items: list[AcousticItem]) -> list[torch.Tensor]:
        """items: (stream_id, new features (frames, dim), is_last[, events]). Returns log-probs per item;
        ``process_events`` also returns the events, re-indexed into those log-probs.

        Every chunk whose lookahead has arrived is run (all streams batched together); at an
        utterance's end and on the last call of a stream the remaining frames are run with
        whatever lookahead exists; after the last call the stream's state is dropped.
        """
        return [log_probs for log_probs, _ in self.process_events(items)]

    def process_events(self, items: list[AcousticItem]) -> list[tuple[torch.Tensor, list[tuple[int, str, float]]]]:
        """``process``, with each item's utterance edges: (index into its log-probs, kind, time_s)."""
        window = self.chunk_frames + self.right_context_frames
        streams, bases = [], []
        for item in items:
            stream_id, feats, _ = item[:3]
            s = self._stream(stream_id)
            s.events.extend((s.frames_in + frame, kind, t) for frame, kind, t in (item[3] if len(item) > 3 else ()))
            s.pending = torch.cat([s.pending, feats.to(s.pending.dtype)])
            s.frames_in += len(feats)
            streams.append(s)
            bases.append(s.frames_out)
        outputs: list[list[torch.Tensor]] = [[] for _ in items]
        events: list[list[tuple[int, str, float]]] = [[] for _ in items]
        while True:
            for i, s in enumerate(streams):
                self._drain(s, events[i], bases[i])
            sizes = {}
            for i, (s, item) in enumerate(zip(streams, items)):
                limit = self._limit(s)
                if limit is not None:
                    sizes[i] = min(window, limit)
                elif len(s.pending) >= window or (item[2] and len(s.pending)):
                    sizes[i] = min(window, len(s.pending))
            if not sizes:
                break
            ready = list(sizes)
            windows = [streams[i].pending[: sizes[i]] for i in ready]
            lengths = torch.tensor([len(w) for w in windows])
            x = torch.nn.utils.rnn.pad_sequence(windows, batch_first=True).to(self.device)
            h = torch.cat([streams[i].h for i in ready], dim=1)
            c = torch.cat([streams[i].c for i in ready], dim=1)
            with torch.no_grad():
                log_probs, (h, c) = self.model.forward_window(x, lengths, self.chunk_frames, (h, c))
            log_probs = log_probs.cpu()
            for j, i in enumerate(ready):
                s = streams[i]
                n = min(self.chunk_frames, sizes[i])
                outputs[i].append(log_probs[j, :n])
                s.h, s.c = h[:, j : j + 1], c[:, j : j + 1]
                s.pending = s.pending[n:]
                s.frames_out += n
        for item in items:
            if item[2]:
                self._streams.pop(item[0], None)
        num_tokens = self.model.config.num_tokens
        return [(torch.cat(o) if o else torch.zeros(0, num_tokens), e) for o, e in zip(outputs, events)]

    def _drain(self, s: _AcousticStream, out: list[tuple[int, str, float]], base: int) -> None:
        """Give out the stream's events that its output has reached; an utterance's end
        restarts the BiLSTM state from zeros."""
        while s.events and s.events[0][0] <= s.frames_out:
            frame, kind, t = s.events.popleft()
            out.append((frame - base, kind, t))
            if kind == "end":
                s.h, s.c = self.model.initial_state(1, self.device)

    def offline(self, features: list[torch.Tensor], chunk_frames: int | None = None, right_context_frames: int = 0) -> list[torch.Tensor]:
        """Whole utterances (each (frames, dim)) in one padded batch -> log-probs per utterance."""
        lengths = torch.tensor([len(f) for f in features])
        x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True).to(self.device)
        with torch.no_grad():
            log_probs = self.model(x, lengths, chunk_frames, right_context_frames).cpu()
        return [log_probs[i, : lengths[i]] for i in range(len(features))]
