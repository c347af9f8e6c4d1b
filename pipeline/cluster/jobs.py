"""Run ``asr`` commands on a Ray cluster as Ray Jobs.

    asr submit [--address URL] [--no-wait] [--pip PKG ...] [--runtime-env FILE] -- transcribe DIR --out OUT

The job runs ``python -m pipeline.cli <command...>`` (what ``asr <command...>`` runs) on the
head node; its Ray work (e.g. the Ray Data actors of ``transcribe``) spreads over the
cluster. Its log is followed here until it ends.

Code: the job's ``runtime_env`` has ``working_dir`` = this project root, so the cluster
runs the code checked out here, ``models/`` included. ``.venv``, ``.git``, ``runs`` and
``__pycache__`` are excluded, and Ray also leaves out what ``.gitignore`` lists. The job's
working directory is that uploaded copy, so give paths to data and outputs as absolute
paths that exist on the cluster (shared storage), not relative to this machine.

Dependencies: none are installed per job by default. The nodes must already have the
project's dependencies (``configs/cluster.yaml`` pip-installs the project in its
``setup_commands``); the uploaded code then shadows the installed package. Add packages
with ``--pip PKG`` (repeatable), or pass a whole ``runtime_env`` as YAML with
``--runtime-env FILE`` (its keys win, except that its ``excludes`` are added to ours).

Address: ``--address`` is the dashboard URL (``http://HEAD:8265``); by Ray's rule a set
``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` takes precedence over it, and with none of
them the client looks for a cluster started on this machine.

Authentication: Ray 2.60 clusters started with ``ray start`` use token authentication.
Submit with ``RAY_AUTH_MODE=token`` set and the cluster's token in ``~/.ray/auth_token``
(or ``RAY_AUTH_TOKEN``); otherwise the Jobs API answers "Authentication token is missing".

Exit code: 0 when the job SUCCEEDED (with ``--no-wait``: once it is submitted), 1 when it
ended otherwise (FAILED, STOPPED), 2 when it could not be submitted, 130 when following
was interrupted (the job goes on; stop it with ``ray job stop ID``).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", "__pycache__"]
DEFAULT_DASHBOARD_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
STATUS_POLL_S = 0.5  # between status checks after the log stream ends
STATUS_WAIT_S = 60.0  # how long to wait for a terminal status once the log stream ended


def job_entrypoint(command: Sequence[str]) -> str:
    """The shell command a job runs for ``asr <command...>``, each argument quoted.

    ``python -m pipeline.cli`` rather than the ``asr`` script: the cluster's Python runs the
    uploaded code whether or not ``asr`` is on the job's PATH.
    """
    return shlex.join(["python", "-m", "pipeline.cli", *command])


def build_runtime_env(runtime_env_file: str | Path | None = None, pip: Sequence[str] = ()) -> dict:
    """The job's runtime_env: this project as working_dir (with excludes), plus the file's keys and ``pip``."""
    env: dict = {"working_dir": str(PROJECT_ROOT), "excludes": list(WORKING_DIR_EXCLUDES)}
    if runtime_env_file is not None:
        loaded = yaml.safe_load(Path(runtime_env_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{runtime_env_file}: a runtime_env must be a mapping, got {type(loaded).__name__}")
        extra_excludes = loaded.pop("excludes", [])
        env.update(loaded)
        env["excludes"] = env["excludes"] + [e for e in extra_excludes if e not in env["excludes"]]
    if pip:
        existing = env.get("pip") or []
        if not isinstance(existing, list):
            raise ValueError("--pip cannot be combined with a runtime_env whose 'pip' is not a list")
        env["pip"] = existing + list(pip)
    return env


def submit_command(client: JobSubmissionClient, command: Sequence[str], runtime_env: dict) -> str:
    """Submit ``asr <command...>``; returns the submission id."""
    return client.submit_job(
        entrypoint=job_entrypoint(command),
        runtime_env=runtime_env,
        metadata={"asr_command": shlex.join(["asr", *command])},
    )


async def _print_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow_job(client: JobSubmissionClient, job_id: str, status_wait_s: float = STATUS_WAIT_S) -> JobStatus:
    """Print the job's log as it grows until the job ends; returns its final status."""
    asyncio.run(_print_logs(client, job_id))
    deadline = time.monotonic() + status_wait_s
    status = client.get_job_status(job_id)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(STATUS_POLL_S)
        status = client.get_job_status(job_id)
    return status


def add_submit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``asr submit``; the ``asr`` command to run follows ``--``."""
    parser.add_argument(
        "--address",
        default=None,
        help=f"Ray dashboard (Jobs API) URL, e.g. {DEFAULT_DASHBOARD_ADDRESS}; RAY_API_SERVER_ADDRESS or RAY_ADDRESS, when set, take precedence (Ray's rule)",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following the job")
    parser.add_argument("--pip", action="append", default=[], metavar="PKG", help="pip package to install for the job (repeatable)")
    parser.add_argument("--runtime-env", default=None, metavar="FILE", help="YAML runtime_env merged into the job's")
    parser.add_argument("asr_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="asr command to run, e.g. transcribe DIR --out OUT")
    return parser


def run_submit(args: argparse.Namespace) -> int:
    """Run ``asr submit``; returns the exit code described in the module docstring."""
    command = list(args.asr_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("asr submit: give the asr command to run after --, e.g. asr submit -- transcribe DIR --out OUT", file=sys.stderr)
        return 2
    try:
        runtime_env = build_runtime_env(args.runtime_env, args.pip)
        client = JobSubmissionClient(args.address)
        job_id = submit_command(client, command, runtime_env)
    except (ConnectionError, RuntimeError, ValueError, OSError, yaml.YAMLError) as exc:
        print(f"asr submit: could not submit the job: {exc}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}: asr {shlex.join(command)}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = follow_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on (stop it with: ray job stop {job_id})", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.cluster.jobs [options] -- COMMAND ...`` (same as ``asr submit``)."""
    parser = add_submit_arguments(argparse.ArgumentParser(prog="asr submit", description="Submit an asr command as a Ray Job"))
    return run_submit(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
