#!/usr/bin/env python
"""The pictures of docs/RESULTS.md and the README, drawn from the JSONs under docs/benchmarks/:

    python scripts/tables/plot_results.py            # writes docs/wer_latency.png, docs/robustness.png, docs/stream_latency.png

- WER against algorithmic latency (chunk + lookahead; offline drawn at the right), from
  ``asr eval --json`` reports named ``*-latency-<chunk>-<lookahead>.json`` / ``*-latency-offline.json``;
- WER per robustness condition, from the ``asr eval --json`` reports of a robustness directory;
- push-to-partial latency (p50, p95) against the number of real-time streams, from an
  ``asr bench --json`` report.

Needs matplotlib (``pip install -e '.[plots]'``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "docs" / "benchmarks"


def latency_points(pattern: str) -> tuple[list[tuple[float, float]], float | None]:
    """(algorithmic latency ms, WER %) of the streaming reports matching ``pattern``, and the offline WER %."""
    points, offline = [], None
    for path in sorted(BENCH.glob(pattern)):
        report = json.loads(path.read_text())
        wer = 100 * report["wer"]
        found = re.search(r"latency-(\d+)-(\d+)\.json$", path.name)
        if found:
            points.append((float(found.group(1)) + float(found.group(2)), wer))
        elif path.name.endswith("latency-offline.json"):
            offline = wer
    return sorted(points), offline


def robustness(directory: Path) -> list[tuple[str, float]]:
    out = []
    for path in sorted(directory.glob("*.json")):
        report = json.loads(path.read_text())
        if report.get("reference_words"):
            out.append((path.stem.replace("_", " "), 100 * report["wer"]))
    return out


def stream_latency(path: Path) -> list[tuple[int, float, float]]:
    return [(run["streams"], run["p50_ms"], run["p95_ms"]) for run in json.loads(path.read_text())["streaming"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-glob", default="2026-12-05-latency-*.json")
    parser.add_argument("--robustness-dir", default=str(BENCH / "2026-12-05-robustness-streaming-endpointed"))
    parser.add_argument("--bench", default=str(BENCH / "2026-11-28-cpu-bf16-thr10-feature-batches.json"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: needs matplotlib: pip install -e '.[plots]'", file=sys.stderr)
        return 2
    out = Path(args.out)

    points, offline = latency_points(args.latency_glob)
    if not points:
        print(f"error: no reports match {BENCH / args.latency_glob}", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="streaming (chunk + lookahead)")
    if offline is not None:
        ax.axhline(offline, color="grey", linestyle="--", label=f"offline, whole utterance ({offline:.1f} %)")
    for x, y in points:
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="algorithmic latency, ms", ylabel="WER %, 8 held-out AN4 speakers", title="WER against latency (beam + LM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "wer_latency.png", dpi=110)

    rows = robustness(Path(args.robustness_dir))
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.barh([r[0] for r in rows], [r[1] for r in rows])
        ax.set(xlabel="WER %, streaming 300 + 150 ms", title="Degraded audio (held-out AN4 speakers)")
        fig.tight_layout()
        fig.savefig(out / "robustness.png", dpi=110)

    runs = stream_latency(Path(args.bench))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r[0] for r in runs], [r[1] for r in runs], "o-", label="p50")
    ax.plot([r[0] for r in runs], [r[2] for r in runs], "s-", label="p95")
    ax.set(xlabel="real-time streams", ylabel="push to partial, ms", title="Streaming latency on 2 CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stream_latency.png", dpi=110)
    print(f"wrote {out / 'wer_latency.png'}, {out / 'robustness.png'}, {out / 'stream_latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
