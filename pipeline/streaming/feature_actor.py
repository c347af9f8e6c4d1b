"""The feature actor: model-rate audio -> MFCC and voice activity flags (torch: MFCC and
silero-vad), in order like the torch-free actors in ``actors``, whose helpers it shares."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.streaming.actors import _each, _Introspection, _SequenceCheck
from pipeline.streaming.items import StageItem, _tensor
from pipeline.streaming.placement import unpacked_bundle
from workers.features import MfccExtractor
from workers.stages import FeatureStage
from workers.vad import VadConfig, speech_detector


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
