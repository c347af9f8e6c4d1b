"""Batch transcription on a local Ray: every input accounted for, same text as in-process, resume."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import soundfile as sf
import torch
from conftest import NO_VAD

import pipeline.batch.job as batch_mod
import pipeline.batch.stages as batch_stages
from pipeline.batch.cli import add_transcribe_arguments, format_summary, run_transcribe
from pipeline.batch.job import (
    PARTIAL_NAME,
    TRANSCRIPTS_NAME,
    discover_inputs,
    to_srt,
    transcribe_batch,
    transcribe_inputs,
)
from workers.decoding.decoder import DecoderConfig
from workers.recognizer import Recognizer

AN4 = Path(__file__).resolve().parents[3] / "shared" / "data" / "an4"  # real utterances, used when present

BAD_REASONS = {  # file name -> a phrase its error must contain
    "bad/empty.wav": "empty file",
    "bad/not_audio.wav": "not readable audio",
    "bad/truncated.wav": "no audio samples",
    "bad/odd_bytes.raw": "truncated raw PCM",
    "bad/dangling.wav": "broken symbolic link",
}
COLLIDING = {"sub/d.flac", "sub/d.ogg"}  # same stem: their outputs keep the audio suffix


def _tone(rate_hz: int, seconds: float, seed: int) -> np.ndarray:
    """A chirp plus noise, float32 in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _make_tree(root: Path) -> tuple[list[str], list[str]]:
    """Audio files of several rates/formats, nested, plus bad files. Returns (good, bad) relative paths."""
    good = {
        "a_8k.wav": (8000, 0.6),
        "b_16k.wav": (16000, 1.2),
        "c_44k.wav": (44100, 0.8),
        "sub/d.flac": (16000, 0.9),
        "sub/d.ogg": (16000, 0.7),
        "sub/deeper/e_16k.wav": (16000, 0.4),
    }
    for n, (rel, (rate, seconds)) in enumerate(good.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, _tone(rate, seconds, n), rate)
    good_rel = list(good)
    if AN4.is_dir():
        for raw in sorted(AN4.rglob("*.raw"))[:3]:
            rel = f"an4/{raw.name}"
            (root / "an4").mkdir(exist_ok=True)
            shutil.copyfile(raw, root / rel)
            good_rel.append(rel)
    (root / "bad").mkdir()
    (root / "bad/empty.wav").write_bytes(b"")
    (root / "bad/not_audio.wav").write_text("this is not audio\n" * 20)
    (root / "bad/truncated.wav").write_bytes((root / "b_16k.wav").read_bytes()[:44])
    (root / "bad/odd_bytes.raw").write_bytes(b"\x01\x02\x03")
    (root / "bad/dangling.wav").symlink_to(root / "bad/deleted.wav")
    (root / "notes.txt").write_text("not an audio suffix: ignored\n")
    return good_rel, list(BAD_REASONS)


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / TRANSCRIPTS_NAME).read_text().splitlines()]


CRASH_NAME = "crash_me.raw"  # a batch holding a file of this name kills its acoustic actor (CrashingAcousticRows)


