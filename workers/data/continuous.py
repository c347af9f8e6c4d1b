"""Continuous streams with pauses: what a microphone user or a phone call sends.

``join_utterances`` joins one speaker's utterances into one waveform with seeded pauses of
faint noise between them (a real room is never digitally silent), and remembers where each
utterance lies. ``assign_finals`` maps the finals a recogniser gave for such a stream back
to the utterances (by the time of each word), so that a continuous stream is scored against
the same references as the separate files, and counts the finals that split an utterance or
merge two. Everything here is deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.decoding.decoder import WordTiming

#: Pauses between joined utterances, seconds (uniform): from a breath to a long hesitation.
PAUSE_RANGE_S = (0.3, 3.0)
#: The level of the faint noise that fills the pauses and the lead-in, dBFS RMS (AN4's own
#: recordings have a noise floor near -62 dBFS: the 10th percentile of 25 ms frames' RMS).
PAUSE_NOISE_DBFS = -60.0


@dataclass(frozen=True)
class Placed:
    """One utterance inside a joined stream: its id, reference text and span in seconds."""

    id: str
    text: str
    start_s: float
    end_s: float


@dataclass
class JoinedStream:
    """A speaker's utterances as one waveform (samples,) at ``rate_hz`` and where each lies."""

    speaker: str
    wave: torch.Tensor
    rate_hz: int
    utterances: list[Placed]

    @property
    def duration_s(self) -> float:
        return self.wave.numel() / self.rate_hz


def join_utterances(
    speaker: str,
    waves: Sequence[tuple[str, str, torch.Tensor]],
    rate_hz: int,
    seed: int = 0,
    pause_range_s: tuple[float, float] = PAUSE_RANGE_S,
    noise_dbfs: float = PAUSE_NOISE_DBFS,
) -> JoinedStream:
    """``waves``: (id, reference, (samples,) at ``rate_hz``) in speaking order -> one stream that
    starts with a pause and puts a pause drawn from ``pause_range_s`` after every utterance.
    The pauses hold faint white noise at ``noise_dbfs`` (a room is never digitally silent);
    the utterances are left as they are, so the stream holds exactly the audio of the files.
    Seeded by ``seed`` and the speaker, so every mode hears the same stream."""
    rng = random.Random(f"{seed}:{speaker}")
    low, high = pause_range_s
    if not 0 <= low <= high:
        raise ValueError(f"pause_range_s must be 0 <= low <= high, got {pause_range_s}")
    pieces: list[torch.Tensor] = []
    placed: list[Placed] = []
    position = 0
    generator = torch.Generator().manual_seed(rng.randrange(2**31))

    def pause() -> None:
        nonlocal position
        samples = int(round(rng.uniform(low, high) * rate_hz))
        pieces.append(torch.randn(samples, generator=generator) * (10.0 ** (noise_dbfs / 20.0)))
        position += samples

    pause()
    for uid, text, wave in waves:
        pieces.append(wave.float())
        placed.append(Placed(uid, text, position / rate_hz, (position + wave.numel()) / rate_hz))
        position += wave.numel()
        pause()
    joined = torch.cat(pieces) if pieces else torch.zeros(0)
    return JoinedStream(speaker, joined.clamp(-1.0, 1.0), rate_hz, placed)


@dataclass(frozen=True)
class Final:
    """A final result as the scorer needs it: its text and its words with stream times."""

    text: str
    words: tuple[WordTiming, ...]


@dataclass
class Assignment:
    """The finals of one stream mapped to its utterances.

    ``hypotheses[i]``: the words assigned to utterance i, joined (its hypothesis, to score
    against its reference); ``splits``: utterances whose words came from more than one
    final; ``merges``: finals whose words went to more than one utterance; ``empty_finals``:
    finals with no text; ``stray_words``: words not within ``slack_s`` of any utterance
    (assigned to the nearest one all the same, so that they count as insertions)."""

    hypotheses: list[str]
    splits: int = 0
    merges: int = 0
    empty_finals: int = 0
    stray_words: int = 0
    finals_per_utterance: list[int] = field(default_factory=list)


def assign_finals(utterances: Sequence[Placed], finals: Sequence[Final], slack_s: float = 0.5) -> Assignment:
    """Each word of each final goes to the utterance whose span is nearest the word's middle
    (inside a span: that one); see ``Assignment``."""
    words_of: list[list[str]] = [[] for _ in utterances]
    finals_of: list[set[int]] = [set() for _ in utterances]
    out = Assignment([])
    for k, final in enumerate(finals):
        if not final.text.strip():
            out.empty_finals += 1
            continue
        targets = set()
        for word in final.words:
            middle = (word.start_s + word.end_s) / 2
            distance, i = min((_distance(middle, u), i) for i, u in enumerate(utterances))
            if distance > slack_s:
                out.stray_words += 1
            words_of[i].append(word.word)
            finals_of[i].add(k)
            targets.add(i)
        out.merges += len(targets) > 1
    out.hypotheses = [" ".join(w) for w in words_of]
    out.finals_per_utterance = [len(f) for f in finals_of]
    out.splits = sum(1 for f in finals_of if len(f) > 1)
    return out


def _distance(t: float, u: Placed) -> float:
    return max(u.start_s - t, 0.0, t - u.end_s)
