"""In-process recognition: the reference that the Ray modes must match.

``StreamingRecognizer`` chains the four stages for one stream; ``Recognizer`` transcribes
whole files (offline, or chunked exactly as a stream would be).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workers.audio.endpoint import EndpointState, endpointer
from workers.audio.reader import AudioReader, RawFormat, load_audio
from workers.audio.vad import (
    WINDOW_SAMPLES,
    VadConfig,
    gate_words,
    pause_cuts,
    quiet_cuts,
    speech_detector,
    trim_to_speech,
    window_energy_db,
)
from workers.audio.vad_gate import decoder_endpoint_ms
from workers.decoding.decoder import CtcDecoder, DecoderConfig, WordTiming
from workers.decoding.stage import build_decoder, phrase_decoder_factory
from workers.features.config import frames_for_ms  # noqa: F401  (re-exported)
from workers.features.mfcc import MfccExtractor
from workers.model.bundle import Bundle, load_bundle, pick_device
from workers.stages import AcousticStage, DecoderStage, FeatureStage, IngestStage, RecognitionResult, StreamOptions

#: A long recording is read in blocks of this many 32 ms windows (32.8 s at 16 kHz) to find its cuts.
LONG_BLOCK_WINDOWS = 1024


#: Pieces of a long recording go through the acoustic model in batches of at most this much
#: padded audio (pieces x the longest), seconds: what bounds the memory of a long file.
PIECE_BATCH_SECONDS = 120.0


#: A piece of a long recording: (start, stop) samples, (first, end) 32 ms windows.
Piece = tuple[int, int, int, int]


def _piece_batches(pieces: list[Piece], batch_size: int, batch_samples: float) -> list[list[Piece]]:
    """Consecutive pieces grouped in time order: at most ``batch_size`` per group and
    ``batch_samples`` of padded audio (pieces x the longest); a longer piece is alone."""
    batches: list[list[Piece]] = []
    longest = 0
    for piece in pieces:
        size = piece[1] - piece[0]
        current = batches[-1] if batches else []
        if current and len(current) < batch_size and (len(current) + 1) * max(longest, size) <= batch_samples:
            current.append(piece)
            longest = max(longest, size)
        else:
            batches.append([piece])
            longest = size
    return batches


def phrase_decoder(bundle: Bundle, config: DecoderConfig, phrases: Sequence[str]) -> CtcDecoder:
    """A beam-search decoder that only spells the words of ``phrases`` (``normalize_phrases``:
    ValueError for words the model cannot spell or an empty list; ``[unk]`` is ignored): its
    lexicon is exactly those words, it has no LM, and the beam settings of ``config`` (whose
    kind is taken as "beam"). See ``phrase_decoder_factory``."""
    return phrase_decoder_factory(bundle, config)(phrases)


@dataclass(frozen=True)
class Utterance:
    """An utterance of a stream: samples [start, stop) and the voice activity flags (windows,)
    bool of its 32 ms windows (from ``start``) as the stream's detector gave them."""

    start: int
    stop: int
    speech: torch.Tensor


@dataclass
class Transcript:
    """Result of transcribing one file."""

    path: str
    text: str
    duration_s: float
    words: list[WordTiming] = field(default_factory=list)
    compute_s: float = 0.0


