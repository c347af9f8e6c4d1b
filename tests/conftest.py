"""Shared fixtures: paths to the real corpora and a tiny untrained model bundle."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from workers.audio.vad import VadConfig
from workers.features.mfcc import FeatureConfig, Normalizer
from workers.model.bilstm import BiLSTMCTC, ModelConfig
from workers.model.bundle import save_bundle
from workers.model.tokens import TOKEN_TO_ID, TOKENS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
AN4 = DATA / "an4"
FSDD = DATA / "fsdd"
#: Tests on generated tones and noise turn voice activity gating off: no detector hears speech
#: in them, so every word would be dropped and comparisons of texts would pass vacuously.
NO_VAD = VadConfig(enabled=False)
#: What a quiet command (no --verbose) must not print: Ray's internals (tests/test_ray_session.py,
#: tests/test_stream_mic.py).
NOISY = ("core_worker.cc", "Started a local Ray instance", "dashboard", "Loading the LM", "Running Dataset", "token", "Token",
         "WARNING", "ERROR", "Traceback")


def emissions(frames: list[str | dict[str, float]], floor: float = 1e-4) -> torch.Tensor:
    """``(len(frames), 29)`` log-probs: a character puts 1 - floor on its token, a dict
    gives probabilities; the rest is spread evenly over the other tokens."""
    probs = torch.zeros(len(frames), len(TOKENS))
    for t, frame in enumerate(frames):
        spec = {frame: 1.0} if isinstance(frame, str) else frame
        for token, p in spec.items():
            probs[t, TOKEN_TO_ID[token]] = p * (1 - floor)
        probs[t][probs[t] == 0] = floor / (len(TOKENS) - len(spec))
    return probs.log()


def make_tiny_bundle(path: Path, seed: int = 0, hidden_size: int = 24, with_lm: bool = False) -> Path:
    """An untrained 2-layer bundle (fast); optionally with a lexicon and LM from a few sentences."""
    torch.manual_seed(seed)
    features = FeatureConfig()
    model = BiLSTMCTC(ModelConfig(input_dim=features.feature_dim, hidden_size=hidden_size, num_layers=2))
    extras = {}
    if with_lm:
        from workers.decoding.lm import build_arpa, vocabulary, write_lexicon

        texts = ["yes", "no", "go", "stop", "erase one two three", "enter", "rubout", "a b c"]
        path.parent.mkdir(parents=True, exist_ok=True)
        extras = {
            "lexicon_path": write_lexicon(vocabulary(texts), path.parent / f"{path.name}_lexicon.txt"),
            "lm_path": build_arpa(texts, order=3, path=path.parent / f"{path.name}_lm.arpa"),
        }
    return save_bundle(path, model, features, Normalizer(torch.full((40,), -5.0), torch.full((40,), 8.0)), **extras)


#: In CI (``CI=true``, set by .ci/run) the corpora and the shipped model must be there: a
#: missing one fails the run instead of quietly skipping the tests that need it.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_sessionstart(session) -> None:
    if not IN_CI:
        return
    from workers.model.bundle import DEFAULT_BUNDLE

    missing = [str(p) for p in (AN4, FSDD, DEFAULT_BUNDLE / "weights.pt") if not p.exists()]
    if missing:
        pytest.exit(f"CI=true but {', '.join(missing)} missing: these tests would be skipped, not run", returncode=1)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle_lm(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle_lm") / "tiny_lm", with_lm=True)


@pytest.fixture(scope="session")
def an4_root() -> Path:
    if not AN4.is_dir():
        pytest.skip(f"{AN4} not present")
    return AN4


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests run torch with one thread, as the Ray actors do: on a small, busy machine more
    threads only spin against each other (tiny LSTMs ran up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The held-out AN4 speakers (configs/default.yaml, data.an4_dev_speakers).
HELD_OUT = ("fbbh", "ftal", "mcfl", "mdxs", "mgah", "mmkw", "mrcb", "mtos")
#: A user's environment for a command in a subprocess: no RAY_ADDRESS (a local Ray), one torch thread.
CLI_ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}


def held_out_files(an4_root: Path) -> list[str]:
    """One real utterance of each held-out AN4 speaker."""
    return [str(sorted((an4_root / "wav" / "an4_clstk" / s).glob("*.raw"))[0]) for s in HELD_OUT]


def run_at_once(commands: dict[str, tuple[list[str], dict]], logs: Path, timeout_s: float = 600.0) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands (name -> (argv, ``subprocess.Popen`` keywords such as cwd and env; env
    ``CLI_ENV`` unless given)) side by side, their output to files under ``logs``; wait for all of
    them (killing what is left at ``timeout_s``)."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, (args, options) in commands.items():
            with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
                procs[name] = subprocess.Popen(args, **{"env": CLI_ENV, **options}, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout_s
        for proc in procs.values():
            proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: subprocess.CompletedProcess(proc.args, proc.returncode, (logs / f"{name}.out").read_text(),
                                              (logs / f"{name}.err").read_text()) for name, proc in procs.items()}


@pytest.fixture(scope="session")
def ray_cli_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The ``asr transcribe`` runs in a subprocess, as a user runs them, that tests check afterwards;
    all started at once: most of each one's time is importing torch and starting a local Ray and Ray
    Data's actor, and side by side on 2 CPUs they overlap. Name -> (the finished command, a folder):

    - ``verbose`` (when AN4 is there): ``asr transcribe --ray --verbose`` on ``held_out_files``
      (shipped model, beam + LM) with .txt and .srt files; the folder is its --out
      (``verbose_ray_transcription``);
    - ``readme`` and ``readme_one_file`` (when git is there): in a clone of the committed HEAD where
      no ../shared exists, with this venv's python, the README's main job and a one-file
      transcription; the folder is the clone (tests/test_transcribe_cli.py).

    Tests must not write to the folders (copy them first)."""
    root = tmp_path_factory.mktemp("ray_cli_runs")
    asr = [sys.executable, "-m", "pipeline.cli"]
    commands: dict[str, tuple[list[str], dict]] = {}
    folders: dict[str, Path] = {}
    if AN4.is_dir():
        folders["verbose"] = root / "verbose_out"
        commands["verbose"] = ([*asr, "transcribe", *held_out_files(AN4), "--out", str(folders["verbose"]), "--format", "txt,srt",
                                "--verbose", "--ray"], {"cwd": REPO})
    if shutil.which("git") is not None:
        clone = folders["readme"] = folders["readme_one_file"] = root / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
        commands["readme"] = ([*asr, "transcribe", "examples/", "--out", "transcripts/", "--format", "txt", "--ray"], {"cwd": clone})
        commands["readme_one_file"] = ([*asr, "transcribe", "examples/ex06_five_six_seven_eight.wav"], {"cwd": clone})
    (root / "logs").mkdir()
    done = run_at_once(commands, root / "logs")
    return {name: (done[name], folders[name]) for name in commands}


