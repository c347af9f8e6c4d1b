"""int8 dynamic quantisation and bfloat16 (``inference.quantize=int8|bf16``): agreement with
the float model on held-out AN4 speech, streaming against offline chunked output, and the
setting's range check."""

from __future__ import annotations

import jiwer
import pytest
import torch

from pipeline.config import ConfigError, load_config
from workers.data.corpus import read_an4
from workers.decoding.decoder import DecoderConfig
from workers.model.bilstm import quantize_model
from workers.model.bundle import DEFAULT_BUNDLE, load_bundle
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


# bfloat16 against float on the same files (observed: max |diff| 0.21, 0.087 where the float
# probability > 1 %, probability difference 0.012, argmax agreement >= 99.2 % per file,
# 99.8 % over all; all 8 beam + LM transcripts identical).
BF16_TOLERANCES = dict(max_diff=0.5, max_diff_likely=0.25, max_prob_diff=0.05, min_agreement_per_file=0.98, min_agreement=0.99)


def assert_close_to_float(float_out: list[torch.Tensor], other_out: list[torch.Tensor], max_diff: float, max_diff_likely: float,
                          max_prob_diff: float, min_agreement_per_file: float, min_agreement: float) -> None:
    """Per-file log-probs (frames, tokens) of another number format against float's."""
    agree = total = 0
    for x, y in zip(float_out, other_out, strict=True):
        assert x.shape == y.shape and y.dtype == torch.float32
        diff = (x - y).abs()
        assert diff.max() <= max_diff
        assert diff[x.exp() > 0.01].max() <= max_diff_likely
        assert (x.exp() - y.exp()).abs().max() <= max_prob_diff
        same = (x.argmax(-1) == y.argmax(-1)).sum().item()
        assert same / len(x) >= min_agreement_per_file
        agree, total = agree + same, total + len(x)
    assert agree / total >= min_agreement


@needs_model
def test_int8_log_probs_agree_with_float_on_held_out_speech(recognizers, features):
    float_rec, int8_rec = recognizers
    assert int8_rec.bundle.quantize == "int8" and int8_rec.bundle.model.row_wise
    assert type(int8_rec.bundle.model.forward_lstms[0]).__name__ == "LSTM" and "quantized" in type(int8_rec.bundle.model.forward_lstms[0]).__module__
    assert_close_to_float(float_rec.acoustic.offline(features), int8_rec.acoustic.offline(features), MAX_ABS_LOGPROB_DIFF,
                          MAX_ABS_LOGPROB_DIFF_LIKELY, MAX_PROB_DIFF, MIN_ARGMAX_AGREEMENT_PER_FILE, MIN_ARGMAX_AGREEMENT)


@pytest.fixture(scope="module")
def bf16_recognizer():
    return Recognizer(None, DecoderConfig(kind="beam"), device="cpu", quantize="bf16")


@needs_model
def test_bf16_log_probs_and_transcripts_agree_with_float_on_held_out_speech(recognizers, bf16_recognizer, features):
    float_rec = recognizers[0]
    model = bf16_recognizer.bundle.model
    assert bf16_recognizer.bundle.quantize == "bf16" and not model.row_wise
    assert next(model.parameters()).dtype == torch.bfloat16
    assert_close_to_float(float_rec.acoustic.offline(features), bf16_recognizer.acoustic.offline(features), **BF16_TOLERANCES)
    float_texts = [t for t, _ in float_rec.transcribe_features(features)]
    bf16_texts = [t for t, _ in bf16_recognizer.transcribe_features(features)]
    edits = jiwer.process_words(float_texts, bf16_texts)
    assert all(float_texts) and edits.substitutions + edits.deletions + edits.insertions <= 1


@needs_model
def test_bf16_streaming_agrees_with_offline_chunked(bf16_recognizer, features):
    """bfloat16 kernels round differently for different batch shapes, so streaming (small
    pushes, other streams batched alongside) is not bit-equal to offline chunked output as in
    float: it agrees within bf16's rounding (observed max |diff| 0.25, argmax all equal)."""
    model = bf16_recognizer.bundle.model
    frame_ms = bf16_recognizer.bundle.features.frame_ms
    feats = features[:4]
    offline = [model(f[None], torch.tensor([len(f)]), frames_for_ms(300, frame_ms), frames_for_ms(150, frame_ms))[0] for f in feats]
    streamed = _stream_through_acoustic_stage(model, feats, frame_ms)
    assert_close_to_float(offline, streamed, **BF16_TOLERANCES)


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
    for i, (f, streamed) in enumerate(zip(feats, _stream_through_acoustic_stage(model, feats, frame_ms))):
        assert torch.equal(streamed, offline[i, : len(f)])


def _stream_through_acoustic_stage(model, feats: list[torch.Tensor], frame_ms: float) -> list[torch.Tensor]:
    """Each (frames, dim) utterance as a stream of 4-frame pushes (about what 100 ms of audio
    gives), all streams batched in one ``AcousticStage`` at 300 + 150 ms: log-probs per stream."""
    stage = AcousticStage(model, frames_for_ms(300, frame_ms), frames_for_ms(150, frame_ms))
    streamed: list[list[torch.Tensor]] = [[] for _ in feats]
    push = 4
    for start in range(0, max(len(f) for f in feats), push):
        items = [(f"s{i}", f[start : start + push], start + push >= len(f)) for i, f in enumerate(feats) if start < len(f)]
        for (sid, _, _), out in zip(items, stage.process(items)):
            streamed[int(sid[1:])].append(out)
    return [torch.cat(parts) for parts in streamed]


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
    assert load_config(overrides=["inference.quantize=bf16"]).inference.quantize == "bf16"
    for bad in ("int4", "fp16", "INT8"):
        with pytest.raises(ConfigError, match="inference.quantize must be one of none, int8, bf16"):
            load_config(overrides=[f"inference.quantize={bad}"])
    with pytest.raises(ConfigError, match="inference.quantize: expected str"):
        load_config(overrides=["inference.quantize=true"])
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_bundle(tiny_bundle, quantize="int4")
    bundle = load_bundle(tiny_bundle, quantize="int8")
    assert bundle.quantize == "int8" and bundle.model.row_wise
    bundle = load_bundle(tiny_bundle, quantize="bf16")
    assert bundle.quantize == "bf16" and bundle.model.autocast_dtype == torch.bfloat16
    assert load_bundle(tiny_bundle).quantize == "none"


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantize_is_ignored_with_a_warning_off_the_cpu(tiny_bundle, mode):
    """What a CUDA device gets (checked here on the "meta" device, which every machine has)."""
    with pytest.warns(UserWarning, match=f"quantize='{mode}' ignored on meta: it runs on the CPU only"):
        bundle = load_bundle(tiny_bundle, device="meta", quantize=mode)
    assert bundle.quantize == "none" and not bundle.model.row_wise and bundle.model.autocast_dtype is None


def test_quantize_model_none_is_the_model_itself(tiny_bundle):
    model = load_bundle(tiny_bundle).model
    assert quantize_model(model, "none") is model and not model.row_wise


def test_int8_transcripts_are_redone_not_resumed(tiny_bundle):
    """``asr transcribe`` into an output folder made with the float model redoes the files with int8."""
    from pipeline.batch.job import run_settings

    config = load_config()
    plain = run_settings(str(tiny_bundle), config.decoder, None, 0.0, config.vad)
    assert "quantize" not in plain  # records from before the setting still match
    assert run_settings(str(tiny_bundle), config.decoder, None, 0.0, config.vad, "int8") == {**plain, "quantize": "int8"}
