"""A two-node Ray cluster on 127.0.0.1 (``ray start --block`` twice) and ``asr submit`` of a
batch transcription through the Jobs API, with Ray 2.60 token authentication on."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import NO_VAD, run_at_once

from pipeline.batch.job import TRANSCRIPTS_NAME
from pipeline.cluster.jobs import WORKING_DIR_EXCLUDES, add_submit_arguments, build_runtime_env, job_entrypoint, run_submit
from workers.recognizer import Recognizer

VENV_BIN = Path(sys.executable).parent  # holds the `ray` executable
START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 180.0
NODE_PORT_OPTIONS = (  # each node gets its own free port for these, so two nodes share one host
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


@dataclass
class Cluster:
    dashboard_url: str
    gcs_address: str
    env: dict[str, str]
    temp_dir: Path


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_env() -> dict[str, str]:
    """Environment of every Ray process and client here: token auth on, this venv's `ray` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    # On SIGTERM a node first drains (waits up to 30 s for leased workers to be returned, for
    # Serve); a finished test has nothing to hand over, so shut down at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block ...` in the background (own process group), output to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            ["ray", "start", "--block", "--disable-usage-stats", "--num-cpus=1", f"--object-store-memory={100 * 1024**2}", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _wait_for(what: str, ready, procs: list[subprocess.Popen], logs: list[Path], timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``ready()`` until true; fail with the nodes' logs if a node exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
            pytest.fail(f"{what}: {'a node exited' if dead else f'not ready after {timeout_s:.0f} s'}\n{tails}")
        time.sleep(0.5)