class CrashingAcousticRows(batch_mod.AcousticRows):
    """The acoustic stage with a fault injected: a batch holding a file named ``CRASH_NAME`` makes
    its actor's process exit at once, as a kill for memory would. Shipped to Ray's workers by
    value (this module is registered with cloudpickle below); the production stage has no such hook."""

    def __call__(self, batch):
        if any(Path(item.path).name == CRASH_NAME for item in batch_stages.unpack(batch)):
            os._exit(1)
        return super().__call__(batch)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def batch_ray():
    """A local Ray of its own (not conftest.local_ray: Ray Data actors of its jobs can outlive them)."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=150 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("audio_tree")
    good, bad = _make_tree(root)
    return root, good, bad


@pytest.fixture(scope="module")
def first_run(batch_ray, tree, tiny_bundle, tmp_path_factory) -> tuple[Path, dict]:
    root, _, _ = tree
    out = tmp_path_factory.mktemp("out")
    summary = transcribe_inputs(root, out, bundle_path=tiny_bundle, formats=("txt", "srt"), batch_size=3, vad=NO_VAD)
    return out, summary


def test_every_input_exactly_once_with_in_process_text(tree, first_run, tiny_bundle):
    root, good, bad = tree
    out, summary = first_run
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(root / rel) for rel in good + bad)
    assert len(set(paths)) == len(paths)
    assert summary["files"] == len(good) + len(bad)
    assert summary["transcribed"] == len(good) and summary["errors"] == len(bad) and summary["skipped"] == 0
    assert summary["audio_s"] > 0 and summary["rtf"] > 0
    assert not (out / PARTIAL_NAME).exists()
    reference = Recognizer(tiny_bundle, vad=NO_VAD)
    by_path = {r["path"]: r for r in rows}
    for rel in good:
        row, expected = by_path[str(root / rel)], reference.transcribe_file(root / rel)
        assert row["error"] is None
        assert row["text"] == expected.text, rel
        assert row["duration_s"] == pytest.approx(expected.duration_s, abs=1e-3)
        assert [w["word"] for w in row["words"]] == [w.word for w in expected.words]
        assert all(0 <= w["start_s"] <= w["end_s"] <= row["duration_s"] + 1e-6 for w in row["words"])


def test_errors_name_the_reason(tree, first_run):
    root, _, bad = tree
    by_path = {r["path"]: r for r in _rows(first_run[0])}
    for rel in bad:
        row = by_path[str(root / rel)]
        assert BAD_REASONS[rel] in row["error"], (rel, row["error"])
        assert row["text"] == "" and row["words"] == []


def test_txt_and_srt_mirror_the_input_tree(tree, first_run):
    root, good, bad = tree
    out = first_run[0]
    by_path = {r["path"]: r for r in _rows(out)}
    for rel in good:
        base = out / rel if rel in COLLIDING else (out / rel).with_suffix("")
        assert Path(f"{base}.txt").read_text() == by_path[str(root / rel)]["text"] + "\n"
        assert Path(f"{base}.srt").is_file()
    assert not (out / "sub" / "d.txt").exists()  # neither of the two same-stem inputs lost its transcript
    for rel in bad:
        assert not (out / rel).with_suffix(".txt").exists()


def test_rerun_skips_done_inputs_and_retries_errors(tree, first_run, tiny_bundle):
    root, good, bad = tree
    out = first_run[0]
    before = _rows(out)
    summary = transcribe_inputs(root, out, bundle_path=tiny_bundle, vad=NO_VAD)  # the first run's settings
    assert (summary["skipped"], summary["transcribed"], summary["errors"]) == (len(good), 0, len(bad))
    assert _rows(out) == before


def test_rerun_with_other_settings_redoes_the_inputs(tree, first_run, tiny_bundle, batch_ray, tmp_path):
    """Records carry the settings that made them; another decoder or latency redoes them. The
    first run is the module's (a copy of its folder: one Ray Data job fewer)."""
    root, good, bad = tree
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    assert first_run[1]["transcribed"] == len(good)
    settings = {r["settings"]["chunk_ms"] for r in _rows(out) if r["error"] is None}
    assert settings == {None}
    again = transcribe_inputs(root, out, bundle_path=tiny_bundle, vad=NO_VAD, chunk_ms=300, lookahead_ms=150, batch_size=4)
    assert (again["skipped"], again["transcribed"], again["redone_new_settings"]) == (0, len(good), len(good))
    rows = [r for r in _rows(out) if r["error"] is None]
    assert len(rows) == len(good) and all(r["settings"]["chunk_ms"] == 300 for r in rows)
    assert "redone (done earlier with other settings)" in format_summary(again)


def test_overwrite_redoes_everything(tree, first_run, tiny_bundle):
    root, good, bad = tree
    out = first_run[0]
    summary = transcribe_inputs(root, out, bundle_path=tiny_bundle, overwrite=True, vad=NO_VAD)
    assert (summary["skipped"], summary["transcribed"], summary["errors"]) == (0, len(good), len(bad))
    assert len(_rows(out)) == len(good) + len(bad)


