"""int8 dynamic quantisation (``inference.quantize=int8``): agreement with the float model on
held-out AN4 speech, streaming == offline chunked exactness, and the setting's range check."""

from __future__ import annotations

import jiwer
import pytest
import torch

from pipeline.config import ConfigError, load_config
from workers.bundle import DEFAULT_BUNDLE, load_bundle
from workers.corpus import read_an4
from workers.decoder import DecoderConfig
from workers.model import quantize_model
from workers.recognizer import Recognizer, frames_for_ms
from workers.stages import AcousticStage

needs_model = pytest.mark.skipif(not (DEFAULT_BUNDLE / "config.json").is_file(), reason="no shipped model in models/default")

# Tolerances of int8 vs float log-probs on held-out speech (observed on these 8 files with
# the shipped model: max |diff| 0.57 overall, 0.46 where the float probability > 1 %, max
# probability difference 0.12, argmax agreement >= 98.3 % per file, 99.8 % over all).
MAX_ABS_LOGPROB_DIFF = 1.0  # over all frames and tokens
MAX_ABS_LOGPROB_DIFF_LIKELY = 0.75  # where the float model gives the token > 1 %
MAX_PROB_DIFF = 0.2
MIN_ARGMAX_AGREEMENT = 0.99  # over all frames of the files
MIN_ARGMAX_AGREEMENT_PER_FILE = 0.95


@pytest.fixture(scope="module")
def held_out(an4_root):
    speakers = load_config().data.an4_dev_speakers
    utts = [u for u in read_an4(an4_root).utterances if u.speaker in speakers]
    return utts[::13][:8]  # spread over the held-out speakers


@pytest.fixture(scope="module")
def recognizers():
    beam = DecoderConfig(kind="beam")
    float_rec = Recognizer(None, beam, device="cpu")
    return float_rec, Recognizer(None, beam, device="cpu", quantize="int8")


@pytest.fixture(scope="module")
def features(held_out, recognizers):
    return [recognizers[0].features(u.audio) for u in held_out]


@needs_model
def test_int8_log_probs_agree_with_float_on_held_out_speech(recognizers, features):
    float_rec, int8_rec = recognizers
    assert int8_rec.bundle.quantize == "int8" and int8_rec.bundle.model.row_wise
    assert type(int8_rec.bundle.model.forward_lstms[0]).__name__ == "LSTM" and "quantized" in type(int8_rec.bundle.model.forward_lstms[0]).__module__
    a = float_rec.acoustic.offline(features)
    b = int8_rec.acoustic.offline(features)
    agree = total = 0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        diff = (x - y).abs()
        assert diff.max() <= MAX_ABS_LOGPROB_DIFF
        assert diff[x.exp() > 0.01].max() <= MAX_ABS_LOGPROB_DIFF_LIKELY
        assert (x.exp() - y.exp()).abs().max() <= MAX_PROB_DIFF
        same = (x.argmax(-1) == y.argmax(-1)).sum().item()
        assert same / len(x) >= MIN_ARGMAX_AGREEMENT_PER_FILE
        agree, total = agree + same, total + len(x)
    assert agree / total >= MIN_ARGMAX_AGREEMENT


@needs_model
def test_int8_transcripts_match_float_on_held_out_speech(recognizers, features):
    """Beam search with the bundle's lexicon and LM, as ``asr`` runs by default: 7 of the 8
    transcripts are identical; one borderline file (cen8-mmkw-b) reads "seventy r t" in int8
    where float reads "seventy eight" (2 word edits), so at most 3 word edits in all are allowed."""
    float_rec, int8_rec = recognizers
    float_texts = [t for t, _ in float_rec.transcribe_features(features)]
    int8_texts = [t for t, _ in int8_rec.transcribe_features(features)]
    assert all(float_texts)
    assert sum(a == b for a, b in zip(float_texts, int8_texts)) >= len(features) - 1
    edits = jiwer.process_words(float_texts, int8_texts)
    assert edits.substitutions + edits.deletions + edits.insertions <= 3


@needs_model
def test_int8_streaming_equals_int8_offline_chunked(recognizers, features):
    """Dynamic quantisation scales each tensor by its range, so the model runs each stream's
    windows alone (``row_wise``): streaming, in small pushes and with other streams batched
    alongside, gives exactly the offline chunked output of a padded batch."""
    model = recognizers[1].bundle.model
    frame_ms = recognizers[1].bundle.features.frame_ms
    chunk, rc = frames_for_ms(300, frame_ms), frames_for_ms(150, frame_ms)
    feats = features[:4]
    lengths = torch.tensor([len(f) for f in feats])
    with torch.no_grad():
        offline = model(torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths, chunk, rc)
    stage = AcousticStage(model, chunk, rc)
    streamed: list[list[torch.Tensor]] = [[] for _ in feats]
    push = 4  # frames per push (about what 100 ms of audio gives)
    for start in range(0, int(lengths.max()), push):
        items = [(f"s{i}", f[start : start + push], start + push >= len(f)) for i, f in enumerate(feats) if start < len(f)]
        for (sid, _, _), out in zip(items, stage.process(items)):
            streamed[int(sid[1:])].append(out)
    for i, f in enumerate(feats):
        assert torch.equal(torch.cat(streamed[i]), offline[i, : len(f)])


@needs_model
def test_int8_chunked_forward_equals_window_by_window(recognizers, features):
    model = recognizers[1].bundle.model
    feats = features[:3]
    x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    lengths = torch.tensor([len(f) for f in feats])
    with torch.no_grad():
        batched = model(x, lengths, 10, 5)
        for i, f in enumerate(feats):  # alone, unpadded: the same numbers
            assert torch.equal(model(f[None], lengths[i : i + 1], 10, 5)[0], batched[i, : len(f)])


def test_quantize_setting_is_range_checked(tiny_bundle):
    assert load_config().inference.quantize == "none"
    assert load_config(overrides=["inference.quantize=int8"]).inference.quantize == "int8"
    for bad in ("int4", "fp16", "INT8"):
        with pytest.raises(ConfigError, match="inference.quantize must be one of none, int8"):
            load_config(overrides=[f"inference.quantize={bad}"])
    with pytest.raises(ConfigError, match="inference.quantize: expected str"):
        load_config(overrides=["inference.quantize=true"])
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_bundle(tiny_bundle, quantize="int4")
    bundle = load_bundle(tiny_bundle, quantize="int8")
    assert bundle.quantize == "int8" and bundle.model.row_wise
    assert load_bundle(tiny_bundle).quantize == "none"


def test_int8_is_ignored_with_a_warning_off_the_cpu(tiny_bundle):
    """What a CUDA device gets (checked here on the "meta" device, which every machine has)."""
    with pytest.warns(UserWarning, match="ignored on meta: dynamic int8 quantisation runs on the CPU only"):
        bundle = load_bundle(tiny_bundle, device="meta", quantize="int8")
    assert bundle.quantize == "none" and not bundle.model.row_wise


def test_quantize_model_none_is_the_model_itself(tiny_bundle):
    model = load_bundle(tiny_bundle).model
    assert quantize_model(model, "none") is model and not model.row_wise


def test_int8_transcripts_are_redone_not_resumed(tiny_bundle):
    """``asr transcribe`` into an output folder made with the float model redoes the files with int8."""
    from pipeline.batch import run_settings

    config = load_config()
    plain = run_settings(str(tiny_bundle), config.decoder, None, 0.0, config.vad)
    assert "quantize" not in plain  # records from before the setting still match
    assert run_settings(str(tiny_bundle), config.decoder, None, 0.0, config.vad, "int8") == {**plain, "quantize": "int8"}
