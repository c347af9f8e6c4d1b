"""``ReplayBuffer``: the audio of one stream that the driver keeps, so that a stream survives
the crash of a stage actor (its state there is gone; the restarted actor gets the audio again)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReplayPlan:
    """What to push again after a crash: ``pushes`` [(audio (samples,) or (samples, channels),
    rate_hz)], to be decoded from fresh actor state; results are shifted by ``offset_s``
    (stream time of the first sample). ``from_start``: the pushes are the whole stream, so the
    replay reproduces it exactly and the finals the caller already has come again (to skip)."""

    pushes: list[tuple[np.ndarray, int]]
    offset_s: float
    from_start: bool


class ReplayBuffer:
    """A stream's pushes, bounded by ``max_s`` seconds of audio.

    While the whole stream fits, all of it is kept: a replay from the start reproduces every
    result exactly (streaming is deterministic). Beyond that, the audio since the end of the
    last final is kept (a replay starts there with fresh state; the audio before it is decoded
    already). When even that exceeds ``max_s`` (a long stretch with no final), only the latest
    ``max_s`` are kept and the stream cannot be replayed until its next final: ``plan()`` then
    returns None.
    """

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self._pushes: deque[tuple[float, np.ndarray, int]] = deque()  # (stream time of first sample, audio, rate_hz)
        self.start_s = 0.0  # stream time of the first sample kept
        self.end_s = 0.0  # stream time after the last sample pushed
        self.last_final_end_s = 0.0  # end of the last final the caller got (stream time)
        self.from_start = True  # nothing dropped yet

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s

    def add(self, audio: np.ndarray, rate_hz: int) -> None:
        """Keep one push (audio (samples,) or (samples, channels) at ``rate_hz``)."""
        self._pushes.append((self.end_s, audio, rate_hz))
        self.end_s += len(audio) / rate_hz
        self._bound()

    def final(self, end_s: float) -> None:
        """The caller got a final ending at ``end_s`` (stream time)."""
        self.last_final_end_s = max(self.last_final_end_s, end_s)
        if not self.from_start and self.start_s <= self.last_final_end_s:
            self._drop_before(self.last_final_end_s)  # keep only what a replay needs
        self._bound()

    def plan(self) -> ReplayPlan | None:
        """The pushes to replay, or None when the audio since the last final is no longer all here."""
        if self.from_start:
            return ReplayPlan([(a, r) for _, a, r in self._pushes], 0.0, True)
        if self.start_s > self.last_final_end_s + 1e-9:
            return None
        self._drop_before(self.last_final_end_s)
        return ReplayPlan([(a, r) for _, a, r in self._pushes], self.start_s, False)

    def _bound(self) -> None:
        if self.seconds > self.max_s and self.last_final_end_s > self.start_s:
            self._drop_before(self.last_final_end_s)  # what a replay from the last final needs
        while self.seconds > self.max_s and self._pushes:  # still too much, no final in reach: the
            self._drop_before(self._pushes[1][0] if len(self._pushes) > 1 else self.end_s)  # latest max_s (rolling)

    def _drop_before(self, t_s: float) -> None:
        """Forget the audio before stream time ``t_s`` (the push that holds ``t_s`` is cut there)."""
        while self._pushes:
            start, audio, rate = self._pushes[0]
            end = start + len(audio) / rate
            if end <= t_s:
                self._pushes.popleft()
                continue
            cut = int(round((t_s - start) * rate))
            if cut > 0:
                self._pushes[0] = (start + cut / rate, audio[cut:], rate)
            break
        self.start_s = self._pushes[0][0] if self._pushes else self.end_s
        if t_s > 0:
            self.from_start = False