def test_manifest_input_cli_and_resume_from_partial(batch_ray, tree, tiny_bundle, tmp_path):
    """A manifest through the CLI; a line left in the partial file by an interrupted run is reused."""
    root, good, _ = tree
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(root / rel)}) + "\n" for rel in good[:3]))
    out = tmp_path / "out"
    out.mkdir()
    import dataclasses

    from pipeline.batch.job import run_settings
    from pipeline.config import load_config

    config = load_config()
    same = run_settings(str(tiny_bundle), dataclasses.replace(config.decoder, kind="greedy"), None, 0.0, config.vad)
    interrupted = {"path": str(root / good[0]), "text": "from before", "duration_s": 1.0, "words": [], "error": None,
                   "settings": same}  # made by an interrupted run with the same settings
    (out / PARTIAL_NAME).write_text(json.dumps(interrupted) + "\n" + '{"path": "half a li')
    parser = add_transcribe_arguments(argparse.ArgumentParser())
    assert run_transcribe(parser.parse_args([str(manifest), "--out", str(out), "--model", str(tiny_bundle), "--decoder", "greedy"])) == 0
    rows = {r["path"]: r for r in _rows(out)}
    assert sorted(rows) == sorted(str(root / rel) for rel in good[:3])
    assert rows[str(root / good[0])]["text"] == "from before"
    # an input that errors makes the exit code 1
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text(json.dumps({"audio": str(root / "bad/empty.wav")}) + "\n")
    assert run_transcribe(parser.parse_args([str(bad_manifest), "--out", str(out), "--model", str(tiny_bundle)])) == 1


