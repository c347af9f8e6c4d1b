"""``scripts/stream_mic.py`` end to end, as a subprocess: a WAV file sent through the Ray
pipeline, and real capture from a PulseAudio virtual microphone (docs: VIRTUAL_MIC.md).

The model bundle is ``$ASR_STREAM_TEST_MODEL`` when set, else the trained
``models/default`` when it exists, else the tiny untrained bundle. Untrained text is
garbage, so the file test compares the printed finals with the in-process
``StreamingRecognizer`` on the same file and settings; the words of the utterance are
checked only with a trained bundle.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch
from conftest import NOISY

from pipeline.config import load_config
from pipeline.streaming import ResultPrinter, StreamError, file_blocks, format_final, run_session
from workers.audio.reader import read_audio
from workers.decoding.decoder import DecoderConfig
from workers.model.bundle import load_bundle, save_bundle
from workers.model.tokens import BLANK_ID
from workers.recognizer import StreamingRecognizer
from workers.stages import RecognitionResult

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "stream_mic.py"
TRAINED_BUNDLE = REPO / "models" / "default"
MODEL_ENV = "ASR_STREAM_TEST_MODEL"
UTTERANCE = Path("wav/an4_clstk/fclc/an149-fclc-b.raw")  # 2.3 s of a training speaker
WORDS = ("enter", "nine", "eighty")
SETTINGS = {"chunk_ms": 300.0, "lookahead_ms": 150.0, "endpoint_ms": 600.0}
FINAL_LINE = re.compile(r"^\[(\d+\.\d+) - (\d+\.\d+)\](?: (.*))?$")
SCRIPT_TIMEOUT_S = 180
#: One acoustic and one decoder actor (2 CPUs: two of each by default): every stage still has an
#: actor, and each run of the script starts 2 fewer processes that import torch and load the model or the LM.
STAGE_ACTORS = ("--set", "streaming.acoustic_actors=1", "--set", "streaming.decoder_actors=1")




@pytest.fixture(scope="module")
def chatty_bundle(tiny_bundle_lm: Path, tmp_path_factory) -> Path:
    """The tiny untrained bundle (lexicon + LM) with its weights scaled up and the blank
    made less likely, so that it writes letters: an all-blank text would make comparing
    outputs vacuous. Still garbage, but input-dependent garbage."""
    bundle = load_bundle(tiny_bundle_lm)
    model = bundle.model
    with torch.no_grad():
        for lstm in [*model.forward_lstms, *model.backward_lstms]:
            for name, weight in lstm.named_parameters():
                if name.startswith("weight"):
                    weight.mul_(2.0)
        model.output.weight.mul_(4.0)
        model.output.bias[BLANK_ID] -= 3.0
    path = tmp_path_factory.mktemp("chatty") / "bundle"
    return save_bundle(path, model, bundle.features, bundle.normalizer, bundle.lexicon_path, bundle.lm_path)


@pytest.fixture(scope="module")
def bundle(chatty_bundle: Path) -> Path:
    """$ASR_STREAM_TEST_MODEL (meant for a trained bundle), else models/default, else the
    untrained chatty one."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    return TRAINED_BUNDLE if (TRAINED_BUNDLE / "config.json").is_file() else chatty_bundle


@pytest.fixture(scope="module")
def trained(bundle: Path, chatty_bundle: Path) -> bool:
    """Whether the words of the utterance can be expected (not from an untrained bundle)."""
    return bundle != chatty_bundle


@pytest.fixture(scope="module")
def an4_wav(an4_root, tmp_path_factory) -> Path:
    """The AN4 raw utterance as a 16 kHz mono 16-bit WAV."""
    samples, rate = read_audio(an4_root / UTTERANCE)
    path = tmp_path_factory.mktemp("an4") / "utterance.wav"
    sf.write(path, samples, rate, subtype="PCM_16")
    return path


def script_args(bundle: Path, decoder: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(SCRIPT), "--model", str(bundle), "--decoder", decoder,
        "--chunk-ms", str(SETTINGS["chunk_ms"]), "--lookahead-ms", str(SETTINGS["lookahead_ms"]),
        "--endpoint-ms", str(SETTINGS["endpoint_ms"]), *STAGE_ACTORS, *extra,
    ]  # fmt: skip


def final_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if FINAL_LINE.match(line)]


def final_text(lines: list[str]) -> str:
    return " ".join(FINAL_LINE.match(line).group(3) or "" for line in lines).strip()


