"""Memory of this process and every process it started (a local Ray's GCS, raylet, agents and
workers are all descendants of the driver that started it), by proportional set size.

PSS charges each shared page to the processes that map it in equal shares, so the sum over
processes is the memory they really hold together; summed RSS counts every shared library (torch's
are hundreds of MB) once per process. Linux only: read from ``/proc/PID/smaps_rollup``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil


@dataclass(frozen=True)
class ProcessMemory:
    """One process: its name (Ray's ``ray::ActorClass`` title, or the executable) and its
    proportional, resident and unique set sizes in MiB."""

    pid: int
    name: str
    pss_mb: float
    rss_mb: float
    uss_mb: float


def _rollup_kb(pid: int) -> dict[str, int]:
    """The ``smaps_rollup`` fields of one process, in kB (``Pss``, ``Rss``, ``Private_Dirty``, ...)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def _name(proc: psutil.Process) -> str:
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    exe = (cmd[0].rsplit("/", 1)[-1] if cmd else proc.name()) or proc.name()
    if exe.startswith("python") and len(cmd) > 1:  # e.g. ray's dashboard or log monitor scripts
        script = next((a for a in cmd[1:] if not a.startswith("-")), "")
        return f"{exe} {script.rsplit('/', 1)[-1]}".strip()
    return exe


def process_tree_memory(root_pid: int | None = None) -> list[ProcessMemory]:
    """PSS/RSS/USS of ``root_pid`` (default: this process) and all its descendants; processes
    that exit while being read are skipped."""
    root = psutil.Process(root_pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            kb = _rollup_kb(proc.pid)
            name = _name(proc)
        except (OSError, psutil.Error):
            continue
        uss_kb = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
        out.append(ProcessMemory(proc.pid, name, kb.get("Pss", 0) / 1024, kb.get("Rss", 0) / 1024, uss_kb / 1024))
    return out


def memory_report(processes: list[ProcessMemory]) -> dict:
    """Totals (MiB, rounded) and the processes, largest PSS first, as a JSON-ready dict."""
    ranked = sorted(processes, key=lambda p: -p.pss_mb)
    return {
        "total_pss_mb": round(sum(p.pss_mb for p in processes), 1),
        "summed_rss_mb": round(sum(p.rss_mb for p in processes), 1),
        "processes": len(processes),
        "by_process": [{k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(p).items()} for p in ranked],
    }
