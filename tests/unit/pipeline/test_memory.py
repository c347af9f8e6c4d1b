"""``pipeline.bench.memory``: PSS, RSS and USS of a process tree, read from /proc/PID/smaps_rollup."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.bench.memory import memory_report, process_tree_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

HOLD_MB = 200


def test_a_child_holding_private_memory_is_counted_once_by_pss():
    """A child that touches 200 MiB of its own memory: its USS and PSS hold them; the parent's tree
    includes the child, and the total PSS of the tree is its processes' sum, below summed RSS
    (the two Python interpreters share their executable's and libraries' pages)."""
    code = f"import sys, time; b = bytearray({HOLD_MB} * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        tree = process_tree_memory()
        mine = [p for p in tree if p.pid == child.pid]
        assert len(mine) == 1 and tree[0].name.startswith("python")
        held = mine[0]
        assert HOLD_MB <= held.uss_mb <= held.pss_mb <= held.rss_mb < HOLD_MB + 100, held
        report = memory_report(tree)
        pss = [p["pss_mb"] for p in report["by_process"]]
        assert report["processes"] == len(tree) and pss == sorted(pss, reverse=True)  # largest PSS first
        assert child.pid in [p["pid"] for p in report["by_process"]]
        assert report["total_pss_mb"] == pytest.approx(sum(p.pss_mb for p in tree), abs=0.1)
        assert report["total_pss_mb"] < report["summed_rss_mb"]
    finally:
        child.kill()
        child.wait()
    time.sleep(0.1)
    assert all(p.pid != child.pid for p in process_tree_memory())  # a process that is gone is not read


def test_pss_growth_names_the_processes_that_grew_most():
    from pipeline.bench.memory import ProcessMemory
    from pipeline.bench.run import pss_growth

    first = [ProcessMemory(1, "python", 100.0, 150.0, 90.0), ProcessMemory(2, "gcs_server", 30.0, 40.0, 20.0),
             ProcessMemory(3, "raylet", 20.0, 25.0, 10.0)]
    last = [ProcessMemory(1, "python", 160.0, 210.0, 150.0), ProcessMemory(2, "gcs_server", 25.0, 35.0, 15.0),
            ProcessMemory(4, "ray::IngestActor", 70.0, 130.0, 60.0)]  # 3 exited, 4 started: neither compared
    assert pss_growth(first, last) == {"python 1": 60.0, "gcs_server 2": -5.0}
    assert pss_growth(first, last, top=1) == {"python 1": 60.0}
