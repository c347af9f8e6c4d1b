"""Utterance endpointing by voice activity, torch-free: where a stream's utterances start and end.

A stream is recognised as a sequence of utterances, each from a clean state (features'
running mean, the BiLSTM's state, the search), as if each were a file of its own: that is
what the model was trained on. Measured on the dev speakers' utterances joined with pauses
(`asr eval --continuous`): a state carried across pauses costs about 2x the per-file WER,
and 2 s of faint noise before an utterance alone doubles it.

The rule, per 32 ms voice activity window (``workers.audio.vad_gate.WINDOW_SAMPLES``):

- idle (no utterance open): ``start_windows`` speech windows among the last twice as many
  open one (a window or two of noise the detector takes for speech do not; a short word
  whose detection flickers does); it starts ``preroll_windows`` before the first of them
  (not before the previous cut), so the onset the detector hears late is in it. Nothing of
  the idle audio is recognised.
- in an utterance: ``endpoint_windows`` non-speech windows in a row end it; it ends
  ``trail_windows`` after its last speech window (the cut; the audio after that is idle).
  Audio past the last speech window + trail is held back until speech resumes (it joins
  the utterance) or the utterance ends (it does not): a pause is never recognised as the
  tail of an utterance, which cost the model its last letters (measured: `asr eval
  --continuous`). The voice activity detector restarts at the cut, so what follows a cut
  depends on the audio after it only.

``Endpointer.scan`` walks flags and stops at the first event, so that the caller can cut
the audio and restart the detector there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workers.audio.vad_gate import WINDOW_S, VadConfig


@dataclass
class EndpointState:
    """One stream's endpointing state: whether an utterance is open, and the non-speech
    windows in a row since its last speech window."""

    in_utterance: bool = False
    silent_windows: int = 0
    recent: tuple[bool, ...] = ()  # idle: the flags of the last windows (at most twice start_windows)


@dataclass(frozen=True)
class Event:
    """``kind`` "start": an utterance opens at window ``window`` (an index into the scanned
    flags; the window that confirmed it); its audio starts ``onset`` windows from there
    (``onset`` <= 0: the first speech window of the run, which may lie in flags scanned
    before), then the pre-roll before that. "end": it ends after window ``window`` (the cut)."""

    kind: str
    window: int
    onset: int = 0


class Endpointer:
    """See the module docstring. ``endpoint_ms``: non-speech that ends an utterance (> 0);
    ``preroll_ms``: audio kept before the first speech window; ``trail_ms``: audio kept after
    the last (at most ``endpoint_ms``; default all of it); ``start_ms``: speech in a row that
    opens an utterance (at least one window)."""

    def __init__(self, endpoint_ms: float, preroll_ms: float, trail_ms: float | None = None, start_ms: float = 0.0) -> None:
        trail_ms = endpoint_ms if trail_ms is None else trail_ms
        if not endpoint_ms > 0 or min(preroll_ms, trail_ms, start_ms) < 0:
            raise ValueError("endpoint_ms must be > 0, preroll_ms, trail_ms and start_ms >= 0, "
                             f"got {endpoint_ms}, {preroll_ms}, {trail_ms}, {start_ms}")
        self.endpoint_windows = max(1, math.ceil(endpoint_ms / 1000 / WINDOW_S - 1e-9))
        self.preroll_windows = int(round(preroll_ms / 1000 / WINDOW_S))
        self.trail_windows = min(self.endpoint_windows, int(round(trail_ms / 1000 / WINDOW_S)))
        self.start_windows = max(1, int(round(start_ms / 1000 / WINDOW_S)))

    def pending_onset(self, state: EndpointState) -> int | None:
        """At the end of a stream: speech that had not yet opened an utterance opens one (the
        stream's end confirms it: a short last word is recognised). Its first speech window,
        counted back from the end of the flags scanned (-1: the last one); None: no speech."""
        if state.in_utterance or True not in state.recent:
            return None
        return state.recent.index(True) - len(state.recent)

    def end_window(self, event: Event) -> int:
        """Where an "end" event's utterance ends: the window index (into the scanned flags) its
        audio stops before: its last speech window + 1 + the trail."""
        return event.window + 1 - self.endpoint_windows + self.trail_windows

    def scan(self, flags: np.ndarray, state: EndpointState, first: int = 0) -> Event | None:
        """Walk ``flags[first:]`` (windows,) bool, updating ``state``; stop after the first event
        and return it (the windows after it are not walked), or None at the end of the flags."""
        for i in range(first, len(flags)):
            speech = bool(flags[i])
            if not state.in_utterance:
                state.recent = (*state.recent, speech)[-2 * self.start_windows :]
                if sum(state.recent) >= self.start_windows:
                    onset = state.recent.index(True) - (len(state.recent) - 1)
                    state.in_utterance, state.silent_windows, state.recent = True, 0, ()
                    return Event("start", i, onset)
                continue
            state.silent_windows = 0 if speech else state.silent_windows + 1
            if state.silent_windows >= self.endpoint_windows:
                state.in_utterance, state.silent_windows = False, 0
                return Event("end", i)
        return None


def endpointer(vad: VadConfig, endpoint_ms: float) -> Endpointer:
    """The endpointer of a stream with these voice activity settings: ``piece_pad_ms`` of audio
    kept before and after each utterance's speech, ``start_ms`` of speech to open one."""
    return Endpointer(endpoint_ms, vad.piece_pad_ms, vad.piece_pad_ms, vad.start_ms)
