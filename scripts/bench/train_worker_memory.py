"""Peak memory of each Ray Train worker of `asr train --workers N` (pipeline/training/distributed.py).

    python scripts/bench/train_worker_memory.py --max-train 48            # a small AN4 subset
    python scripts/bench/train_worker_memory.py --fsdd --max-train 0      # all of AN4 + FSDD
    python scripts/bench/train_worker_memory.py --feed shared ...         # the object-store feed, for comparison

``--feed`` sets ``train.data_feed`` (default ray_data: each worker streams its share through Ray Data).

Polls the workers' pids (written by the train loop to a pid dir) with psutil every 0.2 s and prints,
per rank, the peak RSS (which counts pages of the shared object store the worker touched) and the
peak USS (memory unique to the process), and the epoch records' ``feed_max_utterances_held``.

Measured (2 CPU workers, configs/tiny.yaml, 1 epoch of at most 20 steps; peak MiB of rank 0 / rank 1):

| feed | training set | RSS | USS | utterances held |
|---|---|---|---|---|
| ray_data | 48 AN4 utterances (0.033 h) | 895 / 888 | 495 / 487 | 24 |
| ray_data | all AN4 + FSDD (2843 utterances, 0.854 h) | 886 / 874 | 486 / 474 | 32 |
| shared | 48 AN4 utterances | 885 / 885 | 486 / 490 | - |
| shared | all AN4 + FSDD | 884 / 871 | 483 / 472 | - |

Neither grows with the corpus here: the raw MFCC of all of AN4 + FSDD at one speed is ~16 MB, and
a shared-feed worker only touches the object-store pages of the utterances it trains on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-train", type=int, default=48, help="0: all training utterances")
    p.add_argument("--fsdd", action="store_true")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps-per-epoch", type=int, default=20)
    p.add_argument("--feed", choices=("ray_data", "shared"), default="ray_data")
    args = p.parse_args()
    import ray

    from pipeline.config import load_config
    from pipeline.training.run import run_training_distributed

    repo = Path(__file__).resolve().parents[2]
    data = repo.parent / "shared" / "data"
    config = load_config(str(repo / "configs/tiny.yaml"), [
        f"data.an4_root={data / 'an4'}", f"data.fsdd_root={data / 'fsdd'}", f"data.use_fsdd={str(args.fsdd).lower()}",
        f"data.max_train_utterances={args.max_train}", "data.max_dev_utterances=8", f"train.epochs={args.epochs}",
        f"train.data_feed={args.feed}"])
    tmp = Path(tempfile.mkdtemp(prefix="train_memory_"))
    pids = tmp / "pids"
    pids.mkdir()
    peak: dict[int, dict[str, float]] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for f in pids.glob("rank*.json"):
                rank = int(f.stem[4:])
                try:
                    mem = psutil.Process(json.loads(f.read_text())["pid"]).memory_full_info()
                except (psutil.Error, ValueError, KeyError):
                    continue
                slot = peak.setdefault(rank, {"rss": 0.0, "uss": 0.0})
                slot["rss"] = max(slot["rss"], mem.rss / 2**20)
                slot["uss"] = max(slot["uss"], mem.uss / 2**20)
            time.sleep(0.2)

    ray.init(address="local", num_cpus=max(2, args.workers), num_gpus=0, include_dashboard=False)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.time()
    lines: list[str] = []
    try:
        run_training_distributed(config, tmp / "run", args.workers, max_steps_per_epoch=args.max_steps_per_epoch,
                                 use_gpu=False, pid_dir=pids, log=lines.append)
    finally:
        done.set()
        ray.shutdown()
    info = json.loads((tmp / "run" / "bundle" / "config.json").read_text())["info"]
    history = json.loads((tmp / "run" / "history.json").read_text())
    print(json.dumps({"feed": args.feed, "train_audio_h": info.get("train_audio_h"), "train_utterances": info.get("train_utterances"),
                      "fsdd": args.fsdd, "steps_per_worker": [h["steps"] for h in history],
                      "feed_max_utterances_held": [h.get("feed_max_utterances_held") for h in history],
                      "wall_s": round(time.time() - t0, 1),
                      "peak_mib": {r: {k: round(v, 1) for k, v in m.items()} for r, m in sorted(peak.items())}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
