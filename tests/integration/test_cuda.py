"""The GPU path: the shipped acoustic model on CUDA gives what it gives on the CPU, in-process
(whole utterances and chunked streaming), through the Ray streaming actors and through the
Ray Data batch job, on real held-out AN4 speech.

Skipped where torch sees no CUDA device (CI has none); ``scripts/ops/gpu_check.sh`` runs them on a
GPU machine. On GPUs, cuDNN's LSTM may use TF32 matrix products, so log-probabilities are
compared within 0.05 (natural log) and the argmax within 99.5 % of frames; transcripts must be
identical.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import ray
import torch

from pipeline.config import AppConfig
from workers.audio.reader import load_audio
from workers.data.corpus import read_an4, split_by_speaker
from workers.recognizer import Recognizer, StreamingRecognizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")

CONFIG = AppConfig()
RATE_HZ = CONFIG.features.sample_rate_hz
LOGP_TOLERANCE = 0.05
ARGMAX_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def dev_files(an4_root) -> list[str]:
    """Eight utterances of held-out AN4 speakers (never trained on)."""
    _, dev = split_by_speaker(read_an4(an4_root).utterances, CONFIG.data.an4_dev_speakers)
    return [u.audio for u in sorted(dev, key=lambda u: u.id)[::12][:8]]


@pytest.fixture(scope="module")
def recognizers() -> tuple[Recognizer, Recognizer]:
    return Recognizer(None, device="cpu"), Recognizer(None, device="cuda")


def test_model_runs_on_cuda_and_matches_cpu(recognizers, dev_files) -> None:
    cpu, gpu = recognizers
    assert next(gpu.bundle.model.parameters()).is_cuda
    features = [cpu.features(f) for f in dev_files]
    agree = total = 0
    for a, b in zip(cpu.acoustic.offline(features), gpu.acoustic.offline(features)):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < LOGP_TOLERANCE
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
    assert agree / total >= ARGMAX_AGREEMENT
    cpu_texts = [cpu.transcribe_file(f).text for f in dev_files]
    assert all(cpu_texts)  # real speech: every file has words
    assert [gpu.transcribe_file(f).text for f in dev_files] == cpu_texts


def _stream(rec: StreamingRecognizer, wave: np.ndarray, piece: int = 1600) -> list[str]:
    results = [r for start in range(0, len(wave), piece) for r in rec.push(wave[start : start + piece], RATE_HZ)]
    return [r.text for r in results + rec.finish() if r.is_final]


def test_chunked_streaming_on_cuda_matches_cpu(dev_files) -> None:
    s = CONFIG.streaming
    kwargs = {"chunk_ms": s.chunk_ms, "lookahead_ms": s.lookahead_ms, "endpoint_silence_ms": s.endpoint_silence_ms}
    for f in dev_files[:4]:
        wave = load_audio(f, RATE_HZ).numpy()
        cpu_finals = _stream(StreamingRecognizer(None, device="cpu", **kwargs), wave)
        assert cpu_finals and any(cpu_finals)
        assert _stream(StreamingRecognizer(None, device="cuda", **kwargs), wave) == cpu_finals


@pytest.fixture(scope="module")
def gpu_ray():
    ray.init(num_cpus=min(8, os.cpu_count() or 1), num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def test_streaming_actors_put_the_model_on_the_gpu_and_match_cpu(gpu_ray, dev_files) -> None:
    from pipeline.streaming import StreamingPipeline

    s = CONFIG.streaming
    pipe = StreamingPipeline(CONFIG, None)
    try:
        assert len(pipe._acoustics) == 1  # one GPU actor batches every stream
        assert ray.get(pipe._acoustics[0].device.remote()).startswith("cuda")
        waves = [load_audio(f, RATE_HZ).numpy() for f in dev_files[:4]]
        ids = [pipe.open_stream() for _ in waves]
        got: dict[str, list] = {i: [] for i in ids}
        piece = int(RATE_HZ * 0.1)
        for start in range(0, max(len(w) for w in waves), piece):  # the streams interleaved, 100 ms pushes
            for i, w in zip(ids, waves):
                if start < len(w):
                    got[i] += pipe.push(i, w[start : start + piece], RATE_HZ)
        for i in ids:
            got[i] += pipe.close(i)
    finally:
        pipe.shutdown()
    for i, w in zip(ids, waves):
        ref = StreamingRecognizer(None, device="cpu", chunk_ms=s.chunk_ms, lookahead_ms=s.lookahead_ms,
                                  endpoint_silence_ms=s.endpoint_silence_ms, ingest_chunk_ms=s.ingest_chunk_ms)
        expected = _stream(ref, w, piece)
        assert expected and any(expected)
        assert [r.text for r in got[i] if r.is_final] == expected


def test_batch_job_shares_the_gpu_and_matches_cpu(gpu_ray, recognizers, dev_files, tmp_path) -> None:
    import json

    from pipeline.batch.job import acoustic_num_gpus, transcribe_inputs

    assert acoustic_num_gpus(1) == 1.0 and acoustic_num_gpus(4) == 0.25
    summary = transcribe_inputs(dev_files, tmp_path, concurrency=2)
    assert summary["errors"] == 0 and summary["transcribed"] == len(dev_files)
    rows = {r["path"]: r for r in map(json.loads, (tmp_path / "transcripts.jsonl").read_text().splitlines())}
    cpu, _ = recognizers
    assert [rows[str(os.path.abspath(f))]["text"] for f in dev_files] == [cpu.transcribe_file(f).text for f in dev_files]


# ---- training on the GPU (issue 15) ------------------------------------------------------------
@pytest.fixture(scope="module")
def train_examples(an4_root):
    """Real examples (normalised features + targets) of 16 held-out AN4 utterances, by length."""
    from workers.features.mfcc import MfccExtractor, Normalizer
    from workers.training.epochs import compute_raw_features, make_examples

    _, dev = split_by_speaker(read_an4(an4_root).utterances, CONFIG.data.an4_dev_speakers)
    utts = sorted(dev, key=lambda u: u.id)[::6][:16]
    raw = compute_raw_features(utts, CONFIG.features, (1.0,), None, log=lambda _: None)[1.0]
    normalizer = Normalizer.from_frames(raw)
    examples = make_examples(raw, utts, MfccExtractor(CONFIG.features, normalizer))
    return sorted(examples, key=lambda e: e.features.shape[0]), normalizer


def _train(device: str, examples, normalizer, steps: int, bf16: bool = False, random_parts: bool = True):
    """``steps`` training steps (workers.training.trainer.TrainLoop.train_step, the step of `asr train` and of
    the Ray Train loop) on two batches in turn, chunked (10 + 5 frames) and whole. -> (losses, model).
    ``random_parts=False``: no dropout and no SpecAugment masks."""
    from dataclasses import replace

    from workers.training.trainer import TrainConfig, TrainLoop, new_model

    no_masks = {} if random_parts else {"freq_mask_param": 0, "time_mask_param": 0}
    cfg = TrainConfig(warmup_steps=1, bf16=bf16, **no_masks)
    model = new_model(replace(CONFIG.model, dropout=CONFIG.model.dropout if random_parts else 0.0), seed=0)
    loop = TrainLoop(model.to(device), cfg, CONFIG.features, normalizer, torch.device(device), steps_per_epoch=steps)
    batches = [(examples[:8], 10, 5), (examples[8:], None, 0)]
    losses = [loop.train_step(*batches[i % 2]) for i in range(steps)]
    return losses, loop.module


def test_training_steps_on_cuda_match_cpu(train_examples) -> None:
    """Without the random parts (dropout, SpecAugment: the GPU draws them from another generator) and
    with TF32 off, 6 steps on CUDA follow the CPU's: each loss within 0.1 %, and the weights' difference
    is under 1 % of how far they moved."""
    examples, normalizer = train_examples
    init = {k: v.clone() for k, v in _train("cpu", examples, normalizer, 0, random_parts=False)[1].state_dict().items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cpu_losses, cpu_model = _train("cpu", examples, normalizer, 6, random_parts=False)
        gpu_losses, gpu_model = _train("cuda", examples, normalizer, 6, random_parts=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert next(gpu_model.parameters()).is_cuda
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-3)
    cpu_w, gpu_w = cpu_model.state_dict(), {k: v.cpu() for k, v in gpu_model.state_dict().items()}
    moved = sum(float((cpu_w[k] - init[k]).norm() ** 2) for k in init) ** 0.5
    apart = sum(float((cpu_w[k] - gpu_w[k]).norm() ** 2) for k in init) ** 0.5
    assert moved > 0 and apart < 0.01 * moved


def test_bf16_training_on_cuda_learns_like_fp32(train_examples) -> None:
    """bf16 autocast (``train.bf16``): 40 steps on the same two batches lower the loss as fp32 does
    (the mean of the last 5 losses at most 0.8 x the first 5's, and within 15 % of fp32's)."""
    examples, normalizer = train_examples
    torch.manual_seed(0)
    fp32, _ = _train("cuda", examples, normalizer, 40)
    torch.manual_seed(0)
    bf16, _ = _train("cuda", examples, normalizer, 40, bf16=True)
    assert all(np.isfinite(bf16))
    first, last = sum(bf16[:5]) / 5, sum(bf16[-5:]) / 5
    assert last <= 0.8 * first
    assert last == pytest.approx(sum(fp32[-5:]) / 5, rel=0.15)


def test_ray_train_worker_trains_on_the_gpu(gpu_ray, an4_root, tmp_path) -> None:
    """`asr train --workers 1` on a GPU host: the Ray Train worker asks for the GPU (DDP over NCCL),
    trains chunk-aware batches there and exports a bundle that records the device and loads."""
    from pipeline.training.distributed import train_distributed
    from workers.model.bundle import load_bundle
    from workers.training.trainer import TrainConfig

    _, dev = split_by_speaker(read_an4(an4_root).utterances, CONFIG.data.an4_dev_speakers)
    utts = sorted(dev, key=lambda u: u.id)
    train, held = utts[:24], [u for u in utts if u.speaker not in {t.speaker for t in utts[:24]}][:4]
    cfg = TrainConfig(epochs=1, max_batch_utterances=4, full_utterance_prob=0.0, bf16=True)
    lines: list[str] = []
    out = train_distributed(train, CONFIG.features, CONFIG.model, cfg, 1, tmp_path / "bundle", use_gpu=True,
                            storage_path=tmp_path / "ray_train", dev=held, max_steps_per_epoch=4, log=lines.append)
    assert any("GPU, nccl" in line for line in lines), lines
    bundle = load_bundle(out)
    assert bundle.info["train_device"].startswith("cuda") and bundle.info["train_precision"] == "bf16"
    assert bundle.info["chunked_batches"] == 4 and bundle.info["steps"] == 4
