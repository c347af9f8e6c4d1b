"""The four stages as plain classes that keep per-stream state keyed by stream id.

The in-process ``StreamingRecognizer`` chains them directly; the Ray pipeline wraps each
one in an actor shared by many streams. Same classes, same numbers.

    IngestStage    audio of any size/rate  -> fixed-size model-rate chunks (samples,)   workers.ingest
    FeatureStage   model-rate chunk        -> normalised stacked MFCC (frames, feature_dim)
    AcousticStage  features of many streams -> CTC log-probs (frames, num_tokens), batched
    DecoderStage   log-probs               -> partial / final ``RecognitionResult``      workers.decoder_stage

The ingest and decoder stages live in torch-free modules (numpy in, numpy out), re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.decoder_stage import MAX_ALTERNATIVES, PHRASE_DECODER_CACHE, DecoderStage, RecognitionResult, StreamOptions
from workers.features import FeatureState, MfccExtractor, StreamingFeatures
from workers.ingest import IngestStage
from workers.model import BiLSTMCTC
from workers.vad import SpeechDetector, VadState

__all__ = [  # the ingest and decoder stages are torch-free modules' (the Ray actors of those stages never load torch)
    "MAX_ALTERNATIVES", "PHRASE_DECODER_CACHE", "AcousticStage", "DecoderStage", "FeatureStage", "IngestStage", "RecognitionResult",
    "StreamOptions",
]


class FeatureStage:
    """MFCC of each stream and, with a ``SpeechDetector``, its voice activity per 32 ms window."""

    def __init__(self, extractor: MfccExtractor, vad: SpeechDetector | None = None) -> None:
        self.streaming = StreamingFeatures(extractor)
        self.vad = vad
        self._states: dict[str, FeatureState] = {}
        self._vad_states: dict[str, VadState] = {}

    def push(self, stream_id: str, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(samples,) -> features (frames, feature_dim) and speech flags (windows,) bool (empty without a VAD)."""
        return self.push_many([(stream_id, wave)])[0]

    def push_many(self, pushes: list[tuple[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``push`` for several streams (distinct ids) at once: the MFCC and the voice activity of
        all of them in batches (``StreamingFeatures.online_many``, ``SpeechDetector.online_many``)."""
        if len({sid for sid, _ in pushes}) != len(pushes):
            raise ValueError("push_many takes one push per stream")
        mfcc = self.streaming.online_many([wave for _, wave in pushes],
                                          [self._states.get(sid) or self.streaming.initial_state() for sid, _ in pushes])
        no_speech = torch.zeros(0, dtype=torch.bool)
        vad = [(no_speech, None)] * len(pushes)
        if self.vad is not None:
            states = [self._vad_states.get(sid) or self.vad.initial_state() for sid, _ in pushes]
            vad = [(probs > self.vad.config.threshold, state) for probs, state in self.vad.online_many([w for _, w in pushes], states)]
        for (sid, _), (_, state), (_, vad_state) in zip(pushes, mfcc, vad):  # all computed: now the streams move on
            self._states[sid] = state
            if vad_state is not None:
                self._vad_states[sid] = vad_state
        return [(feats, speech) for (feats, _), (speech, _) in zip(mfcc, vad)]

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
