"""`asr eval`: figures equal jiwer's on the same pairs; failed inputs are listed, not skipped."""

from __future__ import annotations

import argparse
import json

import jiwer
import pytest

from pipeline.config import load_config
from pipeline.evaluate import add_eval_arguments, evaluate, run_eval, score
from workers.corpus import Utterance, read_an4, write_manifest
from workers.decoder import DecoderConfig
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
    assert data["utterances"] == 5 and len(data["failed"]) == 1
    for key in ("wer", "cer", "substitutions", "deletions", "insertions", "real_time_factor", "worst"):
        assert key in data
    printed = capsys.readouterr().out
    assert "WER" in printed and "failed to load" in printed
