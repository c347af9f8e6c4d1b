"""The local Ray that a command starts for itself (``pipeline.cluster.session``): quiet unless
``--verbose``, listening on loopback only, and gone when the command ends, however it ends.

Each test runs ``python -m pipeline.cli`` on real AN4 recordings in a subprocess, with a
fresh environment (no RAY_ADDRESS), as a user would. That a plain run prints only its summary
is checked on the README's main job (tests/test_transcribe_cli.py). Processes are told apart from other
Ray instances on the machine by being descendants of that subprocess."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
#: What Ray printed on a plain run before: token warning, C++ error line, start-up and
#: dashboard lines, flashlight's LM banner from each worker, Ray Data's progress log.
RUN_TIMEOUT_S = 600.0  # generous: the test machine is small and shared
ACTORS_TIMEOUT_S = 300.0  # until Ray Data's actor process exists
GONE_WITHIN_S = 15.0  # after the driver has ended


def _an4_files(root: Path, n: int) -> list[str]:
    return [str(p) for p in sorted((root / "wav").rglob("*.raw"))[:n]]


def _asr(*args: str, timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout_s)


def test_transcribe_verbose_shows_rays_output(verbose_ray_transcription):
    """``asr transcribe --ray --verbose`` on 8 held-out utterances (the run is shared with
    tests/test_transcribe_cli.py, which compares its files with an in-process run)."""
    done, _ = verbose_ray_transcription
    assert done.returncode == 0, done.stderr
    assert "Started a local Ray instance" in done.stderr
    assert "Loading the LM" in done.stdout + done.stderr  # worker output is forwarded
    assert "8 files: 8 transcribed" in done.stdout


@contextlib.contextmanager
def _running_transcribes(an4_root: Path, outs: list[Path]) -> Iterator[list[tuple[subprocess.Popen, list[psutil.Process]]]]:
    """``asr transcribe`` on 60 files into each of ``outs``, all started at once; entered once
    each one's Ray Data actor process exists: (its driver, the driver's descendants then) per
    run. Drivers still running on exit are ended."""
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "transcribe", *_an4_files(an4_root, 60), "--out", str(out), "--ray"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outs]
    try:
        deadline = time.monotonic() + ACTORS_TIMEOUT_S
        runs = []
        for proc in procs:
            driver = psutil.Process(proc.pid)
            while not any("MapWorker" in " ".join(_cmdline(p)) for p in driver.children(recursive=True)):
                assert proc.poll() is None, f"ended before its actors were seen:\n{proc.stdout.read()}"
                assert time.monotonic() < deadline, "Ray Data's actor did not start"
                time.sleep(0.3)
            runs.append((proc, driver.children(recursive=True)))
        yield runs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait(RUN_TIMEOUT_S)
            proc.stdout.close()


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _assert_listens_on_loopback_only(proc: subprocess.Popen, procs: list[psutil.Process]) -> None:
    listening = []
    for p in [psutil.Process(proc.pid), *procs]:
        with contextlib.suppress(psutil.Error):
            listening += [(" ".join(_cmdline(p))[:60], c.laddr.ip, c.laddr.port)
                          for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len({name for name, _, _ in listening}) >= 3, listening  # the GCS, the raylet, the workers...
    exposed = [entry for entry in listening if not _is_loopback(entry[1])]
    assert not exposed, exposed


def _alive(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(_cmdline(p))[:80])
    return alive


def test_killed_transcribes_leave_no_process(an4_root, tmp_path):
    """Two runs of ``asr transcribe`` at once, one ended by SIGTERM and one by SIGKILL: when
    each is killed, its processes go. The local Ray of a running ``asr transcribe`` listens on
    loopback only (checked on the first)."""
    with _running_transcribes(an4_root, [tmp_path / "term", tmp_path / "kill"]) as runs:
        _assert_listens_on_loopback_only(*runs[0])
        for (proc, procs), sig in zip(runs, (signal.SIGTERM, signal.SIGKILL)):
            assert any("raylet" in " ".join(_cmdline(p)) for p in procs)
            assert any("Agent" in " ".join(_cmdline(p)) for p in procs)  # the ones that outlived a killed driver by a minute
            proc.send_signal(sig)
        for (proc, procs), sig in zip(runs, (signal.SIGTERM, signal.SIGKILL)):
            code = proc.wait(RUN_TIMEOUT_S)
            assert code == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL), sig
            deadline = time.monotonic() + GONE_WITHIN_S
            while _alive(procs) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not _alive(procs), sig
        term, _ = runs[0]
        assert term.stdout.read() == ""  # no stack dump of the signal, no traceback


def test_the_raylets_error_messages_never_reach_stdout(tmp_path) -> None:
    """Ray's driver prints the raylet's errors ("A worker died or was killed", "Task ... will be
    retried") to stdout from a thread of its own; a command's local Ray sends them to its log
    directory instead (stdout holds the results), and Ray's function is back after shutdown."""
    code = (
        "import contextlib, io, pathlib\n"
        "import ray._private.worker as rw\n"
        "from pipeline.cluster import session\n"
        "original = rw.print_to_stdstream\n"
        "session.start_local_ray(False, num_cpus=1)\n"
        "rw.print_to_stdstream({'lines': ['A worker died or was killed while executing a task'], 'pid': 'raylet', 'is_err': False})\n"
        "log = pathlib.Path(session.ray_log_dir()) / session.RAYLET_ERRORS_NAME\n"
        "assert 'A worker died' in log.read_text(), log\n"
        "session.shutdown_ray()\n"
        "assert rw.print_to_stdstream is original\n"
        "print('done')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "done\n", done.stdout
