"""`asr eval`: figures equal jiwer's on the same pairs; failed inputs are listed, not skipped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jiwer
import pytest

from pipeline.config import load_config
from pipeline.evaluate import add_eval_arguments, evaluate, run_eval, score
from workers.data.corpus import Utterance, read_an4, write_manifest
from workers.decoding.decoder import DecoderConfig
from workers.recognizer import Recognizer


def test_score_matches_jiwer():
    refs = ["yes", "erase a b c", "one two three", "go"]
    hyps = ["yes", "erase b c d", "one too three four", ""]
    report = score(["a", "b", "c", "d"], refs, hyps, worst_n=2)
    words = jiwer.process_words(refs, hyps)
    assert report.wer == pytest.approx(jiwer.wer(refs, hyps))
    assert report.cer == pytest.approx(jiwer.cer(refs, hyps))
    assert (report.substitutions, report.deletions, report.insertions) == (words.substitutions, words.deletions, words.insertions)
    assert report.reference_words == 9 and report.utterances == 4
    assert [w["id"] for w in report.worst] == ["b", "c"]
    assert "REF:" in report.worst[0]["alignment"] and "HYP:" in report.worst[0]["alignment"]


@pytest.fixture()
def small_manifest(an4_root, tmp_path):
    utts = read_an4(an4_root).utterances[:5]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEfmt nonsense")
    utts.append(Utterance("broken", str(bad), 1.0, "yes", "nobody"))
    return write_manifest(utts, tmp_path / "m.jsonl"), utts


@pytest.mark.parametrize("mode", ["offline", "streaming"])
def test_evaluate_lists_failures_and_agrees_with_recognizer(tiny_bundle, small_manifest, mode):
    _, utts = small_manifest
    report = evaluate(utts, tiny_bundle, DecoderConfig(kind="greedy"), mode, chunk_ms=300, lookahead_ms=150, progress=False)
    assert report.utterances == 5
    assert [f["id"] for f in report.failed] == ["broken"] and "broken.wav" in report.failed[0]["error"]
    rec = Recognizer(tiny_bundle, DecoderConfig(kind="greedy"), chunk_ms=300, lookahead_ms=150)
    hyps = [rec.transcribe_file(u.audio).text for u in utts[:5]]
    assert report.wer == pytest.approx(jiwer.wer([u.text for u in utts[:5]], hyps))
    assert report.audio_s > 0 and report.compute_s > 0


def test_run_eval_writes_json(tiny_bundle, small_manifest, tmp_path, capsys):
    manifest, _ = small_manifest
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    parser.add_argument("--model")
    out = tmp_path / "r.json"
    args = parser.parse_args([str(manifest), "--decoder", "greedy", "--json", str(out), "--model", str(tiny_bundle)])
    assert run_eval(args, load_config()) == 0
    data = json.loads(out.read_text())
    assert data["utterances"] == 5 and data["failed"] == []  # the reader's rule skipped it, named with its reason:
    [skip] = data["settings"]["skipped"]
    assert Path(skip["source"]).name == "m.jsonl:6" and skip["reason"].startswith("audio not readable") and "broken.wav" in skip["reason"]
    for key in ("wer", "cer", "substitutions", "deletions", "insertions", "real_time_factor", "worst"):
        assert key in data
    printed = capsys.readouterr().out
    assert "WER" in printed and "1 lines of the corpus skipped" in printed and "broken.wav" in printed


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    parser.add_argument("--model")
    return parser.parse_args(list(argv))


def test_eval_with_perturbations_records_them_and_changes_the_audio(tiny_bundle, small_manifest, tmp_path):
    manifest, _ = small_manifest
    out = tmp_path / "r.json"
    args = _eval_args(str(manifest), "--decoder", "greedy", "--model", str(tiny_bundle), "--json", str(out),
                      "--perturb", "gain_db=-20", "--perturb", "rate_hz=8000", "--seed", "3")
    assert run_eval(args, load_config()) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["perturbations"] == ["gain_db=-20", "rate_hz=8000"] and data["settings"]["seed"] == 3
    # the 8 kHz audio is still measured in seconds: the same duration as the clean run
    clean = evaluate(small_manifest[1][:5], tiny_bundle, DecoderConfig(kind="greedy"), progress=False)
    assert data["audio_s"] == pytest.approx(clean.audio_s, rel=0.01)


def test_eval_of_silence_counts_words_per_file(tiny_bundle, small_manifest, tmp_path, capsys):
    manifest, _ = small_manifest
    out = tmp_path / "s.json"
    args = _eval_args(str(manifest), "--decoder", "greedy", "--model", str(tiny_bundle), "--json", str(out),
                      "--perturb", "silence_s=2", "--perturb", "noise_dbfs=-60", "--mode", "streaming")
    assert run_eval(args, load_config()) == 0
    data = json.loads(out.read_text())
    assert data["reference_words"] == 0 and data["utterances"] == 5
    assert data["hypothesis_words"] == 0 and data["files_with_words"] == 0  # the detector hears no speech
    assert data["audio_s"] == pytest.approx(5 * 2.0, abs=0.01)
    assert "words recognised in 0 of 5 files" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["gain=3", "rate_hz=abc", "silence_s=-1"])
def test_eval_rejects_bad_perturbations_with_exit_2(tiny_bundle, small_manifest, spec, capsys):
    manifest, _ = small_manifest
    assert run_eval(_eval_args(str(manifest), "--model", str(tiny_bundle), "--perturb", spec), load_config()) == 2
    assert "perturbation" in capsys.readouterr().err


def test_score_of_empty_references_counts_hypothesis_words():
    report = score(["a", "b", "c"], ["", "", ""], ["", "oh no", "x"])
    assert report.hypothesis_words == 3 and report.files_with_words == 2 and report.reference_words == 0
    assert report.wer != report.wer  # NaN: undefined without reference words


def test_eval_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert run_eval(_eval_args(str(tmp_path / "nowhere")), load_config()) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    bad = tmp_path / "bundle"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("yes\n")
    import numpy as np
    import soundfile as sf

    sf.write(corpus / "a.wav", np.zeros(16000, dtype=np.float32), 16000)
    assert run_eval(_eval_args(str(corpus), "--model", str(bad)), load_config()) == 2
    assert "weights.pt" in capsys.readouterr().err


def test_a_perturbation_failing_on_one_utterance_is_listed_not_fatal(tiny_bundle, small_manifest):
    from workers.data.perturb import Perturbation

    _, utts = small_manifest
    spec = [Perturbation.parse("silence_s=0.00001"), Perturbation.parse("noise_snr_db=10")]  # nothing to add noise to
    report = evaluate(utts[:2], tiny_bundle, DecoderConfig(kind="greedy"), progress=False, perturbations=spec)
    assert len(report.failed) == 2 and all(f["audio"] in f["error"] for f in report.failed)
