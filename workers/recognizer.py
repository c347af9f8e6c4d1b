"""In-process recognition: the reference that the Ray modes must match.

``StreamingRecognizer`` chains the four stages for one stream; ``Recognizer`` transcribes
whole files (offline, or chunked exactly as a stream would be).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workers.audio import RawFormat, load_audio
from workers.bundle import Bundle, load_bundle, pick_device
from workers.decoder import CtcDecoder, DecoderConfig, WordTiming
from workers.features import MfccExtractor
from workers.stages import AcousticStage, DecoderStage, FeatureStage, IngestStage, RecognitionResult
from workers.vad import WINDOW_SAMPLES, VadConfig, gate_words, pause_cuts, speech_detector


def frames_for_ms(ms: float, frame_ms: float) -> int:
    """Milliseconds -> whole model frames (rounded)."""
    return int(round(ms / frame_ms))


def build_decoder(bundle: Bundle, config: DecoderConfig) -> CtcDecoder:
    """A decoder for this bundle: beam search uses the bundle's lexicon and LM when present."""
    return CtcDecoder(config, bundle.features.frame_ms, bundle.lexicon_path, bundle.lm_path, bundle.tokens_path)


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
    speech are kept.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path | None = None,
        decoder_config: DecoderConfig | None = None,
        chunk_ms: float | None = None,
        lookahead_ms: float = 0.0,
        device: str | None = None,
        vad: VadConfig | None = None,
    ) -> None:
        self.device = pick_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, self.device)
        frame_ms = self.bundle.features.frame_ms
        self.chunk_frames = None if chunk_ms is None else max(1, frames_for_ms(chunk_ms, frame_ms))
        self.right_context_frames = frames_for_ms(lookahead_ms, frame_ms) if chunk_ms is not None else 0
        self.extractor = MfccExtractor(self.bundle.features, self.bundle.normalizer)
        self.acoustic = AcousticStage(self.bundle.model, self.chunk_frames or 1, self.right_context_frames, self.device)
        self.decoder = build_decoder(self.bundle, decoder_config or DecoderConfig())
        self.vad = speech_detector(vad or VadConfig(), self.bundle.features.sample_rate_hz)

    def load(self, path: str | Path, raw_format: RawFormat | None = None) -> torch.Tensor:
        """Read a file -> (samples,) at the model rate; ``AudioError`` names the file and the reason."""
        return load_audio(path, self.bundle.features.sample_rate_hz, raw_format, self.bundle.features.min_samples)

    def features(self, path: str | Path, raw_format: RawFormat | None = None) -> torch.Tensor:
        return self.extractor(self.load(path, raw_format))

    def analyse(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(samples,) at the model rate -> features (frames, feature_dim) and speech flags (windows,) or None without VAD."""
        return self.extractor(wave), (self.vad.speech(wave) if self.vad is not None else None)

    def transcribe_features(
        self, features: list[torch.Tensor], speech: list[torch.Tensor | None] | None = None
    ) -> list[tuple[str, list[WordTiming]]]:
        """A batch of (frames, feature_dim) -> (text, words) per item; with ``speech`` flags, only spoken words."""
        emissions = self.acoustic.offline(features, self.chunk_frames, self.right_context_frames)
        out = []
        for i, e in enumerate(emissions):
            hyp = self.decoder.decode(e)
            flags = speech[i] if speech is not None else None
            if flags is not None and self.vad is not None:
                out.append(gate_words(hyp.text, hyp.words, flags, self.vad.config.pad_ms))
            else:
                out.append((hyp.text, hyp.words))
        return out

    def is_long(self, wave: torch.Tensor) -> bool:
        """Whether ``transcribe_wave`` cuts this (samples,) recording at pauses (VAD on, longer than ``vad.max_segment_s``)."""
        return self.vad is not None and wave.numel() > self.vad.config.max_segment_s * self.bundle.features.sample_rate_hz

    def transcribe_wave(self, wave: torch.Tensor, source: str = "<wave>", batch_size: int = 16) -> Transcript:
        """(samples,) at the model rate -> Transcript.

        A long recording (see ``is_long``) is cut at pauses the voice activity detector
        finds into pieces of at most ``vad.max_segment_s``; each piece is recognised as an
        utterance of its own (pieces without speech are skipped), so memory and accuracy do
        not depend on the recording's length. Word times stay relative to the recording.
        """
        t0 = time.perf_counter()
        rate = self.bundle.features.sample_rate_hz
        if not self.is_long(wave):
            feats, speech = self.analyse(wave)
            (text, words), = self.transcribe_features([feats], [speech])
            duration_s = len(feats) * self.bundle.features.frame_ms / 1000
            return Transcript(source, text, duration_s, words, time.perf_counter() - t0)
        assert self.vad is not None
        speech = self.vad.speech(wave)
        cfg = self.vad.config
        pieces = []
        for first, end in pause_cuts(speech, cfg.max_segment_s, cfg.min_pause_s):
            if speech[first:end].any():
                start, stop = first * WINDOW_SAMPLES, (end * WINDOW_SAMPLES if end < speech.numel() else wave.numel())
                if stop - start >= self.bundle.features.min_samples:
                    pieces.append((start, self.extractor(wave[start:stop]), speech[first:end]))
        words: list[WordTiming] = []
        for i in range(0, len(pieces), batch_size):
            batch = pieces[i : i + batch_size]
            for (start, _, _), (_, piece_words) in zip(batch, self.transcribe_features([f for _, f, _ in batch], [s for _, _, s in batch])):
                words += [WordTiming(w.word, w.start_s + start / rate, w.end_s + start / rate) for w in piece_words]
        return Transcript(source, " ".join(w.word for w in words), wave.numel() / rate, words, time.perf_counter() - t0)

    def transcribe_file(self, path: str | Path, raw_format: RawFormat | None = None) -> Transcript:
        """Raises ``AudioError`` (naming the file) for input that cannot be read."""
        t0 = time.perf_counter()
        transcript = self.transcribe_wave(self.load(path, raw_format), str(path))
        transcript.compute_s = time.perf_counter() - t0
        return transcript


class StreamingRecognizer:
    """Push audio chunks of any size and rate; get partial and final results.

    >>> rec = StreamingRecognizer()
    >>> for chunk in chunks: results = rec.push(chunk, 16000)   # partial (and endpoint finals)
    >>> finals = rec.finish()                                    # the last final result
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
    ) -> None:
        device_t = pick_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device_t)
        feats = self.bundle.features
        self.stream_id = stream_id
        self.ingest = IngestStage(feats.sample_rate_hz, max(1, int(feats.sample_rate_hz * ingest_chunk_ms / 1000)))
        vad = vad or VadConfig()
        self.features = FeatureStage(MfccExtractor(feats, self.bundle.normalizer), speech_detector(vad, feats.sample_rate_hz))
        self.acoustic = AcousticStage(
            self.bundle.model, max(1, frames_for_ms(chunk_ms, feats.frame_ms)), frames_for_ms(lookahead_ms, feats.frame_ms), device_t
        )
        self.decoder = DecoderStage(
            build_decoder(self.bundle, decoder_config or DecoderConfig()), endpoint_silence_ms, vad.gate_pad_ms
        )

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency: chunk + lookahead."""
        return self.bundle.model.latency_ms(self.acoustic.chunk_frames, self.acoustic.right_context_frames, self.bundle.features.frame_ms)

    def push(self, samples: np.ndarray | torch.Tensor, rate_hz: int = 16000) -> list[RecognitionResult]:
        results = []
        for wave in self.ingest.push(self.stream_id, samples, rate_hz):
            feats, speech = self.features.push(self.stream_id, wave)
            (log_probs,) = self.acoustic.process([(self.stream_id, feats, False)])
            if len(log_probs) or len(speech):
                results += self.decoder.push(self.stream_id, log_probs, speech=speech)
        return results

    def finish(self) -> list[RecognitionResult]:
        """Flush everything buffered and return the remaining final result(s); the recognizer can be reused."""
        feats, speech = self.features.finish(self.stream_id, self.ingest.finish(self.stream_id))
        (log_probs,) = self.acoustic.process([(self.stream_id, feats, True)])
        return self.decoder.push(self.stream_id, log_probs, is_last=True, speech=speech)