class Recognizer:
    """Offline transcription of files or waveforms with one bundle.

    ``chunk_ms=None`` runs the BiLSTM over the whole utterance; otherwise latency-controlled
    chunks of ``chunk_ms`` with ``lookahead_ms`` of right context, as streaming does. With
    voice activity detection on (``vad``, the default) only words where the detector hears
    speech are kept. ``quantize`` ("none", "int8", "bf16"): see ``load_bundle`` (a ``Bundle`` passed
    in is used as it was loaded).
    """

    def __init__(
        self,
        bundle: Bundle | str | Path | None = None,
        decoder_config: DecoderConfig | None = None,
        chunk_ms: float | None = None,
        lookahead_ms: float = 0.0,
        device: str | None = None,
        vad: VadConfig | None = None,
        quantize: str = "none",
    ) -> None:
        self.device = pick_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, self.device, quantize)
        frame_ms = self.bundle.features.frame_ms
        self.chunk_frames = None if chunk_ms is None else max(1, frames_for_ms(chunk_ms, frame_ms))
        self.right_context_frames = frames_for_ms(lookahead_ms, frame_ms) if chunk_ms is not None else 0
        self.extractor = MfccExtractor(self.bundle.features, self.bundle.normalizer)
        self.acoustic = AcousticStage(self.bundle.model, self.chunk_frames or 1, self.right_context_frames, self.device)
        self.decoder_config = decoder_config or DecoderConfig()
        self._decoder: CtcDecoder | None = None
        self.vad_config = vad or VadConfig()
        self.vad = speech_detector(self.vad_config, self.bundle.features.sample_rate_hz)

    @property
    def decoder(self) -> CtcDecoder:
        """The CTC search, built on first use (loading its lexicon and LM), so that a recogniser
        that only reads and analyses audio (the batch job's analysis tasks) never loads them."""
        if self._decoder is None:
            self._decoder = build_decoder(self.bundle, self.decoder_config)
        return self._decoder

    def load(self, path: str | Path, raw_format: RawFormat | None = None) -> torch.Tensor:
        """Read a file -> (samples,) at the model rate; ``AudioError`` names the file and the reason."""
        return load_audio(path, self.bundle.features.sample_rate_hz, raw_format, self.bundle.features.min_samples)

    def features(self, path: str | Path, raw_format: RawFormat | None = None) -> torch.Tensor:
        return self.extractor(self.load(path, raw_format))

    def analyse(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(samples,) at the model rate -> features (frames, feature_dim) and speech flags (windows,) or None without VAD."""
        return self.extractor(wave), (self.vad.speech(wave) if self.vad is not None else None)

    def analyse_many(self, waves: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``analyse`` of several recordings, the voice activity detector running over all of
        them in one batch (``SpeechDetector.speech_many``): the same features and flags."""
        flags = self.vad.speech_many(waves) if self.vad is not None else [None] * len(waves)
        return [(self.extractor(w), f) for w, f in zip(waves, flags)]

    def emissions(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """A batch of (frames, feature_dim) -> CTC log-probs (frames', num_tokens) per item, in one
        forward pass (whole utterances, or chunked as this recogniser is)."""
        return self.acoustic.offline(features, self.chunk_frames, self.right_context_frames)

    def decode(self, emission: torch.Tensor, speech: torch.Tensor | None = None) -> tuple[str, list[WordTiming]]:
        """(frames, num_tokens) log-probs -> (text, words); with ``speech`` flags (windows,), only spoken words."""
        hyp = self.decoder.decode(emission)
        if speech is not None and self.vad is not None:
            return gate_words(hyp.text, hyp.words, speech, self.vad.config.pad_ms)
        return hyp.text, hyp.words

    def transcribe_features(
        self, features: list[torch.Tensor], speech: list[torch.Tensor | None] | None = None
    ) -> list[tuple[str, list[WordTiming]]]:
        """A batch of (frames, feature_dim) -> (text, words) per item; with ``speech`` flags, only spoken words."""
        flags = speech if speech is not None else [None] * len(features)
        return [self.decode(e, f) for e, f in zip(self.emissions(features), flags)]

    def is_long(self, wave: torch.Tensor | int) -> bool:
        """Whether a (samples,) recording, or one of that many samples, is longer than
        ``vad.max_segment_s`` and so recognised in pieces (see ``transcribe_wave``)."""
        samples = wave if isinstance(wave, int) else wave.numel()
        return samples > self.vad_config.max_segment_s * self.bundle.features.sample_rate_hz

    def open(self, path: str | Path, raw_format: RawFormat | None = None) -> AudioReader:
        """A file for reading piece by piece at the model rate (only the header is read here)."""
        return AudioReader(path, self.bundle.features.sample_rate_hz, raw_format, self.bundle.features.min_samples)

    def transcribe_wave(self, wave: torch.Tensor, source: str = "<wave>", batch_size: int = 16) -> Transcript:
        """(samples,) at the model rate -> Transcript.

        A long recording (see ``is_long``) is cut into pieces of at most
        ``vad.max_segment_s``: in the middle of the pauses the voice activity detector finds,
        or, with detection off, at the quietest moment before each limit. Each piece is
        recognised as an utterance of its own (with detection on, pieces without speech are
        skipped), so memory and accuracy do not depend on the recording's length. Word
        times stay relative to the recording.
        """
        t0 = time.perf_counter()
        if self.is_long(wave):
            return self._transcribe_long(lambda start, stop: wave[start:stop], wave.numel(), source, batch_size, t0)
        feats, speech = self.analyse(wave)
        (text, words), = self.transcribe_features([feats], [speech])
        duration_s = len(feats) * self.bundle.features.frame_ms / 1000
        return Transcript(source, text, duration_s, words, time.perf_counter() - t0)

    def transcribe_reader(self, reader: AudioReader, batch_size: int = 16) -> Transcript:
        """An open file -> Transcript, as ``transcribe_wave`` of the whole file would give; a long
        file is read in blocks and pieces and never held whole: memory does not grow with its length."""
        t0 = time.perf_counter()
        if not self.is_long(reader.num_samples):
            return self.transcribe_wave(reader.read(0, reader.num_samples), reader.source, batch_size)
        return self._transcribe_long(reader.read, reader.num_samples, reader.source, batch_size, t0)

    def _transcribe_long(
        self, read: Callable[[int, int], torch.Tensor], num_samples: int, source: str, batch_size: int, t0: float
    ) -> Transcript:
        """Recognise the pieces of a long recording in batches of at most ``batch_size`` pieces and
        ``PIECE_BATCH_SECONDS`` of padded audio; ``read(start, stop)`` gives its samples
        ``[start, stop)``. Holds one batch of pieces, one flag (or energy) per 32 ms window and the words."""
        rate = self.bundle.features.sample_rate_hz
        words: list[WordTiming] = []
        pieces, speech = self._long_pieces(read, num_samples)
        for batch in _piece_batches(pieces, batch_size, PIECE_BATCH_SECONDS * rate):
            feats = [self.extractor(read(start, stop)) for start, stop, _, _ in batch]
            flags = [speech[first:end] if speech is not None else None for _, _, first, end in batch]
            for (start, _, _, _), (_, piece_words) in zip(batch, self.transcribe_features(feats, flags)):
                words += [WordTiming(w.word, w.start_s + start / rate, w.end_s + start / rate) for w in piece_words]
        return Transcript(source, " ".join(w.word for w in words), num_samples / rate, words, time.perf_counter() - t0)

    def _long_pieces(self, read: Callable[[int, int], torch.Tensor], num_samples: int) -> tuple[list[Piece], torch.Tensor | None]:
        """The pieces to recognise, (start, stop) samples and (first, end) 32 ms windows each, and
        the speech flag of every window (None without detection). One pass over the recording in
        blocks of ``LONG_BLOCK_WINDOWS`` windows gives the detector's flags (its state carried
        across blocks: the flags of the whole signal) or the windows' energies, into one tensor
        allocated up front; the cuts follow from those."""
        cfg = self.vad_config
        block = LONG_BLOCK_WINDOWS * WINDOW_SAMPLES
        n = num_samples // WINDOW_SAMPLES
        per_window = torch.zeros(n, dtype=torch.bool if self.vad is not None else torch.float32)
        state = self.vad.initial_state() if self.vad is not None else None
        for start in range(0, num_samples, block):
            wave = read(start, min(start + block, num_samples))
            if self.vad is not None:
                probs, state = self.vad.online(wave, state)
                values = probs > cfg.threshold
            else:
                values = window_energy_db(wave)
            first = start // WINDOW_SAMPLES
            per_window[first : first + values.numel()] = values
        speech = per_window if self.vad is not None else None
        cuts = pause_cuts(per_window, cfg.max_segment_s, cfg.min_pause_s) if speech is not None else quiet_cuts(per_window, cfg.max_segment_s)
        pieces = []
        for first, end in cuts:
            if speech is not None:
                if not speech[first:end].any():
                    continue
                first, end = trim_to_speech(speech, first, end, cfg.piece_pad_ms)
            start, stop = first * WINDOW_SAMPLES, (end * WINDOW_SAMPLES if end < n else num_samples)
            if stop - start >= self.bundle.features.min_samples:
                pieces.append((start, stop, first, end))
        return pieces, speech

    def utterance_spans(self, wave: torch.Tensor, endpoint_ms: float) -> list[Utterance]:
        """Where a stream of (samples,) at the model rate has its utterances, offline: the voice
        activity of the whole signal walked by ``workers.audio.endpoint.Endpointer``, the detector
        restarted at each cut, as ``FeatureStage`` does chunk by chunk (the reference that the
        streaming path must equal). An utterance still open at the end ends there."""
        if self.vad is None:
            raise ValueError("utterance spans need voice activity detection (vad.enabled)")
        ep = endpointer(self.vad_config, endpoint_ms)
        state, spans = EndpointState(), []
        base, start = 0, None
        while True:
            flags = self.vad.speech(wave[base:])
            walked = 0
            while (event := ep.scan(flags.numpy(), state, walked)) is not None and event.kind == "start":
                start = max(base, (base // WINDOW_SAMPLES + event.window + event.onset - ep.preroll_windows) * WINDOW_SAMPLES)
                walked = event.window + 1
            if event is None:
                onset = ep.pending_onset(state)
                if onset is not None:  # the end of the stream opens what speech was pending
                    start = max(base, (base // WINDOW_SAMPLES + len(flags) + onset - ep.preroll_windows) * WINDOW_SAMPLES)
                if start is not None:
                    spans.append(Utterance(start, wave.numel(), flags[(start - base) // WINDOW_SAMPLES :]))
                return spans
            cut = base + ep.end_window(event) * WINDOW_SAMPLES
            spans.append(Utterance(start, cut, flags[(start - base) // WINDOW_SAMPLES : ep.end_window(event)]))
            base, start = cut, None

    def transcribe_utterances(self, wave: torch.Tensor, endpoint_ms: float) -> list[Transcript]:
        """A stream recognised offline as ``StreamingRecognizer`` with this endpointing recognises
        it: each of its ``utterance_spans`` as a file of its own (chunked as this recogniser is),
        its words gated by the stream's voice activity flags; word times from the stream's start."""
        rate = self.bundle.features.sample_rate_hz
        out = []
        for span in self.utterance_spans(wave, endpoint_ms):
            (text, words), = self.transcribe_features([self.extractor(wave[span.start : span.stop])], [span.speech])
            offset_s = span.start / rate
            words = [WordTiming(w.word, w.start_s + offset_s, w.end_s + offset_s) for w in words]
            out.append(Transcript(f"{span.start / rate:.3f}-{span.stop / rate:.3f}", text, (span.stop - span.start) / rate, words))
        return out

    def transcribe_file(self, path: str | Path, raw_format: RawFormat | None = None) -> Transcript:
        """Raises ``AudioError`` (naming the file) for input that cannot be read. A long file is
        read piece by piece (``transcribe_reader``)."""
        t0 = time.perf_counter()
        with self.open(path, raw_format) as reader:
            transcript = self.transcribe_reader(reader)
        transcript.path = str(path)
        transcript.compute_s = time.perf_counter() - t0
        return transcript


class StreamingRecognizer:
    """Push audio chunks of any size and rate; get partial and final results.

    >>> rec = StreamingRecognizer()
    >>> for chunk in chunks: results = rec.push(chunk, 16000)   # partial (and endpoint finals)
    >>> finals = rec.finish()                                    # the last final result

    ``options``: the stream's ``StreamOptions`` (alternatives, phrase list), for every
    utterance; ``options`` can be changed between utterances (it is read at each push).
    """

    def __init__(
        self,
        bundle: Bundle | str | Path | None = None,
        decoder_config: DecoderConfig | None = None,
        chunk_ms: float = 300.0,
        lookahead_ms: float = 150.0,
        endpoint_silence_ms: float = 0.0,
        ingest_chunk_ms: float = 100.0,
        device: str | None = None,
        stream_id: str = "stream",
        vad: VadConfig | None = None,
        quantize: str = "none",
        options: StreamOptions | None = None,
    ) -> None:
        device_t = pick_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device_t, quantize)
        feats = self.bundle.features
        self.stream_id = stream_id
        self.ingest = IngestStage(feats.sample_rate_hz, max(1, int(feats.sample_rate_hz * ingest_chunk_ms / 1000)))
        vad = vad or VadConfig()
        detector = speech_detector(vad, feats.sample_rate_hz)
        self.features = FeatureStage(MfccExtractor(feats, self.bundle.normalizer), detector, endpoint_silence_ms)
        self.acoustic = AcousticStage(
            self.bundle.model, max(1, frames_for_ms(chunk_ms, feats.frame_ms)), frames_for_ms(lookahead_ms, feats.frame_ms), device_t
        )
        decoder_config = decoder_config or DecoderConfig()
        self.options = options
        self.decoder = DecoderStage(
            build_decoder(self.bundle, decoder_config),
            decoder_endpoint_ms(endpoint_silence_ms, vad),
            vad.gate_pad_ms,
            phrase_decoder_factory(self.bundle, decoder_config),
        )

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency: chunk + lookahead."""
        return self.bundle.model.latency_ms(self.acoustic.chunk_frames, self.acoustic.right_context_frames, self.bundle.features.frame_ms)

    def push(self, samples: np.ndarray | torch.Tensor, rate_hz: int = 16000) -> list[RecognitionResult]:
        results = []
        for wave in self.ingest.push(self.stream_id, samples, rate_hz):
            out = self.features.push(self.stream_id, torch.from_numpy(wave))
            ((log_probs, events),) = self.acoustic.process_events([(self.stream_id, out.features, False, out.events)])
            if len(log_probs) or len(out.speech) or events:
                results += self.decoder.push(self.stream_id, log_probs, speech=out.speech, options=self.options, events=events)
        return results

    def finish(self) -> list[RecognitionResult]:
        """Flush everything buffered and return the remaining final result(s); the recognizer can be reused."""
        out = self.features.finish(self.stream_id, torch.from_numpy(self.ingest.finish(self.stream_id)))
        ((log_probs, events),) = self.acoustic.process_events([(self.stream_id, out.features, True, out.events)])
        return self.decoder.push(self.stream_id, log_probs, is_last=True, speech=out.speech, options=self.options, events=events)
