"""What travels between the stage actors: ``StageItem`` (one push of one stream), the errors
of a stream, and the array conversion the torch actors share. Torch-free: the ingest and
decoder actors import this module and never load torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class StreamError(RuntimeError):
    """Remote work of one stream failed; the stream has been dropped from every stage."""


class StreamOrderError(RuntimeError):
    """A stage actor got a stream's calls out of order, or lost its state (actor restart)."""


class StateLostError(StreamOrderError):
    """A stage actor no longer holds the stream's state: it restarted after a crash. The
    driver replays the stream's audio on the restarted actors."""


@dataclass
class StageItem:
    """One push of one stream on its way through the stages of a chain.

    ``data`` is the stage's input and, after it, its output: (audio, rate_hz) for ingest
    (None at the end of the stream), model-rate chunks for features, features (frames,
    feature_dim) for the acoustic model, log-probs (frames, num_tokens) for the decoder,
    and the decoder's ``list[RecognitionResult]``. Arrays travel as numpy float32, which
    Ray serialises far faster than torch tensors. ``error`` is set when a stage failed on
    this item; later stages pass it on untouched and forget the stream.
    """

    stream_id: str
    seq: int
    is_last: bool
    data: Any = None
    error: str | None = None
    speech: Any = None  # voice activity flags (windows,) bool of this push's audio, from the feature actor
    features: int = 0  # which feature actor keeps this stream's state
    acoustic: int = 0  # which acoustic actor keeps this stream's state
    decoder: int = 0  # which decoder actor keeps this stream's state
    acoustic_epoch: str = ""  # the acoustic actor's incarnation the driver expects (a restarted one has another)
    stage_times: tuple[float, ...] = ()  # time.time() at entry to and exit from each stage so far
    options: Any = None  # the stream's workers.stages.StreamOptions (None: the decoder's defaults), for the decoder actor
    events: tuple = ()  # utterance edges (index into data, "start"/"end", time_s), from the feature actor on


def _tensor(array: np.ndarray) -> Any:
    """A writable float32 torch tensor from an array Ray handed over (those are read-only views).
    For the feature and acoustic actors, which hold torch anyway; imported here, on use, so
    that this module stays torch-free."""
    import torch

    return torch.from_numpy(np.array(array, dtype=np.float32))