def in_process_lines(bundle: Path, wav: Path, decoder: str) -> list[str]:
    """What the script should print: the in-process recogniser pushed the same blocks."""
    streaming = load_config().streaming
    rec = StreamingRecognizer(
        bundle, DecoderConfig(kind=decoder), SETTINGS["chunk_ms"], SETTINGS["lookahead_ms"],
        SETTINGS["endpoint_ms"], streaming.ingest_chunk_ms, device="cpu",
    )  # fmt: skip
    blocks, rate = file_blocks(wav, streaming.ingest_chunk_ms, paced=False)
    results = [r for block in blocks for r in rec.push(block, rate)] + rec.finish()
    return [format_final(r) for r in results if r.is_final]


def assert_clean_exit(proc: subprocess.CompletedProcess | _Running, stderr: str) -> None:
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr


def test_file_fast_matches_in_process(bundle: Path, trained: bool, an4_wav: Path) -> None:
    """The script on a file, unpaced: the finals of the in-process recogniser, and only them
    (stdout) and two lines (stderr): nothing of Ray's unless --verbose."""
    proc = subprocess.run(
        script_args(bundle, "beam", "--file", str(an4_wav), "--fast"),
        capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, cwd=REPO,
    )  # fmt: skip
    assert_clean_exit(proc, proc.stderr)
    noisy = [pattern for pattern in NOISY if pattern in proc.stdout + proc.stderr]
    assert not noisy, f"{noisy} in:\n{proc.stdout}{proc.stderr}"  # a quiet local Ray (issue 13, item 10)
    assert [line.split(" ")[0] for line in proc.stderr.splitlines()] == ["Streaming", "Ray's"], proc.stderr
    printed = final_lines(proc.stdout)
    assert printed == in_process_lines(bundle, an4_wav, "beam"), proc.stdout
    assert final_text(printed)  # the comparison is not vacuous
    if trained:
        assert set(WORDS) <= set(final_text(printed).split())


