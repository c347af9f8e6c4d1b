"""Corpus readers, speaker split and manifests (real AN4/FSDD from ../shared/data when present)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from workers.data.corpus import (
    Utterance,
    read_an4,
    read_corpus,
    read_folder,
    read_fsdd,
    read_librispeech,
    read_manifest,
    split_by_speaker,
    write_manifest,
)

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
AN4_ROOT = SHARED_DATA / "an4"
FSDD_ROOT = SHARED_DATA / "fsdd"
needs_an4 = pytest.mark.skipif(not AN4_ROOT.is_dir(), reason="shared AN4 data not present")
needs_fsdd = pytest.mark.skipif(not FSDD_ROOT.is_dir(), reason="shared FSDD data not present")


def write_tone(path: Path, seconds: float, rate_hz: int = 16000, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate_hz, format=fmt, subtype="PCM_16")
    return path


# ---- real corpora -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def an4():
    return read_an4(AN4_ROOT)


@needs_an4
def test_read_an4(an4) -> None:
    assert len(an4.utterances) == 948
    assert an4.skipped == []
    assert len({u.speaker for u in an4.utterances}) == 74
    assert len({u.id for u in an4.utterances}) == 948
    first = an4.utterances[0]
    assert (first.id, first.text, first.speaker) == ("an251-fash-b", "yes", "fash")
    assert Path(first.audio).is_file() and first.audio.endswith("an251-fash-b.raw")
    assert first.duration_s == pytest.approx(Path(first.audio).stat().st_size / 32000, abs=1e-4)
    for u in an4.utterances:
        assert u.text == u.text.lower().strip() and "  " not in u.text
        assert set(u.text) <= set("abcdefghijklmnopqrstuvwxyz' ")
        assert "<s>" not in u.text and u.id not in u.text
        assert 0.5 < u.duration_s < 7.0
        assert u.speaker in u.id
    total_min = sum(u.duration_s for u in an4.utterances) / 60
    assert 38 < total_min < 46
    # the README's example line
    by_id = {u.id: u for u in an4.utterances}
    if "an311-fkai-b" in by_id:
        assert by_id["an311-fkai-b"].text == "erase i s l f thirty eight"


@needs_an4
def test_read_corpus_detects_an4(an4) -> None:
    assert read_corpus(AN4_ROOT).utterances == an4.utterances


@needs_an4
def test_split_an4_by_speaker(an4) -> None:
    held = ["fbbh", "ftal", "mcfl", "mdxs", "mgah", "mmkw", "mrcb", "mtos"]
    train, dev = split_by_speaker(an4.utterances, held)
    assert len(train) + len(dev) == 948
    assert {u.speaker for u in dev} == set(held)
    assert not {u.speaker for u in train} & {u.speaker for u in dev}
    assert not {u.id for u in train} & {u.id for u in dev}


@needs_fsdd
def test_read_fsdd() -> None:
    corpus = read_fsdd(FSDD_ROOT)
    assert len(corpus.utterances) == 2500 and corpus.skipped == []
    assert {u.speaker for u in corpus.utterances} == {"george", "jackson", "nicolas", "theo", "yweweler"}
    by_id = {u.id: u for u in corpus.utterances}
    assert by_id["7_jackson_32"].text == "seven"
    assert by_id["0_george_0"].text == "zero"
    for u in corpus.utterances:
        digit = int(u.id.split("_")[0])
        assert u.text == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][digit]
        assert 0.1 < u.duration_s < 3.0


# ---- generated corpora --------------------------------------------------------------------


def test_read_fsdd_generated_skips_bad_names(tmp_path: Path) -> None:
    rec = tmp_path / "recordings"
    write_tone(rec / "3_alice_0.wav", 0.5, 8000)
    write_tone(rec / "9_bob_12.wav", 0.25, 8000)
    write_tone(rec / "x_bob_1.wav", 0.25, 8000)
    write_tone(rec / "12_bob_1.wav", 0.25, 8000)
    corpus = read_fsdd(tmp_path)
    assert [(u.id, u.text, u.speaker) for u in corpus.utterances] == [
        ("3_alice_0", "three", "alice"),
        ("9_bob_12", "nine", "bob"),
    ]
    assert corpus.utterances[0].duration_s == pytest.approx(0.5)
    assert sorted(Path(s).name for s, _ in corpus.skipped) == ["12_bob_1.wav", "x_bob_1.wav"]
    assert read_corpus(tmp_path).utterances == corpus.utterances


def make_librispeech(root: Path) -> None:
    chapter = root / "train" / "19" / "198"
    write_tone(chapter / "19-198-0000.flac", 0.5, fmt="FLAC")
    write_tone(chapter / "19-198-0001.flac", 0.75, fmt="FLAC")
    write_tone(chapter / "19-198-0002.flac", 0.25, fmt="FLAC")
    (chapter / "19-198-trans.txt").write_text("")  # not the transcript name; ignored
    (chapter / "19-198.trans.txt").write_text(
        "19-198-0000 NORTHANGER ABBEY\n\n19-198-0001 IT'S CHAPTER 1 NOW\n19-198-0002 THE END\n19-198-0003 NO AUDIO HERE\n"
    )
    other = root / "train" / "26" / "495"
    write_tone(other / "26-495-0000.flac", 1.0, fmt="FLAC")
    (other / "26-495.trans.txt").write_text("26-495-0000 A WELL-KNOWN TALE\n")


def test_read_librispeech(tmp_path: Path) -> None:
    make_librispeech(tmp_path)
    corpus = read_librispeech(tmp_path)
    got = [(u.id, u.text, u.speaker, u.duration_s) for u in corpus.utterances]
    assert got == [
        ("19-198-0000", "northanger abbey", "19", 0.5),
        ("19-198-0002", "the end", "19", 0.25),
        ("26-495-0000", "a well known tale", "26", 1.0),
    ]
    reasons = {Path(src).name: reason for src, reason in corpus.skipped}
    assert set(reasons) == {"19-198-0001.flac", "19-198-0003.flac"}
    assert "'1'" in reasons["19-198-0001.flac"]  # the digit is named, not silently dropped
    assert "missing" in reasons["19-198-0003.flac"]
    assert read_corpus(tmp_path).utterances == corpus.utterances


def test_read_folder(tmp_path: Path) -> None:
    write_tone(tmp_path / "spk_a" / "hello.wav", 0.5)
    (tmp_path / "spk_a" / "hello.txt").write_text("  Hello   World\n")
    write_tone(tmp_path / "spk_b" / "sub" / "count.flac", 0.25, fmt="FLAC")
    (tmp_path / "spk_b" / "sub" / "count.txt").write_text("I have 3 cats")
    write_tone(tmp_path / "spk_b" / "orphan.wav", 0.25)
    (tmp_path / "spk_b" / "broken.wav").write_text("not audio")
    (tmp_path / "spk_b" / "broken.txt").write_text("broken")
    raw = tmp_path / "spk_c" / "utt.raw"
    raw.parent.mkdir()
    raw.write_bytes(np.zeros(8000, ">i2").tobytes())
    (tmp_path / "spk_c" / "utt.txt").write_text("don't stop")
    corpus = read_folder(tmp_path)
    got = [(u.id, u.text, u.speaker, u.duration_s) for u in corpus.utterances]
    assert got == [("spk_a/hello.wav", "hello world", "spk_a", 0.5), ("spk_c/utt.raw", "don't stop", "spk_c", 0.5)]
    reasons = {Path(src).name: reason for src, reason in corpus.skipped}
    assert set(reasons) == {"count.flac", "orphan.wav", "broken.wav"}
    assert "unsupported characters" in reasons["count.flac"] and "'3'" in reasons["count.flac"]
    assert "without transcript" in reasons["orphan.wav"]
    assert "not readable" in reasons["broken.wav"]
    assert read_corpus(tmp_path).utterances == corpus.utterances


def test_read_an4_generated_reports_problems(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    ids = ["an4_clstk/spk1/a1-spk1-b", "an4_clstk/spk1/a2-spk1-b", "an4_clstk/spk2/a3-spk2-b", "an4_clstk/spk2/a4-spk2-b"]
    lines = ["<s> YES </s> (a1-spk1-b)", "<s> NO </s> (2-spk1-b)", "<s> GO </s> (a3-spk2-b)", "<s> TWO 2 </s> (a4-spk2-b)"]
    (tmp_path / "etc" / "an4_train.fileids").write_text("\n".join(ids) + "\n")
    (tmp_path / "etc" / "an4_train.transcription").write_text("\n".join(lines) + "\n")
    for fileid in ids[:2] + ids[3:]:  # a3 has no audio
        audio = tmp_path / "wav" / f"{fileid}.raw"
        audio.parent.mkdir(parents=True, exist_ok=True)
        audio.write_bytes(np.zeros(3200, ">i2").tobytes())
    corpus = read_an4(tmp_path)
    assert [(u.id, u.text, u.speaker, u.duration_s) for u in corpus.utterances] == [("a1-spk1-b", "yes", "spk1", 0.2)]
    reasons = {Path(src).stem: reason for src, reason in corpus.skipped}
    assert set(reasons) == {"a2-spk1-b", "a3-spk2-b", "a4-spk2-b"}
    assert "does not match" in reasons["a2-spk1-b"]
    assert "missing" in reasons["a3-spk2-b"]
    assert "'2'" in reasons["a4-spk2-b"]
    (tmp_path / "etc" / "an4_train.fileids").write_text("\n".join(ids[:3]) + "\n")
    with pytest.raises(ValueError, match="4 transcripts but 3 file ids"):
        read_an4(tmp_path)


def test_read_corpus_rejects_non_corpus(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "nothing-here")


def test_split_by_speaker_is_disjoint_and_complete() -> None:
    utts = [Utterance(f"u{i}", f"/a/u{i}.wav", 1.0, "yes", f"s{i % 5}") for i in range(23)]
    train, dev = split_by_speaker(utts, ["s1", "s3", "nobody"])
    assert {u.speaker for u in dev} == {"s1", "s3"}
    assert not {u.speaker for u in train} & {"s1", "s3"}
    assert sorted(train + dev, key=lambda u: int(u.id[1:])) == utts
    assert split_by_speaker(iter(utts), iter([])) == (utts, [])


# ---- manifests ------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path: Path) -> None:
    utts = [
        Utterance("a", str(tmp_path / "a.wav"), 1.25, "hello world", "s1"),
        Utterance("b/c", str(tmp_path / "sub" / "c.flac"), 0.3333, "don't", "s2"),
    ]
    path = write_manifest(utts, tmp_path / "out" / "train.jsonl")
    assert path.is_file() and not path.with_suffix(".jsonl.tmp").exists()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["id"] == "a"
    assert list(read_manifest(path)) == utts
    assert read_corpus(path).skip_counts() == {"audio file missing": 2}  # a user's manifest is checked (no audio here)
    write_tone(tmp_path / "a.wav", 1.25)
    write_tone(tmp_path / "sub" / "c.flac", 0.3333, fmt="FLAC")
    assert read_corpus(path).utterances == utts


def test_manifest_relative_audio_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "clips/x.wav", "text": "Hi There"}\n\n{"audio": "/abs/y.wav", "text": "ok", "id": 7}\n')
    rows = list(read_manifest(path))
    assert rows[0] == Utterance("x", str(tmp_path / "clips" / "x.wav"), 0.0, "hi there", "")
    assert rows[1].audio == "/abs/y.wav" and rows[1].id == "7"


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"audio": "a.wav", "text": "x"',
        '{"text": "no audio"}',
        "[1, 2]",
        '{"audio": "a.wav", "text": "4 cats"}',
        '{"audio": "a.wav", "duration_s": "long"}',
    ],
)
def test_bad_manifest_line_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "a.wav", "text": "fine"}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError) as exc_info:
        list(read_manifest(path))
    assert f"{path}:3:" in str(exc_info.value)


# ---- Kaldi data directories -------------------------------------------------------------------
def make_kaldi(root: Path) -> Path:
    """A corpus root with train/ and test/ data directories; wav.scp paths relative to the root
    (as speechocean762's), to the data directory, and absolute."""
    for d in ("train", "test"):
        (root / d).mkdir(parents=True)
    a = write_tone(root / "audio" / "s1" / "u1.wav", 1.0)
    b = write_tone(root / "train" / "u2.wav", 0.5)
    c = write_tone(root / "elsewhere" / "u3.flac", 0.75, fmt="FLAC")
    (root / "train" / "wav.scp").write_text(f"u1 audio/s1/u1.wav\nu2 u2.wav\nu3 {c.resolve()}\nu9 audio/missing.wav\n")
    (root / "train" / "text").write_text("u1 HELLO WORLD\nu2 GOOD MORNING\nu3 YES\nu9 GONE\nu8 NO AUDIO LINE\n")
    (root / "train" / "utt2spk").write_text("u1 spkA\nu2 spkA\nu3 spkB\nu9 spkB\n")
    write_tone(root / "test" / "t1.wav", 0.6)
    (root / "test" / "wav.scp").write_text("t1 t1.wav\nt2 t1.wav\n")
    (root / "test" / "text").write_text("t1 STOP\n")
    (root / "test" / "utt2spk").write_text("t1 spkC\n")
    assert a.is_file() and b.is_file()
    return root


def test_read_kaldi_data_directories(tmp_path: Path) -> None:
    from workers.data.corpus import read_kaldi

    root = make_kaldi(tmp_path / "corpus")
    corpus = read_corpus(root)  # detected: sub-directories holding wav.scp and text
    got = {u.id: (u.text, u.speaker, round(u.duration_s, 2)) for u in corpus.utterances}
    assert got == {"u1": ("hello world", "spkA", 1.0), "u2": ("good morning", "spkA", 0.5), "u3": ("yes", "spkB", 0.75),
                   "t1": ("stop", "spkC", 0.6)}
    reasons = sorted(reason for _, reason in corpus.skipped)
    assert len(reasons) == 3
    assert "audio file missing (audio/missing.wav: not found" in reasons[0]
    assert any("'u8' has no line in wav.scp" in r for r in reasons) and any("'t2' has no line in text" in r for r in reasons)
    assert all(":" in source for source, _ in corpus.skipped)  # file:line
    one = read_kaldi(root / "test")  # a data directory itself
    assert [u.id for u in one.utterances] == ["t1"]
    train, dev = split_by_speaker(corpus.utterances, ["spkA"])
    assert {u.id for u in dev} == {"u1", "u2"} and {u.speaker for u in train} == {"spkB", "spkC"}


def test_read_kaldi_bad_lines_name_the_file_and_line(tmp_path: Path) -> None:
    from workers.data.corpus import read_kaldi

    root = make_kaldi(tmp_path / "corpus")
    (root / "test" / "wav.scp").write_text("t1 sox t1.wav -t wav - |\n")
    with pytest.raises(ValueError, match=r"test/wav.scp:1: .*piped command"):
        read_kaldi(root)
    (root / "test" / "wav.scp").write_text("t1\n")
    with pytest.raises(ValueError, match=r"test/wav.scp:1: .*no path"):
        read_kaldi(root)
    (root / "test" / "wav.scp").write_text("t1 t1.wav\n")
    (root / "test" / "text").write_text("t1 STOP\nt1 AGAIN\n")
    with pytest.raises(ValueError, match=r"test/text:2: utterance 't1' listed twice"):
        read_kaldi(root)
    with pytest.raises(FileNotFoundError, match="no Kaldi data directory"):
        read_kaldi(tmp_path)


def test_read_speechocean762() -> None:
    root = SHARED_DATA / "speechocean762"
    if not root.is_dir():
        pytest.skip("shared speechocean762 data not present")
    corpus = read_corpus(root)
    assert len(corpus.utterances) == 4500 and not corpus.skipped
    assert len({u.speaker for u in corpus.utterances}) == 225
    assert 5.0 < sum(u.duration_s for u in corpus.utterances) / 3600 < 5.1
    first = corpus.utterances[0]
    assert Path(first.audio).suffix == ".opus" and Path(first.audio).is_file()
    data, rate = sf.read(first.audio)
    assert rate == 16000 and abs(len(data) / rate - first.duration_s) < 0.01


def test_speechocean762_dev_speakers_are_whole_test_partition_speakers() -> None:
    """The configured dev speakers: 20 speakers of the test partition, children and adults; ``asr
    eval --split dev`` selects exactly their utterances."""
    from pipeline.config import load_config
    from pipeline.evaluate import select_split

    root = SHARED_DATA / "speechocean762"
    if not root.is_dir():
        pytest.skip("shared speechocean762 data not present")
    config = load_config()
    dev = set(config.data.speechocean_dev_speakers)
    ages = dict(line.split() for line in (root / "test" / "spk2age").read_text().splitlines())
    assert len(dev) == 20 and dev <= set(ages)
    assert sum(int(ages[s]) <= 15 for s in dev) == 10
    utts = read_corpus(root).utterances
    picked = select_split(utts, config, "dev", None)
    assert {u.speaker for u in picked} == dev and len(picked) == 20 * 20
    assert not {u.speaker for u in select_split(utts, config, "train", None)} & dev


# ---- one rule for training input in every layout (issue 29) ----------------------------------

#: The cases every layout gets: (name, transcript, audio: "tone" | "missing" | "empty" | "garbage" | None).
CASES = [("good", "hello there", "tone"), ("missing", "no audio file", "missing"), ("zero", "zero bytes", "empty"),
         ("junk", "not audio", "garbage"), ("blank", "   ", "tone"), ("digits", "call 911", "tone")]
EXPECTED = {"audio file missing": 1, "audio file empty": 1, "audio not readable": 1, "empty transcript": 1,
            "characters outside the alphabet": 1}


def _audio(path: Path, kind: str, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tone":
        write_tone(path, 0.5, fmt=fmt)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not audio at all" * 10)


def _folder(root: Path) -> Path:
    for name, text, kind in CASES:
        _audio(root / f"{name}.wav", kind)
        (root / f"{name}.txt").write_text(text)
    write_tone(root / "untranscribed.wav", 0.5)
    return root


def _manifest(root: Path) -> Path:
    rows = []
    for name, text, kind in CASES:
        _audio(root / f"{name}.wav", kind)
        rows.append(json.dumps({"id": name, "audio": f"{name}.wav", "text": text, "speaker": "s"}))
    (root / "m.jsonl").write_text("\n".join([*rows, "{not json", json.dumps({"text": "no audio key"})]) + "\n")
    return root / "m.jsonl"


def _librispeech(root: Path) -> Path:
    chapter = root / "1" / "2"
    for i, (_, _, kind) in enumerate(CASES):
        _audio(chapter / f"1-2-{i:04d}.flac", kind, fmt="FLAC")
    (chapter / "1-2.trans.txt").write_text("".join(f"1-2-{i:04d} {text}\n" for i, (_, text, _) in enumerate(CASES)))
    write_tone(chapter / "1-2-0099.flac", 0.5, fmt="FLAC")
    return root


def _kaldi(root: Path) -> Path:
    data = root / "train"
    data.mkdir(parents=True)
    for name, _, kind in CASES:
        _audio(root / "wav" / f"{name}.wav", kind)
    (data / "wav.scp").write_text("".join(f"{name} wav/{name}.wav\n" for name, _, _ in CASES) + "extra wav/good.wav\n")
    (data / "text").write_text("".join(f"{name} {text}\n" for name, text, _ in CASES) + "lonely some words\n")
    return root


@pytest.mark.parametrize("layout,extra", [
    (_folder, {"audio without transcript": 1, "audio file missing": 0, "transcript without audio": 1}),  # a .txt alone
    (_manifest, {"unusable line": 2}),
    (_librispeech, {"audio without transcript": 1}),
    (_kaldi, {"audio without transcript": 1, "transcript without audio": 1}),
])
def test_training_input_rule_is_the_same_in_every_layout(tmp_path: Path, layout, extra: dict[str, int]) -> None:
    """Missing, empty or unreadable audio, an empty transcript, characters outside the alphabet,
    orphans on either side: skipped and counted by reason, never a traceback; the good one is read."""
    corpus = read_corpus(layout(tmp_path))
    assert [u.text for u in corpus.utterances] == ["hello there"]
    assert corpus.skip_counts() == {k: n for k, n in {**EXPECTED, **extra}.items() if n}
    assert all(source for source, _ in corpus.skipped)
