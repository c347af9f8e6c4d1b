"""The in-order stage actors: ingest, features and decoder (the acoustic actor, which
batches, is in ``acoustic_actor``). Each wraps the ``workers.stages`` class of the same name."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import psutil
import torch

from pipeline.streaming.items import StageItem, StateLostError, StreamOrderError, _tensor
from pipeline.streaming.placement import unpacked_bundle
from workers.decoder import DecoderConfig
from workers.features import MfccExtractor
from workers.recognizer import build_decoder, phrase_decoder_factory
from workers.stages import DecoderStage, FeatureStage, IngestStage, RecognitionResult
from workers.vad import VadConfig, speech_detector


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
            return [self.stage.finish(item.stream_id).numpy()]  # the last (partial) chunk
        samples, rate_hz = item.data
        return [c.numpy() for c in self.stage.push(item.stream_id, samples, rate_hz)]

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.finish(stream_id)


class FeatureActor(_Introspection):
    """Wraps ``FeatureStage``: model-rate chunks -> normalised stacked MFCC (frames, feature_dim)."""

    def __init__(self, bundle_files: dict[str, bytes], vad: VadConfig | None = None) -> None:
        vad = vad or VadConfig()
        with unpacked_bundle(bundle_files) as bundle:
            self.stage = FeatureStage(MfccExtractor(bundle.features, bundle.normalizer), speech_detector(vad, bundle.features.sample_rate_hz))
            self.feature_dim = bundle.features.feature_dim
        self.order = _SequenceCheck()

    def push_many(self, items: list[StageItem], features: int = 0) -> list[StageItem]:
        """item.data: model-rate waves, each (samples,) -> their features (frames, feature_dim);
        item.speech: their voice activity flags (windows,); for the items of this feature
        actor's streams (``item.features == features``)."""
        out = _each([i for i in items if i.features == features], self._push, self.drop)
        return [dataclasses.replace(i, data=i.data[0], speech=i.data[1]) if i.error is None else i for i in out]

    def _push(self, item: StageItem) -> tuple[np.ndarray, np.ndarray]:
        self.order.check(item.stream_id, item.seq, item.is_last)
        pieces = [self.stage.push(item.stream_id, _tensor(c)) for c in item.data]
        if item.is_last:
            pieces.append(self.stage.finish(item.stream_id))
        feats = torch.cat([f for f, _ in pieces]) if pieces else torch.zeros(0, self.feature_dim)
        speech = torch.cat([s for _, s in pieces]) if pieces else torch.zeros(0, dtype=torch.bool)
        return feats.numpy(), speech.numpy()

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.drop(stream_id)


class DecoderActor(_Introspection):
    """Wraps ``DecoderStage``: log-probs (frames, num_tokens) -> partial / final results.
    Each item's ``options`` (a ``StreamOptions`` or None) go to the stage; phrase-list
    decoders are built from what the bundle held (``phrase_decoder_factory`` reads no bundle
    file, so it works after the unpacked bundle directory is gone)."""

    def __init__(
        self, bundle_files: dict[str, bytes], decoder_config: DecoderConfig, endpoint_silence_ms: float, vad: VadConfig | None = None
    ) -> None:
        vad = vad or VadConfig()
        with unpacked_bundle(bundle_files) as bundle:
            self.stage = DecoderStage(
                build_decoder(bundle, decoder_config),
                endpoint_silence_ms,
                vad.gate_pad_ms,
                phrase_decoder_factory(bundle, decoder_config),
            )
            self.num_tokens = bundle.model_config.num_tokens
        self.order = _SequenceCheck()

    def push_many(self, decoder: int, *parts: list[StageItem]) -> list[StageItem]:
        """item.data: log-probs (frames, num_tokens) -> ``list[RecognitionResult]``, for the
        items of this decoder actor's streams (``item.decoder == decoder``) in ``parts`` (the
        outputs of the acoustic actors)."""
        items = sorted((i for part in parts for i in part if i.decoder == decoder), key=lambda i: (i.stream_id, i.seq))
        return _each(items, self._push, self.drop)

    def _push(self, item: StageItem) -> list[RecognitionResult]:
        self.order.check(item.stream_id, item.seq, item.is_last)
        speech = None if item.speech is None else torch.from_numpy(np.array(item.speech, dtype=bool))
        return self.stage.push(item.stream_id, _tensor(item.data), item.is_last, speech, item.options)

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.drop(stream_id)