def _http_answers(url: str) -> bool:
    """Any HTTP answer (401 included: token auth) means the server is up."""
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block` (it then stops its node's processes); SIGKILL its group if it hangs."""
    for p in reversed(procs):  # the worker node first, then the head
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[Cluster]:
    """A head (resource ``head``, dashboard/Jobs API) and a second node (resource ``node2``), stopped afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray puts unix sockets under it
    env = _ray_env()
    gcs_port, dashboard_port, client_port, *node_ports = _free_ports(3 + 2 * len(NODE_PORT_OPTIONS))
    head_ports = [f"{opt}={port}" for opt, port in zip(NODE_PORT_OPTIONS, node_ports)]
    node2_ports = [f"{opt}={port}" for opt, port in zip(NODE_PORT_OPTIONS, node_ports[len(NODE_PORT_OPTIONS) :])]
    logs = [temp_dir / "head.log", temp_dir / "node2.log"]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_node(
            ["--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
             f"--temp-dir={temp_dir}", '--resources={"head": 1}', *head_ports],
            env, logs[0],
        ))
        _wait_for("head node", lambda: "Ray runtime started" in logs[0].read_text(), procs, logs)
        procs.append(_start_node(
            [f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1", '--resources={"node2": 1}', *node2_ports],
            env, logs[1],
        ))
        _wait_for("second node", lambda: "Ray runtime started" in logs[1].read_text(), procs, logs)
        url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for("dashboard", lambda: _http_answers(f"{url}/api/version"), procs, logs)
        yield Cluster(url, f"127.0.0.1:{gcs_port}", env, temp_dir)
    finally:
        _stop(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _make_inputs(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    files = [root / "a_8k.wav", root / "b_16k.wav", root / "sub" / "c_44k.flac"]
    for path, rate in zip(files, (8000, 16000, 44100)):
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(0.7 * rate)) / rate
        sf.write(path, (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32), rate)
    return files


def _stream_wave() -> np.ndarray:
    """1.7 s of a rising chirp plus noise at 16 kHz (the streaming session's input)."""
    rng = np.random.default_rng(1)
    t = np.arange(int(1.7 * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def cluster_runs(two_node_cluster, tiny_bundle, tmp_path_factory) -> dict[str, tuple]:
    """The two drivers the slow tests check, started at once on the cluster (each is mostly
    python and torch imports in its driver and in its actors, which overlap on 2 CPUs; the stage
    actors ask for no CPU, the batch job's actor for one, of the cluster's two):

    - ``job``: ``asr submit`` of a batch transcription of ``_make_inputs`` through the Jobs API:
      (the finished command, its folder with ``audio/`` and ``out/``, the inputs);
    - ``stream``: ``STREAM_DRIVER``, a streaming session with actors on both nodes, on
      ``_stream_wave``: (the finished command, the wave);
    - ``serve``: ``SERVE_DRIVER``, ``asr serve --address`` on the cluster and a websocket client
      of it on ``_stream_wave``: (the finished command, the wave)."""
    root = tmp_path_factory.mktemp("cluster_runs")
    inputs = _make_inputs(root / "audio")
    wave = _stream_wave()
    sf.write(root / "s.wav", wave, 16000)
    commands = {
        "job": ([sys.executable, "-m", "pipeline.cli", "submit", "--address", two_node_cluster.dashboard_url, "--",
                 "transcribe", str(root / "audio"), "--out", str(root / "out"), "--model", str(tiny_bundle), "--format", "txt",
                 "--set", "vad.enabled=false"],  # generated tones: see conftest.NO_VAD
                {"env": two_node_cluster.env}),
        "stream": ([sys.executable, "-c", STREAM_DRIVER, two_node_cluster.gcs_address, str(tiny_bundle), str(root / "s.wav")],
                   {"env": {**two_node_cluster.env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}}),
        "serve": ([sys.executable, "-c", SERVE_DRIVER, two_node_cluster.gcs_address, str(tiny_bundle), str(root / "s.wav"),
                   str(_free_ports(1)[0])],
                  {"env": {**two_node_cluster.env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}}),
    }
    done = run_at_once(commands, root, JOB_TIMEOUT_S)
    return {"job": (done["job"], root, inputs), "stream": (done["stream"], wave), "serve": (done["serve"], wave)}


@pytest.mark.slow
def test_submit_batch_transcription_job(cluster_runs, tiny_bundle):
    proc, root, inputs = cluster_runs["job"]
    out = root / "out"
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "SUCCEEDED" in log and "3 files: 3 transcribed" in log, log
    rows = [json.loads(line) for line in (out / TRANSCRIPTS_NAME).read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in inputs)
    reference = Recognizer(tiny_bundle, vad=NO_VAD)
    for row in rows:
        assert row["error"] is None
        assert row["text"] == reference.transcribe_file(row["path"]).text
        assert (out / Path(row["path"]).relative_to(root / "audio")).with_suffix(".txt").read_text() == row["text"] + "\n"


def test_entrypoint_quotes_each_argument():
    assert job_entrypoint(["transcribe", "/data/my audio", "--out", "/o"]) == "python -m pipeline.cli transcribe '/data/my audio' --out /o"


def test_runtime_env_ships_the_project_and_merges_file_and_pip(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {OMP_NUM_THREADS: '1'}\nexcludes: [data]\npip: [jiwer]\n")
    env = build_runtime_env(env_file, pip=["rich"])
    assert Path(env["working_dir"]) == Path(__file__).resolve().parents[2]
    assert env["excludes"] == [*WORKING_DIR_EXCLUDES, "data"] and "models" not in env["excludes"]
    assert env["pip"] == ["jiwer", "rich"] and env["env_vars"] == {"OMP_NUM_THREADS": "1"}
    assert "pip" not in build_runtime_env()


def test_submit_needs_a_command_and_a_reachable_cluster(capsys):
    parser = add_submit_arguments(argparse.ArgumentParser())
    assert run_submit(parser.parse_args(["--"])) == 2
    (port,) = _free_ports(1)
    assert run_submit(parser.parse_args(["--address", f"http://127.0.0.1:{port}", "--", "transcribe", "x", "--out", "y"])) == 2
    assert "could not submit" in capsys.readouterr().err


def _driver_result(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a driver printed after ``RESULT `` (Ray's log lines, such as the raylet's
    "worker processes have been started" warning, reach the driver's stdout at any time, even
    after the result)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0].removeprefix("RESULT "))


STREAM_DRIVER = """
import json, sys
import numpy as np, ray, soundfile as sf
from ray.util.state import list_actors
from pipeline.config import load_config
from pipeline.streaming import StreamingPipeline
config = load_config(None, ["streaming.acoustic_resources={node2: 0.5}", "streaming.decoder_resources={head: 0.5}",
                            "streaming.acoustic_actors=1", "streaming.decoder_actors=1", "decoder.kind=greedy", "vad.enabled=false"])
ray.init(address=sys.argv[1])
pipe = StreamingPipeline(config, sys.argv[2])
wave, rate = sf.read(sys.argv[3], dtype="float32")
sid = pipe.open_stream()
results = []
for start in range(0, len(wave), 1234):
    results += pipe.push(sid, wave[start : start + 1234], rate)
results += pipe.close(sid)
names = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
placed = {}  # actor class -> the nodes its actors are on (one acoustic and one decoder actor: fewer to start)
# address: this cluster's (the state API otherwise looks for a Ray on the machine, and fails when there are several)
for a in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")]):
    if a.class_name.endswith("Actor"):
        placed.setdefault(a.class_name, set()).update(k for k in names[a.node_id] if k in ("head", "node2"))
placed = {cls: sorted(nodes) for cls, nodes in placed.items()}
# Ray's task events: none recorded for the stage actors' calls (enable_task_events=False; they
# grew the GCS without bound on long streams), while a plain task's are (the probe works).
import time
from ray.util.state import list_tasks
probe = ray.remote(lambda: 1)
ray.get(probe.remote())
deadline, recorded = time.time() + 20, {}
while time.time() < deadline and not recorded.get("<lambda>"):
    time.sleep(0.5)
    recorded = {}
    for t in list_tasks(address=sys.argv[1], limit=10000, raise_on_missing_output=False):
        name = t.func_or_class_name.split(".")[-1] if t.func_or_class_name else ""
        recorded[name] = recorded.get(name, 0) + 1
calls = {k: v for k, v in recorded.items() if k in ("push_many", "process_many")}
print("RESULT " + json.dumps({"final": [r.text for r in results if r.is_final], "placed": placed, "stage_calls_recorded": calls,
                  "probe_recorded": recorded.get("<lambda>", 0)}))
pipe.shutdown()
"""


@pytest.mark.slow
def test_streaming_session_with_actors_on_both_nodes(cluster_runs, tiny_bundle):
    from workers.decoding.decoder import DecoderConfig
    from workers.recognizer import StreamingRecognizer

    proc, wave = cluster_runs["stream"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = _driver_result(proc)
    assert out["placed"]["AcousticActor"] == ["node2"], out
    assert out["placed"]["DecoderActor"] == ["head"], out
    assert out["probe_recorded"] >= 1 and out["stage_calls_recorded"] == {}, out
    from pipeline.config import load_config

    streaming = load_config().streaming
    reference = StreamingRecognizer(tiny_bundle, DecoderConfig(kind="greedy"), streaming.chunk_ms, streaming.lookahead_ms,
                                    streaming.endpoint_silence_ms, vad=NO_VAD)
    for start in range(0, len(wave), 1234):
        reference.push(wave[start : start + 1234], 16000)
    assert out["final"] == [r.text for r in reference.finish() if r.is_final]


SERVE_DRIVER = """
import json, signal, subprocess, sys, threading, time, urllib.request
import ray, soundfile as sf
from ray import serve
from ray.util.state import list_actors
from pipeline.serve.client import VoskClient
address, bundle, wav, port = sys.argv[1:5]
server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--address", address, "--port", port, "--model", bundle,
                           "--decoder", "greedy", "--set", "vad.enabled=false"], stdout=subprocess.PIPE, text=True)
serving = ""
for line in server.stdout:  # blocks until it serves (or exits); Ray's own log lines may come first
    if line.startswith("serving "):
        serving = line.strip()
        break
threading.Thread(target=server.stdout.read, daemon=True).start()  # keep the pipe drained
wave, rate = sf.read(wav, dtype="float32")
replies = []
with VoskClient(f"ws://127.0.0.1:{port}", rate) as client:
    for start in range(0, len(wave), 3200):
        replies.append(client.send_audio(wave[start : start + 3200]))
    replies.append(client.eof())
with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as reply:
    stats = json.loads(reply.read())
server.send_signal(signal.SIGTERM)
returncode = server.wait(timeout=120)
ray.init(address=address)
stages = ("IngestActor", "FeatureActor", "AcousticActor", "DecoderActor", "ServeReplica:asr:AsrIngress")
left = [a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")]) if a.class_name in stages]
print("RESULT " + json.dumps({"serving": serving, "returncode": returncode, "direct": stats["direct"],
                  "final": [r["text"] for r in replies if "text" in r], "apps": list(serve.status().applications), "stage_actors_left": left}))
"""


@pytest.mark.slow
def test_serve_on_the_cluster(cluster_runs, tiny_bundle):
    """``asr serve --address``: deployed on a running cluster, reached through the Serve proxy
    on the port, the same finals as in-process; on SIGTERM it removes its application and stage
    actors and leaves the cluster running."""
    from pipeline.config import load_config
    from workers.decoding.decoder import DecoderConfig
    from workers.recognizer import StreamingRecognizer

    proc, wave = cluster_runs["serve"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = _driver_result(proc)
    assert out["serving"].startswith("serving ws://127.0.0.1:"), out
    assert out["returncode"] == 0 and out["direct"] is False, out  # on a cluster: through the proxy
    assert out["apps"] == [] and out["stage_actors_left"] == [], out
    streaming = load_config().streaming
    reference = StreamingRecognizer(tiny_bundle, DecoderConfig(kind="greedy"), streaming.chunk_ms, streaming.lookahead_ms,
                                    streaming.endpoint_silence_ms, vad=NO_VAD)
    from pipeline.serve.client import pcm16

    for start in range(0, len(wave), 3200):  # what the client sent: 16-bit PCM
        reference.push(np.frombuffer(pcm16(wave[start : start + 3200]), "<i2").astype(np.float32) / 32768, 16000)
    assert " ".join(out["final"]).split() == " ".join(r.text for r in reference.finish() if r.is_final).split()
