"""The feature actor: model-rate audio -> MFCC and voice activity flags (torch: MFCC and
silero-vad), in order like the torch-free actors in ``actors``, whose helpers it shares.
torch is imported inside the actor, not at the top: the stream driver imports this module to
start the actor and stays torch-free."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING

from pipeline.streaming.actors import _Introspection, _SequenceCheck
from pipeline.streaming.items import StageItem, _tensor
from pipeline.streaming.placement import unpacked_bundle
from workers.audio.vad_gate import VadConfig

if TYPE_CHECKING:
    import torch

    from workers.stages import FeaturePush


class FeatureActor(_Introspection):
    """Wraps ``FeatureStage``: model-rate chunks -> normalised stacked MFCC (frames, feature_dim)."""

    def __init__(self, bundle_files: dict[str, bytes], vad: VadConfig | None = None, endpoint_silence_ms: float = 0.0) -> None:
        from workers.audio.vad import speech_detector
        from workers.features.mfcc import MfccExtractor
        from workers.stages import FeatureStage

        vad = vad or VadConfig()
        with unpacked_bundle(bundle_files) as bundle:
            self.stage = FeatureStage(MfccExtractor(bundle.features, bundle.normalizer), speech_detector(vad, bundle.features.sample_rate_hz),
                                      endpoint_silence_ms)
            self.feature_dim = bundle.features.feature_dim
        self.order = _SequenceCheck()

    def push_many(self, items: list[StageItem], features: int = 0) -> list[StageItem]:
        """item.data: model-rate waves, each (samples,) -> their features (frames, feature_dim);
        item.speech: their voice activity flags (windows,); for the items of this feature
        actor's streams (``item.features == features``). The items' streams go through the
        stage together (``FeatureStage.push_many``: one voice activity batch per window
        position), in rounds of one item per stream; an item that fails fails alone."""
        import torch

        mine = [i for i in items if i.features == features]
        t_in = time.time()
        waves: dict[int, torch.Tensor] = {}
        for k, item in enumerate(mine):
            if item.error is not None:  # failed upstream: this stream's state here goes too
                with contextlib.suppress(Exception):
                    self.drop(item.stream_id)
            else:
                try:
                    self.order.check(item.stream_id, item.seq, item.is_last)
                    waves[k] = torch.cat([_tensor(c) for c in item.data]) if item.data else torch.zeros(0)
                except Exception as exc:  # noqa: BLE001 - this stream's item only
                    mine[k] = self._failed(item, exc)
        results: dict[int, FeaturePush] = {}
        pending = list(waves)
        while pending:
            streams: set[str] = set()
            batch = [k for k in pending if not (mine[k].stream_id in streams or streams.add(mine[k].stream_id))]
            pending = [k for k in pending if k not in batch]
            try:
                done = dict(zip(batch, self.stage.push_many([(mine[k].stream_id, waves[k]) for k in batch],
                                                            [mine[k].is_last for k in batch])))
            except Exception:  # noqa: BLE001 - find the item that fails: each alone (nothing was applied)
                done = {}
                for k in batch:
                    try:
                        done[k] = self.stage.push_many([(mine[k].stream_id, waves[k])], [mine[k].is_last])[0]
                    except Exception as exc:  # noqa: BLE001
                        mine[k] = self._failed(mine[k], exc)
            results.update(done)
        t_out = time.time()
        return [dataclasses.replace(item, data=results[k].features.numpy(), speech=results[k].speech.numpy(),
                                    events=tuple(results[k].events), stage_times=item.stage_times + (t_in, t_out))
                if k in results else dataclasses.replace(item, stage_times=item.stage_times + (t_in, t_out))
                for k, item in enumerate(mine)]

    def _failed(self, item: StageItem, exc: Exception) -> StageItem:
        """The item carrying its error on; its stream's state here is dropped."""
        with contextlib.suppress(Exception):
            self.drop(item.stream_id)
        return dataclasses.replace(item, data=None, error=f"{type(exc).__name__}: {exc}")

    def drop(self, stream_id: str) -> None:
        self.order.forget(stream_id)
        self.stage.drop(stream_id)