def test_missing_input_is_exit_code_2(tmp_path, tiny_bundle, capsys):
    parser = add_transcribe_arguments(argparse.ArgumentParser())
    code = run_transcribe(parser.parse_args([str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--model", str(tiny_bundle)]))
    assert code == 2 and "nope" in capsys.readouterr().err


def test_discover_single_file_and_srt_timing(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, _tone(16000, 0.5, 0), 16000)
    (item,) = discover_inputs(path)
    assert item.rel == "x.wav" and item.duration_s == pytest.approx(0.5)
    record = {"words": [{"word": "hi", "start_s": 0.03, "end_s": 61.5}], "text": "hi", "error": None}
    assert to_srt(record) == "1\n00:00:00,030 --> 00:01:01,500\nhi\n"


def test_long_file_is_cut_at_pauses_in_a_batch(tmp_path):
    """A recording longer than vad.max_segment_s goes through the piece-by-piece path inside a
    batch of short files: its record equals Recognizer.transcribe_file, word times inside it."""
    from workers.audio.reader import load_audio
    from workers.audio.vad import VadConfig
    from workers.model.bundle import DEFAULT_BUNDLE

    files = sorted((AN4 / "wav" / "an4_clstk" / "mcfl").glob("*.raw"))[:4]
    if not files or not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("needs AN4 and the shipped model")
    pause = np.zeros(8000, dtype=np.float32)
    long = np.concatenate([np.concatenate([load_audio(f).numpy(), pause]) for f in files])
    sf.write(tmp_path / "long.wav", long, 16000)
    rec = Recognizer(None, vad=VadConfig(max_segment_s=3.0))
    paths = [str(files[0]), str(tmp_path / "long.wav"), str(files[1])]
    records = transcribe_batch(rec, paths)
    assert [r["path"] for r in records] == paths and all(r["error"] is None for r in records)
    expected = rec.transcribe_file(tmp_path / "long.wav")
    assert rec.is_long(torch.from_numpy(long)) and len(expected.words) >= 4
    assert records[1]["text"] == expected.text
    assert records[1]["duration_s"] == pytest.approx(len(long) / 16000)
    assert all(0 <= w["start_s"] <= w["end_s"] <= records[1]["duration_s"] for w in records[1]["words"])


@pytest.mark.parametrize("bad", [["--lookahead-ms", "-150"], ["--chunk-ms", "0"], ["--chunk-ms", "-300"], ["--batch-seconds", "0"]])
def test_bad_latency_is_exit_2_before_anything_starts(tmp_path, tiny_bundle, capsys, bad):
    parser = add_transcribe_arguments(argparse.ArgumentParser())
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.wav", np.zeros(8000, dtype=np.float32), 16000)
    out = tmp_path / "out"
    code = run_transcribe(parser.parse_args([str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_bundle), *bad]))
    assert code == 2
    err = capsys.readouterr().err
    assert bad[0] in err and "Traceback" not in err
    assert not out.exists()  # nothing left behind (no empty .partial file)


BATCH, RETRIES = 2, 0  # the job's defaults are 16 and 1: each extra round or retry restarts a worker (seconds)


def test_a_worker_that_dies_is_retried_boundedly_and_the_input_isolated(batch_ray, tiny_bundle, tmp_path, monkeypatch):
    """A worker process that dies on one input (``CrashingAcousticRows`` calls os._exit, as a
    kill for memory would end it) among real AN4 files: the job ends, that input has an error record,
    every other one is transcribed exactly once and as in-process."""
    good = sorted((AN4 / "wav" / "an4_clstk").rglob("*.raw"))[:7]
    if len(good) < 7:
        pytest.skip("needs AN4")
    crash = tmp_path / CRASH_NAME
    shutil.copyfile(good[0], crash)
    yields: dict[str, int] = {}
    run = batch_mod.run_dataset

    def counting(*args, **kwargs):
        for path, record, actor_s in run(*args, **kwargs):
            yields[path] = yields.get(path, 0) + 1
            yield path, record, actor_s

    monkeypatch.setattr(batch_mod, "run_dataset", counting)
    monkeypatch.setattr(batch_mod, "AcousticRows", CrashingAcousticRows)
    t0 = time.perf_counter()
    summary = transcribe_inputs([str(f) for f in good] + [str(crash)], tmp_path / "out", bundle_path=tiny_bundle,
                                decoder_config=DecoderConfig(kind="greedy"), vad=NO_VAD, batch_size=BATCH, batch_seconds=1e6,
                                task_retries=RETRIES)
    wall_s = time.perf_counter() - t0
    rows = {r["path"]: r for r in _rows(tmp_path / "out")}
    assert summary["files"] == 8 and summary["transcribed"] == 7 and summary["errors"] == 1 and len(rows) == 8
    error = rows[str(crash)]["error"]
    assert error and "worker process died" in error and "memory" in error
    attempts = int(re.search(r"each of (\d+) attempts", error).group(1))
    assert summary["failed_batches"] == 1 + math.ceil(math.log2(BATCH))  # its batch, halved until alone
    assert attempts == (1 + RETRIES) * summary["failed_batches"]
    assert str(crash) not in yields and all(yields[str(f)] == 1 for f in good)  # each good input transcribed once
    reference = Recognizer(tiny_bundle, DecoderConfig(kind="greedy"), vad=NO_VAD)
    assert [rows[str(f)]["text"] for f in good] == [reference.transcribe_file(f).text for f in good]
    assert wall_s < 150, wall_s


def test_staged_ray_job_equals_in_process_on_held_out_speech(batch_ray, tmp_path):
    """The shipped model, beam + LM, voice activity on, real held-out AN4 speakers plus an
    unreadable file: the Ray Data stages give the records that ``--local`` gives (text, word
    times, errors), and the three stages run as three operators (not fused into one UDF)."""
    from pipeline.batch.job import BatchJob, build_dataset
    from workers.model.bundle import DEFAULT_BUNDLE

    files = [f for s in ("fbbh", "mtos") for f in sorted((AN4 / "wav" / "an4_clstk" / s).glob("*.raw"))[:5]]
    if len(files) < 10 or not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("needs AN4 and the shipped model")
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio\n")
    inputs = [str(f) for f in files] + [str(bad)]
    by = {}
    for backend in ("ray", "local"):
        summary = transcribe_inputs(inputs, tmp_path / backend, batch_size=4, backend=backend)
        assert summary["ran"] == ("ray" if backend == "ray" else "in-process")
        by[backend] = {r["path"]: {k: r[k] for k in ("text", "words", "error", "duration_s")} for r in _rows(tmp_path / backend)}
    assert by["ray"] == by["local"]
    assert by["ray"][str(bad)]["error"] and sum(bool(r["words"]) for r in by["ray"].values()) >= 9
    ds = build_dataset([inputs[:2]], BatchJob(None, None, None, 0.0, "cpu"), 1, 0.0)
    assert len(list(ds.iter_rows())) == 2
    stats = ds.stats()
    for op in ("MapBatches(analyse_rows)", "MapBatches(AcousticRows)", "MapBatches(DecodeRows)"):
        assert op in stats
    assert "MapBatches(analyse_rows)->MapBatches(AcousticRows)" not in stats
    assert "MapBatches(AcousticRows)->MapBatches(DecodeRows)" not in stats
