"""The torch-free in-order stage actors, ingest and decoder, and what every stage actor shares.

Each wraps the ``workers.stages`` class of the same name. These two never import torch
(a test checks ``sys.modules`` inside them): Ray imports the module that defines an actor
class, and the modules of its arguments' classes, in the actor's process, so this module,
``items``, ``placement`` and the ``workers`` modules they use stay torch-free. The feature
actor is in ``feature_actor``; the acoustic actor, which batches, in ``acoustic_actor``."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import psutil

from pipeline.streaming.items import StageItem, StateLostError, StreamOrderError
from pipeline.streaming.placement import unpacked_files
from workers.audio.ingest import IngestStage
from workers.audio.vad_gate import VadConfig
from workers.decoding.decoder import DecoderConfig
from workers.decoding.stage import DecoderStage, RecognitionResult, build_decoder, phrase_decoder_factory
from workers.model.bundle_config import load_bundle_files

#: The bundle files a decoder actor unpacks (not the model's weights).
DECODER_FILES = ("config.json", "tokens.txt", "lexicon.txt", "lm.arpa")


class _SequenceCheck:
    """Expected next sequence number per stream, for actors that Ray runs in order."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def check(self, stream_id: str, seq: int, is_last: bool = False) -> None:
        expected = self._next.get(stream_id)
        if expected is None and seq > 0:  # in-order actor: its predecessors came before, so this one restarted
            raise StateLostError(f"stream {stream_id}: got chunk {seq} of a stream this actor holds no state for (restarted after a crash)")
        if seq != (expected or 0):
            self._next.pop(stream_id, None)
            raise StreamOrderError(f"stream {stream_id}: got chunk {seq}, expected {expected}")
        if is_last:
            self._next.pop(stream_id, None)
        else:
            self._next[stream_id] = seq + 1

    def forget(self, stream_id: str) -> None:
        self._next.pop(stream_id, None)

    def stream_ids(self) -> set[str]:
        return set(self._next)


class _Introspection:
    """What a stage actor holds, for ``StageActors.stream_counts`` / ``rss_mb``."""

    stage: Any
    order: _SequenceCheck

    def held_streams(self) -> int:
        """Streams with any state in this actor (the stage's, or the order check's)."""
        return len(self.stage.stream_ids() | self.order.stream_ids())

    def rss_mb(self) -> float:
        """This actor process's resident memory, MB."""
        return process_rss_mb()


def process_rss_mb() -> float:
    """The calling process's resident memory, MB."""
    return psutil.Process().memory_info().rss / 1e6


def _each(items: list[StageItem], work: Any, drop: Any) -> list[StageItem]:
    """Run ``work(item) -> new data`` on each item in order; an item that fails (or failed
    upstream) carries its error on, and its stream's state here is dropped."""
    out = []
    t_in = time.time()
    for item in items:
        if item.error is None:
            try:
                item = dataclasses.replace(item, data=work(item))
            except Exception as exc:  # one stream's failure must not fail the others in the chain
                item = dataclasses.replace(item, data=None, error=f"{type(exc).__name__}: {exc}")
        if item.error is not None:
            with contextlib.suppress(Exception):
                drop(item.stream_id)
        out.append(dataclasses.replace(item, stage_times=item.stage_times + (t_in, time.time())))
    return out


class IngestActor(_Introspection):
    """Wraps ``IngestStage``: audio of any size and rate -> model-rate chunks (samples,)."""

    def __init__(self, target_rate_hz: int, chunk_samples: int) -> None:
        self.stage = IngestStage(target_rate_hz, chunk_samples)
        self.order = _SequenceCheck()

    def push_many(self, items: list[StageItem]) -> list[StageItem]:
        """item.data (audio, rate_hz), or None at the end -> a list of model-rate chunks."""
        return _each(items, self._push, self.drop)

    def _push(self, item: StageItem) -> list[np.ndarray]:
        # numpy, not torch, between stages: Ray serialises arrays ~20x faster than tensors
        self.order.check(item.stream_id, item.seq, item.is_last)
        if item.is_last:
            return [self.stage.finish(item.stream_id)]  # the rest (the last partial chunk)
        samples, rate_hz = item.data
        return self.stage.push(item.stream_id, samples, rate_hz)

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.finish(stream_id)


class DecoderActor(_Introspection):
    """Wraps ``DecoderStage``: log-probs (frames, num_tokens) -> partial / final results.
    Each item's ``options`` (a ``StreamOptions`` or None) go to the stage; phrase-list
    decoders are built from what the bundle held (``phrase_decoder_factory`` reads no bundle
    file, so it works after the unpacked bundle directory is gone). Reads the bundle's
    settings and decoder files only (``load_bundle_files``), never its model."""

    def __init__(
        self, bundle_files: dict[str, bytes], decoder_config: DecoderConfig, endpoint_silence_ms: float, vad: VadConfig | None = None
    ) -> None:
        vad = vad or VadConfig()
        with unpacked_files(bundle_files, DECODER_FILES) as path:
            bundle = load_bundle_files(path)
            self.stage = DecoderStage(
                build_decoder(bundle, decoder_config),
                endpoint_silence_ms,
                vad.gate_pad_ms,
                phrase_decoder_factory(bundle, decoder_config),
            )
        self.order = _SequenceCheck()

    def push_many(self, decoder: int, *parts: list[StageItem]) -> list[StageItem]:
        """item.data: log-probs (frames, num_tokens) -> ``list[RecognitionResult]``, for the
        items of this decoder actor's streams (``item.decoder == decoder``) in ``parts`` (the
        outputs of the acoustic actors)."""
        items = sorted((i for part in parts for i in part if i.decoder == decoder), key=lambda i: (i.stream_id, i.seq))
        return _each(items, self._push, self.drop)

    def _push(self, item: StageItem) -> list[RecognitionResult]:
        self.order.check(item.stream_id, item.seq, item.is_last)
        # a copy: the stage keeps an utterance's log-probs, and a view would pin the buffer
        # of the whole chain's result that Ray deserialised it from
        log_probs = np.array(item.data, dtype=np.float32)
        return self.stage.push(item.stream_id, log_probs, item.is_last, item.speech, item.options, item.events)

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.drop(stream_id)
