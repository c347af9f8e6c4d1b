"""Watchdog of a local Ray: when its driver is gone, however it ended, end what the driver started.

``python pipeline/cluster/reaper.py`` is started by ``pipeline.cluster.session.start_local_ray`` with its
stdin a pipe from the driver (its parent). While the pipe is open it notes the driver's Ray
processes every ``POLL_S``: the GCS, the raylet and the other children that run Ray's
programs, and their descendants (the raylet's agents and workers).
The pipe closes when the driver exits, is killed (SIGKILL included) or shuts that Ray down;
then every noted process still running gets SIGTERM, and SIGKILL after ``GRACE_S``.

Why: with Ray 2.60 a SIGKILLed driver takes its GCS and raylet along (Ray sets
``PR_SET_PDEATHSIG`` on them), but the raylet's dashboard and runtime-env agents then try to
report the raylet's death to the dead GCS with a 60 s timeout, and live that long (measured:
61 s and 71 s). They cannot be found afterwards by their environment (Ray's process titles
overwrite it) nor by their parent (they are re-parented), hence the noting beforehand.

Limits: a process started less than ``POLL_S`` before the driver died may be missed, and
nothing is done if this watchdog is itself killed (e.g. SIGKILL to the whole process group).

Run as a file, not as ``-m pipeline.cluster.reaper``: it must not depend on which ``pipeline`` the
interpreter would import, and it imports nothing but the standard library and psutil.
"""

from __future__ import annotations

import os
import select
import signal
import sys

import psutil

POLL_S = 0.5  # between looks at the driver's descendants
GRACE_S = 3.0  # between SIGTERM and SIGKILL


def ray_processes(driver: psutil.Process) -> list[psutil.Process]:
    """``driver``'s children that run Ray (a command line with a path through a ``ray``
    directory, e.g. ``.../site-packages/ray/core/src/ray/raylet/raylet``) and their descendants."""
    found = []
    for child in driver.children():
        try:
            if any(f"{os.sep}ray{os.sep}" in arg for arg in child.cmdline()):
                found += [child, *child.children(recursive=True)]
        except psutil.Error:  # ended meanwhile
            continue
    return found


def watch(driver: psutil.Process, poll_s: float = POLL_S) -> list[psutil.Process]:
    """Note ``driver``'s Ray processes until stdin reaches end of file or the driver is gone;
    returns every process noted."""
    noted: dict[int, psutil.Process] = {}
    while True:
        try:
            for proc in ray_processes(driver):
                noted.setdefault(proc.pid, proc)
        except psutil.Error:  # the driver is gone
            break
        readable, _, _ = select.select([sys.stdin], [], [], poll_s)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break
    return list(noted.values())


def reap(procs: list[psutil.Process], grace_s: float = GRACE_S) -> int:
    """SIGTERM the processes still running, SIGKILL those alive after ``grace_s``; returns how
    many were running. (psutil does not signal a pid reused by another process.)"""
    running = [proc for proc in procs if proc.is_running()]
    for proc in running:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(running, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(running)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's; this process stays to clean up after it
    reap(watch(psutil.Process(os.getppid())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
