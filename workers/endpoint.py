"""Utterance endpointing by voice activity, torch-free: where a stream's utterances start and end.

A stream is recognised as a sequence of utterances, each from a clean state (features'
running mean, the BiLSTM's state, the search), as if each were a file of its own: that is
what the model was trained on. Measured on the dev speakers' utterances joined with pauses
(`asr eval --continuous`): a state carried across pauses costs about 2x the per-file WER,
and 2 s of faint noise before an utterance alone doubles it.

The rule, per 32 ms voice activity window (``workers.vad_gate.WINDOW_SAMPLES``):

- idle (no utterance open): the first speech window opens one; it starts ``preroll_windows``
  before that window (not before the previous cut), so the onset the detector hears late is
  in it. Nothing of the idle audio is recognised.
- in an utterance: ``endpoint_windows`` non-speech windows in a row end it, at the end of
  the last of them (the cut). The voice activity detector restarts at the cut, so what
  follows a cut depends on the audio after it only.

``Endpointer.scan`` walks flags and stops at the first event, so that the caller can cut
the audio and restart the detector there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.vad_gate import WINDOW_S


@dataclass
class EndpointState:
    """One stream's endpointing state: whether an utterance is open, and the non-speech
    windows in a row since its last speech window."""

    in_utterance: bool = False
    silent_windows: int = 0


@dataclass(frozen=True)
class Event:
    """``kind`` "start": an utterance opens ``preroll`` windows before window ``window`` (the
    first speech window, an index into the scanned flags); "end": it ends after window
    ``window`` (the cut)."""

    kind: str
    window: int


class Endpointer:
    """See the module docstring. ``endpoint_ms``: non-speech that ends an utterance (> 0);
    ``preroll_ms``: audio kept before the first speech window."""

    def __init__(self, endpoint_ms: float, preroll_ms: float) -> None:
        if not endpoint_ms > 0 or preroll_ms < 0:
            raise ValueError(f"endpoint_ms must be > 0 and preroll_ms >= 0, got {endpoint_ms}, {preroll_ms}")
        self.endpoint_windows = max(1, math.ceil(endpoint_ms / 1000 / WINDOW_S - 1e-9))
        self.preroll_windows = int(round(preroll_ms / 1000 / WINDOW_S))

    def scan(self, flags: np.ndarray, state: EndpointState, first: int = 0) -> Event | None:
        """Walk ``flags[first:]`` (windows,) bool, updating ``state``; stop after the first event
        and return it (the windows after it are not walked), or None at the end of the flags."""
        for i in range(first, len(flags)):
            speech = bool(flags[i])
            if not state.in_utterance:
                if speech:
                    state.in_utterance, state.silent_windows = True, 0
                    return Event("start", i)
                continue
            state.silent_windows = 0 if speech else state.silent_windows + 1
            if state.silent_windows >= self.endpoint_windows:
                state.in_utterance, state.silent_windows = False, 0
                return Event("end", i)
        return None
