"""Memory bounds of batch transcription: batches bounded by padded audio, long files read and
recognised in bounded pieces (same words and times as holding them whole). A worker that dies
on an input: tests/test_batch.py (it needs the Ray started there)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
import torch
from conftest import AN4, NO_VAD

from pipeline.batch.job import InputFile, plan_batches, transcribe_batch
from pipeline.bench.run import RssSampler
from workers.audio.reader import AudioError, AudioReader, load_audio
from workers.audio.vad import WINDOW_SAMPLES, pause_cuts, quiet_cuts, trim_to_speech
from workers.decoding.decoder import DecoderConfig, WordTiming
from workers.model.bundle import DEFAULT_BUNDLE
from workers.recognizer import LONG_BLOCK_WINDOWS, PIECE_BATCH_SECONDS, Recognizer

RATE = 16000


def _an4(n: int) -> list[Path]:
    root = AN4 / "wav" / "an4_clstk"
    files = sorted(root.rglob("*.raw"))[:n]
    if len(files) < n:
        pytest.skip(f"needs {n} AN4 utterances under {root}")
    return files


def _join(files: list[Path], path: Path, minutes: float | None = None, pause_s: float = 0.5) -> list[tuple[int, int]]:
    """Write AN4 utterances (cycled up to ``minutes`` if given) with pauses into a big-endian raw
    file, as AN4 ships; returns each utterance's (start, stop) samples."""
    waves = [load_audio(f).numpy() for f in files]
    pause = np.zeros(int(pause_s * RATE), dtype=np.float32)
    spans, pos, i = [], 0, 0
    with path.open("wb") as out:
        while i < len(waves) or (minutes is not None and pos < minutes * 60 * RATE):
            wave = waves[i % len(waves)]
            spans.append((pos, pos + wave.size))
            out.write((np.clip(np.concatenate([wave, pause]), -1, 1 - 2**-15) * 32768).astype(">i2").tobytes())
            pos += wave.size + pause.size
            i += 1
    return spans


# --------------------------------------------------------------------------- batches


def test_batches_bound_padded_audio_and_isolate_long_files():
    rng = np.random.default_rng(0)
    items = [InputFile(f"/in/s{i:02d}.wav", f"s{i:02d}.wav", float(rng.uniform(0.7, 6.4))) for i in range(40)]
    items += [InputFile("/in/hour.wav", "hour.wav", 3600.0), InputFile("/in/mid.wav", "mid.wav", 45.0),
              InputFile("/in/unknown.wav", "unknown.wav", 0.0)]
    batches = plan_batches(items, batch_seconds=120.0, batch_size=16)
    paths = [i.path for b in batches for i in b]
    assert sorted(paths) == sorted(i.path for i in items) and len(paths) == len(set(paths))  # each input once
    assert [i.duration_s for b in batches for i in b] == sorted(i.duration_s for i in items)  # sorted by duration
    for b in batches:  # padded audio (what the model computes on) within the bound, unless alone
        assert len(b) <= 16 and (len(b) == 1 or len(b) * max(i.duration_s for i in b) <= 120.0)
    assert ["/in/hour.wav"] in [[i.path for i in b] for b in batches]  # never padded with short files
    padded = sum(len(b) * max(i.duration_s for i in b) for b in batches)
    assert padded - sum(i.duration_s for i in items) < 120.0 * len(batches)
    assert all(len(b) == 1 for b in plan_batches(items, 120.0, batch_size=1))  # --batch-size 1 still works
    assert max(len(b) for b in plan_batches(items, 1e9, batch_size=5)) == 5


# --------------------------------------------------------------------------- reading in pieces


def _formats(tmp: Path) -> dict[str, tuple[Path, float]]:
    """name -> (file, tolerance of a piece against load_audio)"""
    rng = np.random.default_rng(1)
    out = {"an4.raw": (_an4(1)[0], 0.0)}
    for name, rate, channels, subtype, tol in [
        ("a16.wav", 16000, 1, "PCM_16", 0.0), ("a8.wav", 8000, 1, "PCM_16", 1e-5), ("st44.wav", 44100, 2, "PCM_24", 1e-5),
        ("loud.wav", 16000, 1, "FLOAT", 0.0), ("a22.flac", 22050, 1, "PCM_16", 1e-5), ("a.ogg", 16000, 1, "VORBIS", 1e-5),
    ]:
        x = np.clip(0.4 * rng.standard_normal((int(rate * 7.3), channels)), -1, 1).astype(np.float32)
        sf.write(tmp / name, x * (3.0 if subtype == "FLOAT" else 1.0), rate, subtype=subtype)
        out[name] = (tmp / name, tol)
    return out


