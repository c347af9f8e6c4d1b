"""Waveform augmentation in the Ray Data feed of `asr train --workers N` (``pipeline.training.data``),
Ray-free: the map function degrades a share of the utterances, drawn per utterance and epoch, with
the run's simulated rooms; the same utterance in the same epoch gets the same draw on any worker."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.training.data import augment_spec, raw_mfcc_batch, room_pool, utterance_seed
from workers.data.corpus import read_an4
from workers.features.mfcc import FeatureConfig
from workers.training.trainer import TrainConfig

AN4 = Path(__file__).resolve().parents[4] / "shared" / "data" / "an4"
FEATURES_JSON = '{"sample_rate_hz": 16000}'
pytestmark = pytest.mark.skipif(not AN4.is_dir(), reason="needs ../shared/data/an4")


@pytest.fixture(scope="module")
def batch() -> dict:
    utts = read_an4(AN4).utterances[:6]
    return {"audio": [u.audio for u in utts], "text": [u.text for u in utts], "index": list(range(len(utts)))}


@pytest.fixture(scope="module")
def cfg() -> TrainConfig:
    return TrainConfig(augment_prob=1.0, augment_rir_pool_size=2, seed=7)


def _mfcc(batch: dict, spec: dict | None, speed: float = 1.0) -> tuple[list[np.ndarray], np.ndarray]:
    out = raw_mfcc_batch(batch, FEATURES_JSON, speed, spec)
    return out["mfcc"], out["augmented"]


def test_augmented_rows_differ_from_clean_and_repeat_for_the_same_epoch(batch, cfg) -> None:
    rate = FeatureConfig().sample_rate_hz
    rirs = room_pool(cfg, rate)
    assert len(rirs) == 2
    clean, none = _mfcc(batch, None)
    assert not none.any()
    spec = augment_spec(cfg, 1, rate, rirs)
    first, flags = _mfcc(batch, spec)
    assert flags.all()
    assert [m.shape for m in first] == [m.shape for m in clean]  # the degradations keep the length
    assert all(not np.allclose(a, b) for a, b in zip(first, clean))
    again, _ = _mfcc(batch, spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other_epoch, _ = _mfcc(batch, augment_spec(cfg, 2, rate, rirs))
    assert any(not np.allclose(a, b) for a, b in zip(first, other_epoch))
    assert augment_spec(replace(cfg, augment_prob=0.0), 1, rate, rirs) is None


def test_the_share_augmented_is_drawn_per_utterance_and_epoch(batch, cfg) -> None:
    rate = FeatureConfig().sample_rate_hz
    half = replace(cfg, augment_prob=0.5)
    rirs = room_pool(half, rate)
    for epoch in (1, 2, 3):
        _, flags = _mfcc(batch, augment_spec(half, epoch, rate, rirs), speed=1.1)
        expected = [random.Random(utterance_seed(half.seed, epoch, a)).random() < 0.5 for a in batch["audio"]]
        assert flags.tolist() == expected
    # the draw of an utterance does not depend on the batch it is computed in
    single = {k: v[2:3] for k, v in batch.items()}
    _, flags = _mfcc(single, augment_spec(half, 1, rate, rirs))
    assert flags[0] == (random.Random(utterance_seed(half.seed, 1, batch["audio"][2])).random() < 0.5)
