"""Training throughput for the scale-out table (issue 15): step time and memory of the real training
step, feature throughput per CPU, and the extrapolated epoch time of LibriSpeech 960 h.

    python scripts/bench/bench_train_step.py --data ../shared/data/an4 --device cuda --steps 200 --json out.json
    python scripts/bench/bench_train_step.py --data ../shared/data/an4 --device cpu --steps 20 --precision fp32

What it runs (``workers.training.trainer.Trainer``, the step both `asr train` and the Ray Train loop use:
SpecAugment, chunk-aware forward, CTC, clipping, AdamW, schedule):

1. **Feature throughput per CPU** (one thread): read -> speed perturbation (resample) -> MFCC, the
   Ray Data feed's map function (``pipeline.training.data.raw_mfcc_batch``), and the same with the
   waveform augmentation chain (``workers.data.augment.Augmenter``) before the MFCC. In audio seconds per
   second of one core.
2. **Real batches**: the epoch plans of the ``--data`` utterances (length buckets, chunk draws,
   speed perturbation: what training runs), ``--steps`` steps after ``--warmup-steps``, per
   precision (fp32; bf16 autocast on CUDA). Per step: wall time (CUDA synchronised), audio seconds
   and padded frames; peak CUDA memory (allocated and reserved) and the process's peak RSS.
3. **Fixed shapes**: full batches of ``max_batch_frames`` model frames as B utterances x T frames
   (AN4-like 16 x 150 = 4.5 s each, LibriSpeech-like 5 x 480 = 14.4 s, long 2 x 1200 = 36 s), random
   features and targets, chunked (10 + 5 frames) and whole-utterance.
4. **Extrapolation** (labelled as such): epoch time for 960 h of audio at 1, 4 and 16 GPUs from the
   LibriSpeech-like shape's training throughput, assuming linear data-parallel scaling (the gradient
   all-reduce is not measured: its size is printed) and the feature CPUs each GPU needs.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

LIBRISPEECH_960H_S = 960 * 3600.0
SHAPES = ((16, 150), (5, 480), (2, 1200))  # (utterances, model frames): 2400 frames each


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def feature_throughput(utts: list, features, train_cfg, files: int) -> dict:
    """Audio seconds per second of one core: read + speed perturbation + MFCC, then with augmentation."""
    from pipeline.training.data import raw_mfcc_batch
    from workers.audio.reader import load_audio
    from workers.data.augment import Augmenter
    from workers.features.mfcc import MfccExtractor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chosen = utts[:files]
        audio_s = sum(u.duration_s for u in chosen)
        feats_json = json.dumps(features.__dict__)
        t0 = time.perf_counter()
        raw_mfcc_batch({"audio": [u.audio for u in chosen], "text": [u.text for u in chosen],
                        "index": list(range(len(chosen)))}, feats_json, 1.1)
        plain_s = time.perf_counter() - t0
        rate = features.sample_rate_hz
        waves = [load_audio(u.audio, rate) for u in chosen]
        try:
            augmenter = Augmenter(replace(train_cfg, augment_prob=1.0).augment_config, rate, waves, seed=0)
        except ImportError as exc:  # pyroomacoustics (simulated rooms) not installed
            print(f"augmentation throughput not measured: {exc}")
            augmented_s = None
        else:
            extractor = MfccExtractor(features)
            t0 = time.perf_counter()
            for w in waves:
                extractor.raw_mfcc(augmenter(w))
            augmented_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"files": len(chosen), "audio_s": round(audio_s, 1),
            "read_speed_mfcc_audio_s_per_cpu_s": round(audio_s / plain_s, 1),
            "augment_mfcc_audio_s_per_cpu_s": round(audio_s / augmented_s, 1) if augmented_s else None}


def _reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device: torch.device) -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out


def _summary(times_s: list[float], audio_s: list[float], padded: list[int]) -> dict:
    ordered = sorted(times_s)
    return {"steps": len(times_s), "step_ms_median": round(1000 * ordered[len(ordered) // 2], 2),
            "step_ms_mean": round(1000 * sum(times_s) / len(times_s), 2),
            "steps_per_s": round(len(times_s) / sum(times_s), 2),
            "audio_s_per_step": round(sum(audio_s) / len(audio_s), 2),
            "padded_frames_per_step": round(sum(padded) / len(padded), 1),
            "train_audio_s_per_s": round(sum(audio_s) / sum(times_s), 1)}


def real_batches(trainer, steps: int, warmup: int, frame_s: float) -> dict:
    """Time ``steps`` training steps of the trainer's own epoch plans (after ``warmup`` untimed ones)."""
    device = trainer.device
    times, audio, padded = [], [], []
    done = 0
    while done < warmup + steps:
        trainer.seed_epoch()
        speed, plan = trainer.epoch_plan()
        examples = trainer.train_sets[speed]
        trainer.model.train()
        for b in plan:
            batch = [examples[i] for i in b.indices]
            if done == warmup:
                _reset_peaks(device)
            sync(device)
            t0 = time.perf_counter()
            trainer.train_step(batch, b.chunk_frames, b.right_context_frames)
            sync(device)
            if done >= warmup:
                times.append(time.perf_counter() - t0)
                lengths = [e.features.shape[0] for e in batch]
                audio.append(sum(lengths) * frame_s)
                padded.append(max(lengths) * len(lengths))
            done += 1
            if done >= warmup + steps:
                break
        trainer.progress.epoch += 1
    return {**_summary(times, audio, padded), **_peaks(device)}