def test_reader_pieces_equal_load_audio(tmp_path):
    for name, (path, tol) in _formats(tmp_path).items():
        whole = load_audio(path)
        with AudioReader(path) as reader:
            assert reader.num_samples == whole.numel(), name
            assert torch.equal(reader.read(0, reader.num_samples), whole), name
            for start in (0, 1, 4097, 50_000, max(0, whole.numel() - 20_000), 7_000):  # out of order too (ogg rewinds)
                stop = min(start + 33_333, whole.numel())
                assert reader.read(start, stop).numel() == max(0, stop - start), (name, start)
                assert torch.allclose(reader.read(start, stop), whole[start:stop], atol=tol, rtol=0), (name, start)


def test_reader_refuses_bad_files_like_load_audio(tmp_path):
    good = tmp_path / "g.wav"
    sf.write(good, np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio\n" * 30)
    (tmp_path / "header.wav").write_bytes(good.read_bytes()[:44])
    (tmp_path / "cut.wav").write_bytes(good.read_bytes()[:5000])
    (tmp_path / "odd.raw").write_bytes(b"\x01\x02\x03")
    (tmp_path / "short.raw").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    for name in ("empty.wav", "text.wav", "header.wav", "cut.wav", "odd.raw", "short.raw", "dangling.wav", "missing.wav"):
        with pytest.raises(AudioError) as expected:
            load_audio(tmp_path / name, min_samples=400)
        with pytest.raises(AudioError) as got:
            AudioReader(tmp_path / name, min_samples=400)
        assert got.value.reason == expected.value.reason, name


# --------------------------------------------------------------------------- long files in pieces


@pytest.fixture(scope="module")
def shipped() -> Recognizer:
    if not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("needs the shipped model")
    return Recognizer(None, DecoderConfig(kind="beam"))


def _held_whole(rec: Recognizer, wave: torch.Tensor) -> tuple[str, list[WordTiming]]:
    """The pause-cut path as it was before reading in pieces: flags of the whole signal at once,
    every piece's features at once, 16 pieces per forward pass."""
    speech = rec.vad.speech(wave)
    cfg = rec.vad.config
    pieces = []
    for first, end in pause_cuts(speech, cfg.max_segment_s, cfg.min_pause_s):
        if speech[first:end].any():
            first, end = trim_to_speech(speech, first, end, cfg.piece_pad_ms)
            start, stop = first * WINDOW_SAMPLES, (end * WINDOW_SAMPLES if end < speech.numel() else wave.numel())
            pieces.append((start, rec.extractor(wave[start:stop]), speech[first:end]))
    words = []
    for i in range(0, len(pieces), 16):
        batch = pieces[i : i + 16]
        for (start, _, _), (_, piece_words) in zip(batch, rec.transcribe_features([f for _, f, _ in batch], [s for _, _, s in batch])):
            words += [WordTiming(w.word, w.start_s + start / RATE, w.end_s + start / RATE) for w in piece_words]
    return " ".join(w.word for w in words), words


def test_long_file_in_pieces_equals_holding_it_whole(shipped, tmp_path):
    """A two-minute recording of real AN4 utterances read block by block and recognised in
    pieces gives the words and times of the same algorithm run on the whole signal in memory;
    every word lies inside the utterance it came from (times offset by the piece start)."""
    path = tmp_path / "long.raw"
    spans = _join(_an4(36), path)
    with AudioReader(path) as reader:
        duration_s = reader.duration_s
    assert duration_s > 90  # several read blocks (VAD state carried across them) and pieces
    got = shipped.transcribe_file(path)
    text, words = _held_whole(shipped, load_audio(path))
    assert got.text == text and len(words) > 80
    assert [(w.word, round(w.start_s, 4), round(w.end_s, 4)) for w in got.words] == [
        (w.word, round(w.start_s, 4), round(w.end_s, 4)) for w in words]
    for w in got.words:
        mid = (w.start_s + w.end_s) / 2 * RATE
        assert any(a - 0.35 * RATE <= mid <= b + 0.35 * RATE for a, b in spans), w
    assert got.duration_s == pytest.approx(duration_s)


def test_long_file_without_vad_is_cut_at_quiet_points(shipped, tmp_path):
    """With detection off a long file is no longer decoded whole: pieces of at most
    vad.max_segment_s cut at the quietest moment; the file read in pieces equals the wave in memory."""
    path = tmp_path / "long.raw"
    _join(_an4(20), path)
    rec = Recognizer(shipped.bundle, DecoderConfig(kind="beam"), vad=NO_VAD)
    wave = load_audio(path)
    assert rec.is_long(wave)
    got = rec.transcribe_file(path)
    assert got.text == rec.transcribe_wave(wave).text and len(got.words) > 40
    starts = [w.start_s for w in got.words]
    assert starts == sorted(starts) and 0 <= starts[0] and got.words[-1].end_s <= got.duration_s


def test_quiet_cuts_tile_and_pick_the_pause():
    energy = torch.full((2000,), -20.0)
    energy[500:520] = -80.0  # a pause 16-16.6 s in
    pieces = quiet_cuts(energy, max_segment_s=20.0)
    assert pieces[0][0] == 0 and pieces[-1][1] == 2000 and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert all(0 < end - first <= int(20.0 / 0.032) for first, end in pieces)
    assert 500 <= pieces[0][1] < 520


def test_memory_of_a_long_file_does_not_grow_with_its_length(tiny_bundle, tmp_path, monkeypatch):
    """3 and 30 minutes of AN4 speech through the batch UDF's path (tiny model, detection off,
    for speed): no read and no forward pass grows with the file, and the resident memory above
    idle stays within a bound below what holding the 30-minute file would take (its samples alone,
    as float32: 110 MB)."""
    rec = Recognizer(tiny_bundle, DecoderConfig(kind="greedy"), vad=NO_VAD)
    biggest = {"read": 0, "padded_frames": 0}
    read = AudioReader.read

    def counting_read(self, start, stop):
        out = read(self, start, stop)
        biggest["read"] = max(biggest["read"], out.numel())
        return out

    features = rec.transcribe_features

    def counting_features(feats, speech=None):
        biggest["padded_frames"] = max(biggest["padded_frames"], len(feats) * max(len(f) for f in feats))
        return features(feats, speech)

    monkeypatch.setattr(AudioReader, "read", counting_read)
    monkeypatch.setattr(rec, "transcribe_features", counting_features)
    short = _an4(1)[0]
    transcribe_batch(rec, [str(short)])  # warm up
    above_idle = {}
    for minutes in (3, 30):
        path = tmp_path / f"m{minutes}.raw"
        _join(_an4(30), path, minutes=minutes)
        idle = psutil.Process().memory_info().rss
        with RssSampler(interval_s=0.01, patterns=()) as peak:  # this process alone
            records = transcribe_batch(rec, [str(short), str(path)])
        assert all(r["error"] is None for r in records) and records[1]["duration_s"] >= minutes * 60
        above_idle[minutes] = peak.peak_mb - idle / 2**20
        path.unlink()
    assert biggest["read"] <= LONG_BLOCK_WINDOWS * WINDOW_SAMPLES
    assert biggest["padded_frames"] <= PIECE_BATCH_SECONDS / 0.03 + 1
    assert above_idle[30] < 80, above_idle
    assert above_idle[30] < above_idle[3] + 40, above_idle


def test_long_recording_is_within_1_1x_of_separate_files(shipped, tmp_path):
    """Issue 13, item 2: all 105 utterances of the held-out AN4 speakers joined into one 6-minute
    file with 0.3-0.8 s of silence between them are recognised about as well as the same
    utterances as separate files: WER within 1.1x, on the mean of three random draws of the gaps
    (measured 1.10 / 1.03 / 1.01x, WER 13.0 / 12.2 / 12.0 % against 11.84 %; before pieces were
    trimmed to their speech +- vad.piece_pad_ms, with vad.min_pause_s 0.35, the first was 1.17x)."""
    import jiwer

    from pipeline.config import AppConfig
    from workers.data.corpus import read_an4, split_by_speaker

    _, dev = split_by_speaker(read_an4(AN4).utterances, AppConfig().data.an4_dev_speakers)
    assert len(dev) == 105
    waves = [load_audio(u.audio).numpy() for u in dev]
    reference = " ".join(u.text for u in dev)
    joined_files = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        joined = np.concatenate([part for w in waves for part in (w, np.zeros(int(RATE * rng.uniform(0.3, 0.8)), np.float32))])
        path = tmp_path / f"dev_joined_{seed}.raw"
        path.write_bytes((np.clip(joined, -1, 1 - 2**-15) * 32768).astype(">i2").tobytes())
        joined_files.append(str(path))
    # Two of the joined files are recognised in a second process, beside this one (same model and
    # settings, one torch thread): the test is ~40 s of one core's work, and the other core was idle.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as helper:
        others = helper.submit(_shipped_texts, joined_files[1:])
        separate = jiwer.wer(reference, " ".join(shipped.transcribe_wave(torch.from_numpy(w)).text for w in waves))
        assert 0.05 < separate < 0.2  # the model works on these speakers
        texts = [shipped.transcribe_file(joined_files[0]).text, *others.result(timeout=600)]
    ratios = [jiwer.wer(reference, text) / separate for text in texts]
    # The previous model gave 1.10 / 1.03 / 1.01, the model shipped on 2026-12-05 1.10 / 1.00 / 1.15
    # (one word of 591 over 1.15): the mean is the target, a single draw may be one or two words worse.
    assert np.mean(ratios) <= 1.1 and max(ratios) <= 1.2, ratios


def _shipped_texts(paths: list[str]) -> list[str]:
    """In a spawned helper process: what ``shipped`` (the shipped model, beam search) recognises in each file."""
    torch.set_num_threads(1)
    rec = Recognizer(None, DecoderConfig(kind="beam"))
    return [rec.transcribe_file(path).text for path in paths]
