"""The shipped model recognises real held-out speech (AN4 dev speakers, never trained on)."""

from __future__ import annotations

import jiwer
import pytest
import torch
from conftest import emissions

from pipeline.config import load_config
from workers.data.corpus import read_an4
from workers.decoding.decoder import DecoderConfig
from workers.model.bundle import DEFAULT_BUNDLE, load_bundle
from workers.recognizer import Recognizer, StreamingRecognizer

pytestmark = pytest.mark.skipif(not (DEFAULT_BUNDLE / "config.json").is_file(), reason="no shipped model in models/default yet")


@pytest.fixture(scope="module")
def held_out(an4_root):
    speakers = load_config().data.an4_dev_speakers
    utts = [u for u in read_an4(an4_root).utterances if u.speaker in speakers]
    return utts[::8]  # a handful, spread over the held-out speakers


def test_shipped_bundle_is_complete():
    bundle = load_bundle()
    assert bundle.path == DEFAULT_BUNDLE
    assert bundle.lexicon_path is not None and bundle.lm_path is not None
    assert sum(f.stat().st_size for f in DEFAULT_BUNDLE.iterdir()) <= 25 * 1024 * 1024
    trained_on = set(bundle.info.get("train_speakers", []))
    assert trained_on and not trained_on & set(load_config().data.an4_dev_speakers)


@pytest.mark.parametrize("kind,max_wer", [("beam", 0.25), ("greedy", 0.45)])
def test_offline_wer_on_held_out_speakers(held_out, kind, max_wer):
    rec = Recognizer(None, DecoderConfig(kind=kind))
    hyps = [rec.transcribe_file(u.audio).text for u in held_out]
    wer = jiwer.wer([u.text for u in held_out], hyps)
    assert wer <= max_wer, list(zip([u.text for u in held_out], hyps))


def test_streaming_wer_on_held_out_speakers(held_out):
    import numpy as np

    from workers.audio.reader import read_audio

    rec = StreamingRecognizer(None, DecoderConfig(kind="beam"), chunk_ms=300, lookahead_ms=150)
    hyps = []
    for u in held_out:
        samples, rate = read_audio(u.audio)
        for start in range(0, len(samples), 1600):
            rec.push(np.ascontiguousarray(samples[start : start + 1600, 0]), rate)
        hyps.append(" ".join(r.text for r in rec.finish() if r.is_final))
    assert jiwer.wer([u.text for u in held_out], hyps) <= 0.3


def _spelled(text: str) -> torch.Tensor:
    """``(frames, 29)`` log-probs that spell ``text`` one character per frame (``|`` between
    words, a blank between repeated letters), 1e-4 spread over the other tokens."""
    frames: list[str] = ["-"]
    for char in text.replace(" ", "|"):
        if frames[-1] == char:
            frames.append("-")
        frames.append(char)
    return emissions([*frames, "-"])


def test_shipped_vocabulary_is_english_beyond_the_training_texts():
    """The shipped lexicon spells common English words that no training transcript has (the CMU
    dictionary's most frequent, data.dictionary_max_words), and its beam search + LM decodes them
    when the acoustic evidence spells them; AN4's spelled letters stay letters. (The acoustic model
    itself does not spell such words yet: models/README.md.)"""
    from workers.decoding.stage import build_decoder

    bundle = load_bundle()
    lexicon = {line.split("\t")[0] for line in bundle.lexicon_path.read_text(encoding="utf-8").splitlines()}
    assert len(lexicon) >= load_config().data.dictionary_max_words
    beyond = ["weather", "information", "university", "didn't"]
    assert set(beyond) <= lexicon
    decoder = build_decoder(bundle, DecoderConfig(kind="beam"))
    for word in beyond:
        assert decoder.decode(_spelled(f"the {word}")).text == f"the {word}"
    assert decoder.decode(_spelled("b e e")).text == "b e e"