def fixed_shapes(trainer, steps: int, frame_s: float) -> list[dict]:
    """Full batches of fixed shapes, chunked (10 + 5) and whole: step time and training throughput."""
    from workers.training.epochs import Example

    device = trainer.device
    dim = trainer.module.config.input_dim
    gen = torch.Generator().manual_seed(0)
    out = []
    for utts, frames in SHAPES:
        batch = [Example(torch.randn(frames, dim, generator=gen),
                         torch.randint(1, trainer.module.config.num_tokens, (frames // 4,), generator=gen), "")
                 for _ in range(utts)]
        for chunk, rc in ((10, 5), (None, 0)):
            for _ in range(3):
                trainer.train_step(batch, chunk, rc)
            _reset_peaks(device)
            times = []
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                trainer.train_step(batch, chunk, rc)
                sync(device)
                times.append(time.perf_counter() - t0)
            out.append({"utterances": utts, "frames": frames, "chunk": f"{chunk} + {rc}" if chunk else "whole",
                        **_summary(times, [utts * frames * frame_s] * steps, [utts * frames] * steps), **_peaks(device)})
    return out


def extrapolate(shape_rows: list[dict], feature: dict, params: int) -> dict:
    """Epoch time of 960 h at 1, 4 and 16 GPUs from the LibriSpeech-like shape (chunked), linear scaling."""
    row = next(r for r in shape_rows if r["frames"] == 480 and r["chunk"] != "whole")
    per_gpu = row["train_audio_s_per_s"]
    return {
        "basis": "measured: 5 x 480-frame chunked batch throughput on one device; extrapolated: linear "
                 "data-parallel scaling, gradient all-reduce not measured",
        "train_audio_s_per_s_per_device": per_gpu,
        "allreduce_mb_per_step": round(params * 4 / 2**20, 1),
        "epoch_h": {n: round(LIBRISPEECH_960H_S / (per_gpu * n) / 3600, 2) for n in (1, 4, 16)},
        "feature_cpus_per_device": round(per_gpu / feature["read_speed_mfcc_audio_s_per_cpu_s"], 1),
        "feature_cpus_per_device_with_augmentation": (round(per_gpu / feature["augment_mfcc_audio_s_per_cpu_s"], 1)
                                                      if feature["augment_mfcc_audio_s_per_cpu_s"] else None),
    }


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.training.run import read_sources
    from workers.training.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["../shared/data/an4"], help="training audio (anything asr eval reads)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--steps", type=int, default=200, help="timed steps of real batches per precision")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--shape-steps", type=int, default=20, help="timed steps per fixed shape")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--feature-files", type=int, default=60)
    p.add_argument("--max-utterances", type=int, default=0, help="train on this many (a random subset; 0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(None, [f"train.device={args.device}", "train.augment_prob=0", "train.num_threads=0"])
    utts = read_sources(args.data)
    if not utts:
        print(f"error: no utterances in {args.data}", file=sys.stderr)
        return 2
    random.Random(0).shuffle(utts)
    utts = utts[: args.max_utterances or None]
    frame_s = config.features.hop_ms * config.features.stack_frames / 1000
    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "utterances": len(utts),
                    "audio_h": round(sum(u.duration_s for u in utts) / 3600, 3)}
    report["feature_per_cpu"] = feature_throughput(utts, config.features, config.train, args.feature_files)
    print("feature throughput per CPU:", report["feature_per_cpu"], flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for precision in args.precision:
            cfg = replace(config.train, bf16=precision == "bf16")
            trainer = Trainer(Path(tmp) / precision, utts, [], config.features, config.model, cfg, log=lambda _: None)
            if precision == "bf16" and trainer.device.type != "cuda":
                print("bf16: skipped (autocast is used on CUDA only)")
                continue
            report["device"] = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"
            params = sum(p.numel() for p in trainer.model.parameters())
            runs[precision] = {"real_batches": real_batches(trainer, args.steps, args.warmup_steps, frame_s)}
            print(f"{precision} real batches:", runs[precision]["real_batches"], flush=True)
            runs[precision]["fixed_shapes"] = fixed_shapes(trainer, args.shape_steps, frame_s)
            for row in runs[precision]["fixed_shapes"]:
                print(f"{precision} {row['utterances']} x {row['frames']} ({row['chunk']}): {row['step_ms_median']} ms/step, "
                      f"{row['train_audio_s_per_s']} audio s/s", flush=True)
            runs[precision]["extrapolation_960h"] = extrapolate(runs[precision]["fixed_shapes"], report["feature_per_cpu"], params)
            print(f"{precision} extrapolation:", runs[precision]["extrapolation_960h"], flush=True)
    report["runs"] = runs
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