def test_missing_input_device_exits_2(capsys) -> None:
    """No such device (or no PortAudio at all): a one-line error and exit code 2, before Ray starts.
    The script's ``main`` in this process (no second python + torch import for an argument error)."""
    import importlib.util

    import ray

    spec = importlib.util.spec_from_file_location("stream_mic_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--mic", "--device", "no-such-input-device-xyz"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err
    assert not ray.is_initialized()


class _FakePipeline:
    """Stands in for ``StreamingPipeline`` in ``run_session``; can raise Ctrl-C in a push."""

    def __init__(self, interrupt_at_push: int | None, lose_at_push: int | None = None) -> None:
        self.interrupt_at_push = interrupt_at_push
        self.lose_at_push = lose_at_push
        self.pushes = 0
        self.closed = False

    def open_stream(self) -> str:
        return "s"

    def push(self, stream_id: str, block: np.ndarray, rate_hz: int) -> list[RecognitionResult]:
        self.pushes += 1
        if self.pushes == self.interrupt_at_push:
            raise KeyboardInterrupt
        if self.pushes == self.lose_at_push:
            raise StreamError(f"stream {stream_id} was lost after a stage actor crashed (ActorDiedError): more than "
                              "streaming.replay_buffer_s=60 s of its audio since its last final was needed to replay it")
        return [RecognitionResult(stream_id, "partial", False, 0.0, 0.1 * self.pushes)]

    def close(self, stream_id: str) -> list[RecognitionResult]:
        self.closed = True
        return [RecognitionResult(stream_id, "last words", True, 0.0, 0.3)]


@pytest.mark.parametrize("where", ["capture", "push"])
def test_ctrl_c_flushes_the_last_result_and_stops_capture(where: str) -> None:
    """Ctrl-C while waiting for audio, or inside a push: the stream is closed, its final
    printed, the capture stopped, and the session ends normally (exit code 0)."""
    capture_stopped = []

    def blocks():
        try:
            for _ in range(3):
                yield np.zeros(1600, np.float32)
            if where == "capture":
                raise KeyboardInterrupt
            yield np.zeros(1600, np.float32)
        finally:
            capture_stopped.append(True)

    pipeline = _FakePipeline(interrupt_at_push=3 if where == "push" else None)
    out = io.StringIO()
    assert run_session(pipeline, blocks(), 16000, ResultPrinter(out)) == 0
    assert pipeline.closed and capture_stopped
    assert out.getvalue() == "[0.00 - 0.30] last words\n"


def test_a_lost_stream_is_one_line_and_exit_1(capsys) -> None:
    """A stream the pipeline could not replay after a crash (StreamError): one line on stderr,
    no traceback, exit 1, the capture stopped (tests/test_stream_recovery.py makes a real one)."""
    capture_stopped = []

    def blocks():
        try:
            while True:
                yield np.zeros(1600, np.float32)
        finally:
            capture_stopped.append(True)

    pipeline = _FakePipeline(interrupt_at_push=None, lose_at_push=3)
    assert run_session(pipeline, blocks(), 16000, ResultPrinter(io.StringIO())) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: stream s was lost") and "Traceback" not in err
    assert capture_stopped and not pipeline.closed


# --------------------------------------------------------------------------- virtual microphone
# The fixture ``virtual_mic`` is in conftest.py (one PulseAudio daemon for this module and tests/test_serve.py).


class _Running:
    """A subprocess whose stdout and stderr are collected line by line in threads."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.listening = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)
            if line.startswith("Listening"):
                self.listening.set()

    def wait(self, timeout_s: float) -> int:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for thread in self._threads:
            thread.join(timeout=5)
        return self.proc.returncode

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


def test_mic_capture_through_virtual_microphone(virtual_mic: dict[str, str], bundle: Path, trained: bool, an4_wav: Path) -> None:
    duration_s = sf.info(an4_wav).duration
    max_seconds = duration_s + 1.5  # room for playback to start late
    env = {**os.environ, "PULSE_SERVER": virtual_mic["PULSE_SERVER"]}  # all the script needs
    # Endpointing off (longer than the capture): one final then covers all the captured audio.
    no_endpoint = ("--endpoint-ms", str(1000 * (max_seconds + 10)))
    running = _Running(script_args(bundle, "greedy", "--mic", "--max-seconds", str(max_seconds), *no_endpoint), env)
    try:
        assert running.listening.wait(SCRIPT_TIMEOUT_S), "".join(running.stderr)
        subprocess.run(["paplay", str(an4_wav)], env=virtual_mic, check=True, timeout=30)
    finally:
        running.wait(SCRIPT_TIMEOUT_S)
    stderr = "".join(running.stderr)
    assert_clean_exit(running, stderr)
    printed = final_lines("".join(running.stdout))
    assert printed, "".join(running.stdout) + stderr
    end_s = float(FINAL_LINE.match(printed[-1]).group(2))
    assert end_s >= max_seconds - 0.2  # all the captured audio went through the pipeline
    if trained:
        assert set(WORDS) <= set(final_text(printed).split()), printed


def test_a_killed_stage_actor_puts_no_ray_text_on_stdout(bundle: Path, an4_wav: Path, tmp_path: Path) -> None:
    """The acoustic actor killed mid-stream under ``stream_mic.py --file`` (paced): Ray restarts it
    and the stream recovers; the raylet's "A worker died" message that Ray's driver prints goes to
    the log directory, so stdout holds final lines only, and the script exits 0."""
    samples, rate = sf.read(an4_wav, dtype="int16")
    pause = np.zeros(rate, dtype=np.int16)
    long_wav = tmp_path / "three.wav"
    sf.write(long_wav, np.concatenate([samples, pause, samples, pause, samples]), rate, subtype="PCM_16")
    run = _Running(script_args(bundle, "greedy", "--file", str(long_wav)), env=os.environ.copy())
    try:
        driver = psutil.Process(run.proc.pid)
        deadline = time.monotonic() + SCRIPT_TIMEOUT_S
        actor = None
        while actor is None and time.monotonic() < deadline and run.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                actor = next((p for p in driver.children(recursive=True) if "AcousticActor" in " ".join(p.cmdline())), None)
            time.sleep(0.2)
        assert actor is not None, "".join(run.stderr)[-3000:]
        while not any(FINAL_LINE.match(line) for line in run.stdout) and time.monotonic() < deadline:
            time.sleep(0.2)  # the stream is under way: its first utterance is final
        actor.kill()
        assert run.wait(SCRIPT_TIMEOUT_S) == 0, "".join(run.stderr)[-3000:]
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    stdout = "".join(run.stdout)
    assert [line for line in run.stdout if not FINAL_LINE.match(line.rstrip("\n"))] == [], stdout
    assert len(final_lines(stdout)) >= 2, stdout  # finals after the crash too
    assert "raylet" not in stdout and "worker died" not in stdout.lower()
    ray_line = next(line for line in run.stderr if line.startswith("Ray's"))  # names the log directory
    log_dir = Path(re.search(r"(/\S+)", ray_line).group(1).rstrip(".,;:)"))
    errors = log_dir / "driver-raylet-errors.log"  # pipeline.cluster.session.RAYLET_ERRORS_NAME
    assert errors.is_file() and "died" in errors.read_text().lower(), (ray_line, sorted(p.name for p in log_dir.glob("*"))[:20])
