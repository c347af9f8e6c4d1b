"""Connecting to Ray, starting a local one and ending it: the one place the commands do it.

``connect_ray(address)`` connects to ``address`` (or ``RAY_ADDRESS``) as ``ray.init`` does,
or, with neither, starts a local Ray for this process (``start_local_ray``). ``shutdown_ray``
ends what they started; the CLI calls it however a command ends, and turns SIGTERM
into ``SystemExit`` (``exit_on_sigterm``) so that it runs then too.

A local Ray started here

- listens on loopback only. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do
  it (Ray 2.60 resolves a loopback address to the machine's routable one); Ray's
  single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and
  Windows) makes the node address 127.0.0.1, and Ray then binds its GCS, raylet, object
  manager, worker and agent ports to it;
- exports no Prometheus metrics (``RAY_enable_metrics_collection=0`` unless it is set; set
  it to 1 to ask for them) and starts no dashboard;
- keeps the token authentication Ray 2.60 turns on for a local Ray;
- is watched by ``pipeline/cluster/reaper.py``: when this process is gone, SIGKILL included, the
  watchdog ends the Ray processes that outlived it (Ray's own fate-sharing ends the GCS and
  raylet, not the raylet's agents).

Output: unless verbose (``VERBOSE``, the CLI's ``--verbose``), Ray's own output stays in the
session's log directory (``ray_log_dir()``, which the commands' summaries name): worker
output is not forwarded to the driver, Ray's Python loggers here print errors only (not
the warning that Ray turned token authentication on),
Ray Data shows no progress bars and logs to its file only, and what Ray's C++ core writes
straight to the driver's stderr (e.g. an ``E ... core_worker.cc`` line about actor constructor
arguments that every Ray Data actor pool triggers) goes to ``driver-stderr.log`` there,
while ``sys.stderr`` stays on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import ray

VERBOSE = False  # the CLI's --verbose: Ray's output as Ray prints it
REAPER = Path(__file__).with_name("reaper.py")
REAPER_WAIT_S = 10.0  # how long shutdown_ray waits for the watchdog to end what is left
DRIVER_STDERR_NAME = "driver-stderr.log"
RAYLET_ERRORS_NAME = "driver-raylet-errors.log"  # the raylet's messages to this driver (see _route_raylet_errors)
_print_to_stdstream = None  # Ray's own, while _route_raylet_errors has replaced it
METRICS_VARIABLE = "RAY_enable_metrics_collection"


@dataclass
class _NativeStderr:
    """File descriptor 2 pointed at a log file; ``stream`` (now ``sys.stderr``) writes to the old fd 2."""

    terminal_fd: int
    stream: TextIO
    previous: TextIO  # sys.stderr before

    def restore(self) -> None:
        self.stream.flush()
        os.dup2(self.terminal_fd, 2)
        if sys.stderr is self.stream:
            sys.stderr = self.previous
        self.stream.close()
        os.close(self.terminal_fd)


@dataclass
class _LocalRay:
    reaper: subprocess.Popen
    log_dir: str
    native_stderr: _NativeStderr | None = None


_owned = False  # Ray was initialised by connect_ray / start_local_ray and not shut down since
_local: _LocalRay | None = None  # the local Ray this process started and has not shut down
_last_log_dir: str | None = None


def connect_ray(address: str | None = None, verbose: bool | None = None, environment: dict[str, str] | None = None,
                **init_kwargs: Any) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local Ray, unless Ray is already
    initialised. Returns True when this call initialised Ray (the caller ends it with
    ``shutdown_ray``). ``environment`` and ``init_kwargs`` (``num_cpus``, ...) are for a local
    Ray (see ``start_local_ray``). ``verbose``: default ``VERBOSE``."""
    global _owned
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        start_local_ray(verbose, environment, **init_kwargs)
        return True
    verbose = VERBOSE if verbose is None else verbose
    ray.init(address=address, logging_level=_logging_level(verbose), log_to_driver=verbose)
    _owned = True
    exit_on_sigterm()
    if not verbose:
        _route_raylet_errors(None)
    return True