@pytest.fixture(scope="session")
def verbose_ray_transcription(an4_root, ray_cli_runs) -> tuple[subprocess.CompletedProcess, Path]:
    """``asr transcribe --ray --verbose`` in a subprocess, as a user runs it, on ``held_out_files``
    (shipped model, beam + LM) with .txt and .srt files: (the finished command, its --out folder).
    One run for two tests, so that its local Ray and Ray Data actor start once: what --verbose
    shows (tests/test_ray_session.py) and the in-process run against the Ray run
    (tests/test_transcribe_cli.py). Tests must not write to the folder (copy it first)."""
    return ray_cli_runs["verbose"]


# --------------------------------------------------------------------------- virtual microphone

MIC_PA = """\
load-module module-native-protocol-unix auth-anonymous=1 socket={run}/pulse.sock
load-module module-null-sink sink_name=vmic_sink rate=16000 channels=1
load-module module-remap-source source_name=vmic master=vmic_sink.monitor
set-default-sink vmic_sink
set-default-source vmic
"""


def _stop_pid(pid: int, timeout_s: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def virtual_mic() -> Iterator[dict[str, str]]:
    """A PulseAudio daemon with a null sink and a source on its monitor (the default input),
    plus the silence keepalive; yields the environment that reaches it. Stopped by pid. One for the
    session (the mic tests of tests/test_stream_mic.py and tests/test_serve.py): each start took
    ~2 s and its stop ~2 s."""
    missing = [tool for tool in ("pulseaudio", "pacat", "paplay") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"PulseAudio not installed ({', '.join(missing)} missing: apt-get install pulseaudio pulseaudio-utils)")
    if ctypes.util.find_library("portaudio") is None:
        pytest.skip("PortAudio not installed (apt-get install libportaudio2)")
    run = Path(tempfile.mkdtemp(prefix="vmic-"))  # short: the socket path must fit in 108 bytes
    (run / "home").mkdir()
    (run / "mic.pa").write_text(MIC_PA.format(run=run))
    env = {
        **os.environ, "XDG_RUNTIME_DIR": str(run), "PULSE_RUNTIME_PATH": str(run / "pulse"),
        "PULSE_SERVER": f"unix:{run}/pulse.sock", "HOME": str(run / "home"),
    }  # fmt: skip
    keepalive = None
    try:
        subprocess.run(
            ["pulseaudio", "--daemonize=yes", "--system=false", "--exit-idle-time=-1", "--disallow-exit=yes",
             "-n", "-F", str(run / "mic.pa"), "--use-pid-file=yes", f"--log-target=file:{run}/pulse.log"],
            env=env, check=True, timeout=30,
        )  # fmt: skip
        keepalive = subprocess.Popen(
            ["pacat", "--playback", "--raw", "--format=s16le", "--rate=16000", "--channels=1", "--latency-msec=20", "/dev/zero"],
            env=env,
        )  # fmt: skip
        time.sleep(2)  # the keepalive makes the monitor deliver on time; give it a moment
        yield env
    finally:
        if keepalive is not None:
            keepalive.terminate()
            keepalive.wait(timeout=5)
        pid_file = run / "pulse" / "pid"
        if pid_file.is_file():
            _stop_pid(int(pid_file.read_text().split()[0]))
        shutil.rmtree(run, ignore_errors=True)


# --------------------------------------------------------------------------- one local Ray

#: Custom resources of the shared local Ray: tests/test_streaming_pipeline.py places the
#: streaming actors with them (and checks what is left of them).
LOCAL_RAY_RESOURCES = {"asr_acoustic": 3, "asr_decoder": 3}
_local_ray_modules: set[str] = set()  # the test modules that use the fixture ``local_ray``
_local_ray_started = False


def pytest_collection_modifyitems(session, config, items) -> None:
    """Tests under tests/integration/ (Ray, Serve, clusters, CUDA, the CLI's Ray commands) get the
    ``integration`` marker: ``pytest -m "not integration"`` runs the fast ones alone."""
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(str(item.fspath)).parents or "local_ray" in item.fixturenames:
            item.add_marker(pytest.mark.integration)
    _local_ray_modules.clear()
    _local_ray_modules.update(item.module.__name__ for item in items if "local_ray" in item.fixturenames)


@pytest.fixture(scope="module")
def local_ray():
    """The local Ray of the in-process streaming and training tests (2 CPUs, no GPU, 150 MB object
    store, ``LOCAL_RAY_RESOURCES``): started when first asked for and shared by consecutive test
    modules that use it (tests/test_stream_recovery.py, test_streaming_pipeline.py,
    test_training.py); shut down after the last test of such a run of modules, so other tests never
    see it (``ray.is_initialized()`` changes what some code does). A module that uses it must leave
    no actor behind: tests/test_batch.py keeps a Ray of its own (Ray Data's actors of its jobs can
    outlive them and hold the CPUs that Ray Train's workers need)."""
    import logging

    import ray

    global _local_ray_started
    if not _local_ray_started:
        assert not ray.is_initialized(), "a Ray other than the shared one is running"
        # address="local": a new Ray even when another one was started on this machine with `ray start`
        # (ray.init() with no address would join that one, and refuse these resource arguments).
        ray.init(address="local", num_cpus=2, num_gpus=0, resources=LOCAL_RAY_RESOURCES,
                 object_store_memory=150 * 1024**2, include_dashboard=False, logging_level=logging.WARNING)
        _local_ray_started = True
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Shut the shared local Ray down once the next test is not in a module that uses it (after
    this test's fixtures, module-scoped pipelines included, have been torn down)."""
    global _local_ray_started
    yield
    if _local_ray_started and (nextitem is None or nextitem.module.__name__ not in _local_ray_modules):
        import ray

        ray.shutdown()
        _local_ray_started = False


#: The corpora of ``an4_as_librispeech_and_folder`` (tests/test_train_data.py, tests/test_distributed_training.py).
TRAIN_SPEAKERS = 6
UTTS_PER_SPEAKER = 4


def _by_speaker(an4_root: Path) -> dict[str, list]:
    from workers.data.corpus import read_an4

    speakers: dict[str, list] = {}
    for u in read_an4(an4_root).utterances:
        speakers.setdefault(u.speaker, []).append(u)
    return speakers


def an4_as_librispeech_and_folder(an4_root: Path, root: Path) -> tuple[Path, Path, set[str]]:
    """Real AN4 recordings laid out as other corpora: (a LibriSpeech-layout training corpus of
    ``TRAIN_SPEAKERS`` speakers x ``UTTS_PER_SPEAKER`` utterances, ``SPEAKER/CHAPTER/*.flac`` +
    ``*.trans.txt`` in upper case; a plain dev folder of two other speakers, ``SPEAKER/N.wav`` +
    ``N.txt``; the training words)."""
    import soundfile as sf

    from workers.audio.reader import read_audio

    speakers = sorted(_by_speaker(an4_root).items())
    train_words: set[str] = set()
    libri = root / "LibriSpeech" / "train-clean-an4"
    for k, (_, utts) in enumerate(speakers[:TRAIN_SPEAKERS]):
        speaker_id, chapter = str(100 + k), "7"
        chapter_dir = libri / speaker_id / chapter
        chapter_dir.mkdir(parents=True)
        lines = []
        for n, u in enumerate(utts[:UTTS_PER_SPEAKER]):
            uid = f"{speaker_id}-{chapter}-{n:04d}"
            audio, rate = read_audio(u.audio)
            sf.write(chapter_dir / f"{uid}.flac", audio[:, 0], rate)
            lines.append(f"{uid} {u.text.upper()}")
            train_words |= set(u.text.split())
        (chapter_dir / f"{speaker_id}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    folder = root / "dev_folder"
    for name, utts in speakers[TRAIN_SPEAKERS : TRAIN_SPEAKERS + 2]:
        (folder / name).mkdir(parents=True)
        for n, u in enumerate(utts[:4]):
            audio, rate = read_audio(u.audio)
            sf.write(folder / name / f"{n}.wav", audio[:, 0], rate, subtype="PCM_16")
            (folder / name / f"{n}.txt").write_text(u.text + "\n")
    return libri.parent, folder, train_words
