"""``asr bench``'s batch part: the stage costs per audio second in-process on one thread, the cost
model's predictions from them (``pipeline.bench.cost``), and the same files through ``--local``
and through Ray Data, end to end."""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np
import torch

from pipeline.config import AppConfig


def first_files(utterances, seconds: float) -> tuple[list[str], float]:
    """The audio paths of ``utterances`` (``workers.data.corpus.Utterance``) in order, up to the
    first that brings their duration to ``seconds``; and that duration."""
    files, total = [], 0.0
    for u in utterances:
        if total >= seconds:
            break
        files.append(u.audio)
        total += u.duration_s
    return files, total


def measure_stage_costs(files: list[str], rec, batch_size: int | None = None, batch_seconds: float | None = None) -> dict:
    """The batch stages in-process on one thread over ``files`` (planned into batches as a job
    plans them), each timed: CPU time (``time.thread_time``) of everything but the acoustic
    forward pass (analysis, search, records as JSON lines) and wall time of the forward pass on
    ``rec``'s device. Returns per audio second ``host_cpu_ms_per_audio_s``,
    ``acoustic_ms_per_audio_s``, the analysis broken into load / features / vad (a second pass,
    timed the same way), ``decode`` and the batch size the acoustic stage saw."""
    from pipeline.batch.files import collect_inputs
    from pipeline.batch.job import BATCH_FILES, BATCH_SECONDS, plan_batches
    from pipeline.batch.stages import acoustic_items, analyse_paths, decode_items

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_s = dict.fromkeys(("load", "features", "vad", "analyse", "decode"), 0.0)
    acoustic_s, audio_s, files_in_batches = 0.0, 0.0, []
    try:
        batches = [[i.path for i in b] for b in plan_batches(collect_inputs(files), batch_seconds or BATCH_SECONDS, batch_size or BATCH_FILES)]
        analyse_paths(rec, batches[0][:1])  # warm up: first calls allocate lazily
        t_loop = time.perf_counter()
        for paths in batches:
            t = time.thread_time()
            items = analyse_paths(rec, paths)
            cpu_s["analyse"] += time.thread_time() - t
            t = time.perf_counter()
            items = acoustic_items(rec, items)
            acoustic_s += time.perf_counter() - t
            t = time.thread_time()
            records = decode_items(rec, items)
            [json.dumps(r) for r in records]  # what writing the records costs
            cpu_s["decode"] += time.thread_time() - t
            audio_s += sum(r["duration_s"] for r in records)
            files_in_batches.append(len(paths))
        loop_wall_s = time.perf_counter() - t_loop
        for paths in batches:  # the analysis again, its parts timed one by one
            t = time.thread_time()
            waves = [rec.load(p) for p in paths]
            cpu_s["load"] += time.thread_time() - t
            t = time.thread_time()
            [rec.extractor(w) for w in waves]
            cpu_s["features"] += time.thread_time() - t
            if rec.vad is not None:
                t = time.thread_time()
                rec.vad.speech_many(waves)
                cpu_s["vad"] += time.thread_time() - t
    finally:
        torch.set_num_threads(threads)
    per_s = {k: round(1000 * v / audio_s, 3) for k, v in cpu_s.items()}
    return {
        "audio_s": round(audio_s, 1),
        "host_cpu_ms_per_audio_s": round(per_s["analyse"] + per_s["decode"], 3),
        "acoustic_ms_per_audio_s": round(1000 * acoustic_s / audio_s, 3),
        "acoustic_device": str(rec.device),
        "acoustic_batch_files_mean": round(float(np.mean(files_in_batches)), 1),
        "in_process_one_thread_rtfx": round(audio_s / loop_wall_s, 1),  # the same loop's wall time
        "host_cpu_ms_per_audio_s_by_stage": per_s,  # analyse = load + features + vad (+ reading headers, planning)
    }


def bench_batch(files: list[str], bundle: str | None, config: AppConfig, concurrency: int, predict_cpus: int = 16) -> dict:
    """Stage costs (``measure_stage_costs``), the cost model's predictions (and how far the one for
    the measured loop is off), and the same files transcribed end to end in-process (``--local``,
    all threads) and through Ray Data."""
    from pipeline.batch.job import transcribe_inputs
    from pipeline.bench import cost
    from workers.recognizer import Recognizer

    rec = Recognizer(bundle, config.decoder, vad=config.vad, quantize=config.inference.quantize)
    costs = measure_stage_costs(files, rec)
    audio_s = costs["audio_s"]
    host, acoustic = costs["host_cpu_ms_per_audio_s"], costs["acoustic_ms_per_audio_s"]

    def job(backend: str) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            summary = transcribe_inputs(files, out, bundle, config.decoder, concurrency=concurrency, vad=config.vad,
                                        backend=backend, quantize=config.inference.quantize, progress=False)
            return time.perf_counter() - t0, summary

    inproc_s, _ = job("local")
    ray_s, summary = job("ray")  # what it measures is the Ray Data job (Ray already started)
    measured_one_thread_rtfx = costs["in_process_one_thread_rtfx"]
    predicted_one_thread_rtfx = cost.in_process_rtfx(host, acoustic)
    return {
        "files": len(files),
        "audio_s": audio_s,
        **{k: v for k, v in costs.items() if k != "audio_s"},
        "predict_cpus": predict_cpus,
        "host_capacity_rtfx": round(cost.host_capacity_rtfx(host, predict_cpus), 1),
        "predicted_cpu_node_rtfx": round(cost.node_rtfx(host, acoustic, predict_cpus), 1),
        "predicted_in_process_one_thread_rtfx": round(predicted_one_thread_rtfx, 1),
        "prediction_error": round(cost.agreement(predicted_one_thread_rtfx, measured_one_thread_rtfx), 3),
        "in_process_s": round(inproc_s, 2),
        "in_process_rtfx": round(audio_s / inproc_s, 1),
        "in_process_torch_threads": torch.get_num_threads(),
        "in_process_device": str(rec.device),
        "ray_s": round(ray_s, 2),
        "ray_rtfx": round(audio_s / ray_s, 1),
        "ray_acoustic_actors": concurrency,
        "ray_errors": summary["errors"],
        "ray_vs_in_process_speed": round(inproc_s / ray_s, 3),
        # start-up (worker processes, imports, model loading) is a fixed cost; after it:
        "ray_first_row_s": summary["first_row_s"],
        "ray_after_first_row_s": round(summary["compute_s"] - summary["first_row_s"], 2),
        "ray_vs_in_process_speed_after_first_row": round(inproc_s / max(1e-9, summary["compute_s"] - summary["first_row_s"]), 3),
    }
