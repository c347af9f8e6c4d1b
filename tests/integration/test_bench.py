"""`asr bench` end to end, small: real AN4 audio through the batch path (in-process and
Ray Data) and concurrent streams through the Ray pipeline; the JSON must hold every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AN4 = ROOT.parent / "shared" / "data" / "an4"


@pytest.mark.skipif(not AN4.is_dir(), reason="needs ../shared/data/an4")
def test_bench_prints_every_figure(tmp_path: Path, capsys) -> None:
    """In this process (the command's code path from its arguments on; no second torch import),
    with one acoustic and one decoder actor instead of two each (every stage still has an actor)."""
    from pipeline.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--data", str(AN4), "--seconds", "10", "--batch-actors", "1", "--streams", "1", "3", "--stream-seconds", "2",
            "--long-minutes", "0.1", "--json", str(out), "--set", "streaming.acoustic_actors=1", "--set", "streaming.decoder_actors=1"]
    code = main(args)
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    result = json.loads(out.read_text())

    batch = result["batch"]
    assert batch["files"] >= 3 and batch["audio_s"] >= 8 and batch["ray_errors"] == 0
    for key in ("in_process_rtfx", "ray_rtfx", "ray_vs_in_process_speed", "ray_first_row_s", "ray_vs_in_process_speed_after_first_row"):
        assert batch[key] > 0, key
    # the cost model: its stage costs add up to the in-process speed measured on the same run
    host, acoustic = batch["host_cpu_ms_per_audio_s"], batch["acoustic_ms_per_audio_s"]
    assert host > 0 and acoustic > 0 and batch["predict_cpus"] == 16
    by_stage = batch["host_cpu_ms_per_audio_s_by_stage"]
    assert host == pytest.approx(by_stage["analyse"] + by_stage["decode"], abs=0.01)
    assert by_stage["load"] + by_stage["features"] + by_stage["vad"] <= by_stage["analyse"] * 1.5
    assert batch["host_capacity_rtfx"] == pytest.approx(16_000 / host, rel=0.01)
    assert batch["predicted_in_process_one_thread_rtfx"] == pytest.approx(1000 / (host + acoustic), rel=0.01)
    assert batch["prediction_error"] <= 0.30, batch

    runs = {r["streams"]: r for r in result["streaming"]}
    assert set(runs) == {1, 3}
    for run in runs.values():
        assert run["pushes"] == run["streams"] * 20  # 2 s of 100 ms pushes per stream
        assert run["n"] > 0 and 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        spans = run["latency_breakdown"]
        assert list(spans) == ["queue_and_send", "ingest", "to_features", "features", "to_acoustic", "acoustic",
                               "to_decoder", "decoder", "to_driver"]
        assert sum(s["p50_ms"] for s in spans.values()) > 0
        assert run["stream_cpu_ms_per_stream_s"] > 0 and abs(run["predicted_streams"] - 16_000 / run["stream_cpu_ms_per_stream_s"]) <= 1
    for run in runs.values():  # the criterion, recomputed from the run's own figures
        meets = run["p95_ms"] is not None and run["p95_ms"] <= 150.0 and run["late_pushes"] == 0 and run["drain_after_audio_s"] <= 1.0
        assert run["kept_real_time"] == meets
    assert result["max_realtime_streams"]["streams"] == max([n for n, r in runs.items() if r["kept_real_time"]], default=0)

    long_stream = result["long_stream"]
    assert long_stream["audio_min"] >= 0.1 and long_stream["finals"] >= 1
    assert long_stream["stage_actors_rss_mb_by_audio_minute"]  # sampled at least once
    assert long_stream["total_pss_mb_by_audio_minute"] and all(mb > 100 for _, mb in long_stream["total_pss_mb_by_audio_minute"])
    assert "pss_growth_mb_by_process" in long_stream
    assert result["peak_rss_mb"] > 100

    memory = result["idle_stream_memory"]  # the driver and every Ray process, one idle stream
    names = [p["name"] for p in memory["by_process"]]
    for actor in ("ray::IngestActor", "ray::FeatureActor", "ray::AcousticActor", "ray::DecoderActor", "raylet", "gcs_server"):
        assert actor in names, names
    assert memory["processes"] == len(names) and memory["total_pss_mb"] == pytest.approx(sum(p["pss_mb"] for p in memory["by_process"]), abs=1)
    assert 0 < memory["total_pss_mb"] < memory["summed_rss_mb"]  # torch's pages are shared by the actors
    assert memory["driver_imports_torch"] is False  # measured from a driver like asr stream's and asr serve's


def test_bench_rejects_a_missing_or_broken_corpus(tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"broken\n')
    for data in (tmp_path / "nowhere", bad):
        assert main(["bench", "--data", str(data), "--streams", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(data) in err and "Traceback" not in err


def test_gpu_check_says_so_when_there_is_no_gpu(tmp_path) -> None:
    """scripts/ops/gpu_check.sh on a machine (or with CUDA hidden) without a GPU: a clear line, exit 77, nothing run."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "out")}
    done = subprocess.run(["bash", "scripts/ops/gpu_check.sh"], cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 77, done.stdout + done.stderr
    assert "no CUDA GPU visible" in done.stdout and "nothing was run" in done.stdout
    assert not (tmp_path / "out").exists()
