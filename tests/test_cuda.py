"""The GPU path: the shipped acoustic model on CUDA gives what it gives on the CPU, in-process
(whole utterances and chunked streaming), through the Ray streaming actors and through the
Ray Data batch job, on real held-out AN4 speech.

Skipped where torch sees no CUDA device (CI has none); ``scripts/gpu_check.sh`` runs them on a
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
from workers.audio import load_audio
from workers.corpus import read_an4, split_by_speaker
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

    from pipeline.batch import acoustic_num_gpus, transcribe_inputs

    assert acoustic_num_gpus(1) == 1.0 and acoustic_num_gpus(4) == 0.25
    summary = transcribe_inputs(dev_files, tmp_path, concurrency=2)
    assert summary["errors"] == 0 and summary["transcribed"] == len(dev_files)
    rows = {r["path"]: r for r in map(json.loads, (tmp_path / "transcripts.jsonl").read_text().splitlines())}
    cpu, _ = recognizers
    assert [rows[str(os.path.abspath(f))]["text"] for f in dev_files] == [cpu.transcribe_file(f).text for f in dev_files]
