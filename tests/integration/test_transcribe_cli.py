"""``asr transcribe`` for a newcomer: transcripts on stdout without ``--out``, small jobs
in-process (no Ray start-up) with the same results as through Ray, ``asr --version``, and
the README's main-job command on a fresh clone (``examples/``, no ``../shared`` beside it)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import ray
from conftest import NOISY, held_out_files

from pipeline.batch.job import LOCAL_MAX_AUDIO_S, choose_backend, transcribe_inputs
from pipeline.cli import main
from pipeline.cluster.session import DRIVER_STDERR_NAME

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DIGITS = EXAMPLES / "ex06_five_six_seven_eight.wav"
ENTER = EXAMPLES / "ex03_enter_one_two_three.wav"


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["transcribe", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_without_out_prints_path_and_text_per_input_and_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "empty.wav"
    bad.write_bytes(b"")
    code, out, err = _run(capsys, str(ENTER.relative_to(REPO)), str(DIGITS.relative_to(REPO)), str(bad))
    assert code == 1  # one input failed
    lines = out.splitlines()
    assert lines[0] == "examples/ex03_enter_one_two_three.wav: enter one two three"
    assert lines[1] == "examples/ex06_five_six_seven_eight.wav: five six seven eight"
    assert lines[2].startswith(f"{bad}: error: ") and len(lines) == 3
    assert "ran: in-process" in err and "->" not in err  # the summary goes to stderr, names no output file


@pytest.mark.parametrize("fmt", ["txt", "srt", "json"])
def test_without_out_prints_the_format(capsys, tmp_path, fmt):
    code, out, _ = _run(capsys, str(ENTER), "--format", fmt)
    assert code == 0
    code, _, _ = _run(capsys, str(ENTER), "--format", fmt, "--out", str(tmp_path))
    written = (tmp_path / f"ex03_enter_one_two_three.{fmt}").read_text()
    assert out == written  # what --out would write for this input
    if fmt == "txt":
        assert out == "enter one two three\n"
    elif fmt == "srt":
        assert out.startswith("1\n00:00:00,") and out.endswith("enter one two three\n")
    else:
        record = json.loads(out)
        assert record["text"] == "enter one two three" and [w["word"] for w in record["words"]] == record["text"].split()


def test_without_out_two_srt_inputs_are_headed_and_two_formats_refused(capsys):
    code, out, _ = _run(capsys, str(ENTER), str(DIGITS), "--format", "srt")
    assert code == 0
    assert out.count("==> ") == 2 and f"{ENTER.name} <==\n1\n00:00:00," in out and out.endswith("five six seven eight\n")
    code, out, err = _run(capsys, str(ENTER), "--format", "txt,srt")
    assert code == 2 and out == "" and "one --format" in err
    code, _, err = _run(capsys, str(ENTER), "--local", "--address", "127.0.0.1:1")
    assert code == 2 and "--local" in err


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    assert choose_backend("auto", LOCAL_MAX_AUDIO_S - 1) == "in-process"
    assert choose_backend("auto", LOCAL_MAX_AUDIO_S) == "ray"
    assert choose_backend("auto", 1.0, address="127.0.0.1:6379") == "ray"
    assert choose_backend("auto", 1.0, concurrency=2) == "ray"
    assert choose_backend("ray", 1.0) == "ray"
    assert choose_backend("local", 10 * LOCAL_MAX_AUDIO_S) == "in-process"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_backend("auto", 1.0) == "ray"
    with pytest.raises(ValueError):
        choose_backend("local", 1.0, address="127.0.0.1:6379")


def test_in_process_and_ray_give_the_same_records_files_and_resume(an4_root, verbose_ray_transcription, tmp_path):
    """One real utterance of each held-out AN4 speaker, shipped model, beam + LM: the in-process
    run and the Ray Data run (``asr transcribe --ray``, shared with tests/test_ray_session.py)
    write the same texts, word times, settings and .txt/.srt files."""
    files = held_out_files(an4_root)
    local = transcribe_inputs(files, tmp_path / "local", formats=("txt", "srt"), backend="local", progress=False)
    assert local["ran"] == "in-process" and not ray.is_initialized()
    done, ray_out = verbose_ray_transcription
    assert done.returncode == 0, done.stderr
    assert f"{len(files)} files: {len(files)} transcribed" in done.stdout and "ran: ray" in done.stdout
    assert local["transcribed"] == len(files)
    shutil.copytree(ray_out, tmp_path / "ray")  # the shared run's folder stays as it was
    rows = {name: [json.loads(line) for line in (tmp_path / name / "transcripts.jsonl").read_text().splitlines()]
            for name in ("local", "ray")}
    assert rows["local"] == rows["ray"]
    assert sum(len(r["words"]) for r in rows["local"]) >= len(files)  # real words, not empty transcripts
    for path in (tmp_path / "local").rglob("*.*"):
        if path.suffix in (".txt", ".srt"):
            assert path.read_text() == (tmp_path / "ray" / path.relative_to(tmp_path / "local")).read_text()
    again = transcribe_inputs(files, tmp_path / "ray", formats=("txt", "srt"), progress=False)  # resume: nothing to do
    assert (again["skipped"], again["transcribed"], again["ran"]) == (len(files), 0, "nothing")


def test_version_names_package_and_model(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("asr (lcasr) 0.1.0; model: so2pad (") and "trained 2026-12-05" in out


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_main_job_on_a_fresh_clone(ray_cli_runs):
    """The committed HEAD cloned where no ../shared exists: the README's main-job command and a
    one-file transcription work with this venv's python (nothing installed), and the main job
    prints only its summary (tests/test_ray_session.py has the rest of the quiet local Ray). Both
    ran in conftest.ray_cli_runs, beside the --verbose run."""
    (done, clone), (one_file, _) = ray_cli_runs["readme"], ray_cli_runs["readme_one_file"]
    assert not (clone.parent / "shared").exists()
    readme = (clone / "README.md").read_text()
    assert "asr transcribe examples/ --out transcripts/ --format txt --ray" in readme
    assert done.args[3:] == ["transcribe", "examples/", "--out", "transcripts/", "--format", "txt", "--ray"]
    assert done.returncode == 0, done.stderr
    assert "8 files: 8 transcribed" in done.stdout and "ran: ray" in done.stdout
    # Only the summary: nothing of Ray's (its logs go to its session directory, what its C++
    # core wrote to stderr included), no progress bar off a terminal.
    noisy = [pattern for pattern in NOISY if pattern in done.stdout + done.stderr]
    assert not noisy, f"{noisy} in:\n{done.stdout}{done.stderr}"
    assert done.stderr == ""
    assert done.stdout.startswith("8 files: 8 transcribed, 0 skipped (done earlier), 0 errors;")
    logs = Path(re.search(r"Ray's logs: (\S+)$", done.stdout.strip()).group(1))
    assert (logs / "raylet.out").is_file()
    assert "core_worker.cc" in (logs / DRIVER_STDERR_NAME).read_text()
    assert (clone / "transcripts" / "ex03_enter_one_two_three.txt").read_text() == "enter one two three\n"
    settings = json.loads((clone / "transcripts" / "transcripts.jsonl").read_text().splitlines()[0])["settings"]
    assert settings["model"] == str(clone / "models" / "default")  # the clone's code and model ran
    assert one_file.args[3:] == ["transcribe", "examples/ex06_five_six_seven_eight.wav"]
    assert one_file.returncode == 0, one_file.stderr
    assert one_file.stdout == "examples/ex06_five_six_seven_eight.wav: five six seven eight\n"