def start_local_ray(verbose: bool | None = None, environment: dict[str, str] | None = None, **init_kwargs: Any) -> None:
    """Start a Ray for this process only: loopback, no metrics, no dashboard, watched (see the
    module docstring). ``environment``: variables that Ray's processes (and so every worker and
    actor) start with, this process's own environment left as it was."""
    global _owned, _local, _last_log_dir
    verbose = VERBOSE if verbose is None else verbose
    reaper = subprocess.Popen([sys.executable, str(REAPER)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    no_metrics = {} if METRICS_VARIABLE in os.environ else {METRICS_VARIABLE: "0"}
    try:
        with _loopback_node(), _environment({**no_metrics, **(environment or {})}):
            # address="local": a new Ray even when a `ray start` cluster runs on this machine (ray.init would join it)
            ray.init(address="local", include_dashboard=False, logging_level=_logging_level(verbose), log_to_driver=verbose, **init_kwargs)
    except BaseException:
        _stop_reaper(reaper)
        raise
    _owned = True
    exit_on_sigterm()  # ray.init installed its own
    log_dir = ray._private.worker._global_node.get_logs_dir_path()
    _local = _LocalRay(reaper, log_dir)
    _last_log_dir = log_dir
    if not verbose:
        _local.native_stderr = _native_stderr_to(Path(log_dir) / DRIVER_STDERR_NAME)
        _route_raylet_errors(Path(log_dir) / RAYLET_ERRORS_NAME)


def _route_raylet_errors(path: Path | None) -> None:
    """Ray's driver prints the raylet's error messages ("(raylet) A worker died or was killed",
    "Task ... will be retried") to stdout, from a thread that ``ray.init`` starts in every
    driver (``ray._private.worker.listen_error_messages``); ``log_to_driver=False`` does not
    stop it and Ray offers no option that does. So, unless verbose, the module function it
    calls is replaced: the messages go to ``path`` (a local Ray's log directory) or, on a
    cluster, to stderr; never to stdout, which holds the command's results. Undone by
    ``shutdown_ray``."""
    import ray._private.worker as ray_worker

    global _print_to_stdstream
    if _print_to_stdstream is None:
        _print_to_stdstream = ray_worker.print_to_stdstream

    def quiet(data: dict, ignore_prefix: bool = False) -> None:
        if data.get("pid") != "raylet":
            return _print_to_stdstream(data, ignore_prefix=ignore_prefix)
        text = "".join(f"(raylet) {line}\n" for line in data.get("lines", []))
        if path is None:
            sys.stderr.write(text)
            return None
        with contextlib.suppress(OSError), path.open("a") as log:
            log.write(text)
        return None

    ray_worker.print_to_stdstream = quiet


def _restore_raylet_errors() -> None:
    global _print_to_stdstream
    if _print_to_stdstream is not None:
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = _print_to_stdstream
        _print_to_stdstream = None


def shutdown_ray() -> None:
    """Shut Ray down if ``connect_ray`` or ``start_local_ray`` initialised it (a Ray initialised
    otherwise is left alone). For a local Ray, also put stderr back and wait (at most
    ``REAPER_WAIT_S``) for the watchdog to end any of its processes left."""
    global _owned, _local
    if _owned and ray.is_initialized():
        ray.shutdown()
    if _owned:
        _restore_raylet_errors()
    _owned = False
    local, _local = _local, None
    if local is None:
        return
    if local.native_stderr is not None:
        local.native_stderr.restore()
    _stop_reaper(local.reaper)


def ray_log_dir() -> str | None:
    """The log directory of the last local Ray this process started (None if it started none)."""
    return _last_log_dir


def configure_ray_data_output(verbose: bool | None = None) -> None:
    """Ray Data's progress bars and console log lines only when verbose (default ``VERBOSE``);
    its log file (``ray-data.log`` in the session's logs) keeps every line either way."""
    import ray.data

    verbose = VERBOSE if verbose is None else verbose
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the session-file handlers are not stream handlers
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread, so ``finally`` blocks (and
    ``shutdown_ray``) run. ``ray.init`` installs a handler of its own (``sys.exit(15)``, after
    its C++ core printed the signal's stack to stderr); this replaces it. No-op off the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _logging_level(verbose: bool) -> int:
    """Ray's Python loggers in this process: as Ray sets them, or errors only."""
    return logging.INFO if verbose else logging.ERROR


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Ray's single-machine mode while a local Ray starts: its processes read the environment
    variable; this process imported Ray before it was set, so its constant is set as well."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environment({ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (inherited by the processes started meanwhile), restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _native_stderr_to(path: Path) -> _NativeStderr | None:
    """Point file descriptor 2 at ``path`` (appending) and ``sys.stderr`` at a copy of the old
    fd 2: what native code writes to fd 2 lands in the file, Python's own messages (tracebacks,
    warnings, this project's output) still reach the terminal. None when stderr has no fd."""
    try:
        sys.stderr.flush()
        terminal_fd = os.dup(2)
    except (AttributeError, OSError, ValueError):
        return None
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    previous = sys.stderr
    stream = open(terminal_fd, "w", buffering=1, encoding=getattr(previous, "encoding", None) or "utf-8",  # noqa: SIM115
                  errors="backslashreplace", closefd=False)
    sys.stderr = stream
    return _NativeStderr(terminal_fd, stream, previous)


def _stop_reaper(reaper: subprocess.Popen) -> None:
    """Close the watchdog's pipe (it then ends what is left of the local Ray) and wait for it."""
    if reaper.stdin is not None:
        reaper.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(REAPER_WAIT_S)
