"""Voice activity settings and the gating of recognised words by voice activity flags, torch-free.

The decoders need only this (the Ray decoder actors never load torch); the detector that
makes the flags, silero-vad, is ``workers.audio.vad``, which re-exports these names. Flags are
(windows,) bool, numpy arrays or torch CPU tensors, one per 32 ms window of 16 kHz audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.decoding.decoder import WordTiming

VAD_RATE_HZ = 16000
WINDOW_SAMPLES = 512  # silero-vad's window at 16 kHz
WINDOW_S = WINDOW_SAMPLES / VAD_RATE_HZ


@dataclass(frozen=True)
class VadConfig:
    """Speech / non-speech gating of recognised words."""

    enabled: bool = True
    threshold: float = 0.5  # speech probability above which a 32 ms window counts as speech
    pad_ms: float = 300.0  # a word is kept if a speech window lies within this distance of its span
    max_segment_s: float = 20.0  # offline/batch: longer recordings are cut at pauses into pieces at most this long
    # Long recordings: shortest non-speech stretch cut at, and the speech padding each piece keeps
    # (it is recognised as its speech +- piece_pad_ms, like an utterance recording, not with the whole
    # pause). The 105 dev utterances joined with 0.3-0.8 s of silence, three random draws, WER over
    # separate files (11.84 %): min_pause 0.35 s + whole pauses 1.17x; + 300 ms 1.11 / 1.03 / 1.09x;
    # 0.5 s + 300 ms 1.10 / 1.03 / 1.01x (chosen); 0.7 s + 300 ms 1.10 / 1.03 / 1.03x; 400 ms worse.
    min_pause_s: float = 0.5
    piece_pad_ms: float = 300.0
    # Streams (workers/audio/endpoint.py): speech that opens an utterance (this much among the last twice
    # as many windows), each utterance kept with piece_pad_ms of audio before its first and after its
    # last speech window. The dev speakers' utterances joined with 0.3-3 s pauses of noise at
    # -50/-60/-70 dBFS (asr eval --continuous), WER per file / continuous, in a row: 32 ms 11.7 /
    # 12.5, 13.0, 16.1 %; 96 ms 12.2 / 12.5, 12.5, 12.7 %; 128 ms (endpointing 800 ms) 12.0 / 12.2,
    # 12.0, 11.8 %. Among the last 8 windows: 11.5 / 12.2, 12.0, 12.0 %, and FSDD's short words keep.
    start_ms: float = 128.0
    target_peak: float = 0.5  # the detector hears the input scaled so that its running peak is this ...
    max_gain_db: float = 40.0  # ... amplified by at most this much (silero misses speech 35 dB below AN4's level)

    @property
    def gate_pad_ms(self) -> float | None:
        """What the decoder stages gate words with: ``pad_ms``, or None when detection is off."""
        return self.pad_ms if self.enabled else None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"vad.threshold must be in (0, 1), got {self.threshold}")
        if self.pad_ms < 0 or self.piece_pad_ms < 0 or self.start_ms < 0:
            raise ValueError(f"vad.pad_ms, vad.piece_pad_ms and vad.start_ms must be >= 0, got {self.pad_ms}, {self.piece_pad_ms}, {self.start_ms}")
        if self.max_segment_s < 1.0 or self.min_pause_s <= 0:
            raise ValueError(f"vad.max_segment_s must be >= 1 and min_pause_s > 0, got {self.max_segment_s}, {self.min_pause_s}")
        if self.max_gain_db < 0 or not 0 < self.target_peak <= 1:
            raise ValueError(f"vad.max_gain_db must be >= 0 and target_peak in (0, 1], got {self.max_gain_db}, {self.target_peak}")


def decoder_endpoint_ms(endpoint_silence_ms: float, vad: VadConfig) -> float:
    """The endpointing a decoder stage does itself (on blank frames): only without voice activity
    detection. With detection, utterances end at the feature stage, which restarts every state
    at each end (``workers.audio.endpoint``)."""
    return 0.0 if vad.enabled else endpoint_silence_ms


def bool_flags(speech: Any) -> np.ndarray:
    """Voice activity flags (windows,) as a numpy bool array; a torch tensor is moved to the CPU
    (duck-typed, so that this module never imports torch)."""
    if hasattr(speech, "detach"):
        speech = speech.detach().cpu()
    return np.asarray(speech, dtype=bool).reshape(-1)


def gate_words(
    text: str, words: list[WordTiming], speech: Any, pad_ms: float, offset_s: float = 0.0
) -> tuple[str, list[WordTiming]]:
    """(text, words) of a hypothesis with the unspoken words removed (``keep_spoken_words``);
    the text is rebuilt only when a word was dropped."""
    kept = keep_spoken_words(words, speech, pad_ms, offset_s)
    return (text, words) if len(kept) == len(words) else (" ".join(w.word for w in kept), kept)


def keep_spoken_words(words: list[WordTiming], speech: Any, pad_ms: float, offset_s: float = 0.0) -> list[WordTiming]:
    """The words whose span (seconds from the stream start) has a speech window within ``pad_ms``:
    ``speech`` (windows,) bool, window i covering ``offset_s + [i, i+1) * 32 ms``."""
    if not words:
        return words
    idx = np.flatnonzero(bool_flags(speech))
    if idx.size == 0:
        return []
    starts = idx.astype(np.float64) * WINDOW_S + offset_s
    pad = pad_ms / 1000
    return [w for w in words if bool(((starts <= w.end_s + pad) & (starts + WINDOW_S >= w.start_s - pad)).any())]
