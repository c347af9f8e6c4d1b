"""Audio intake: formats, resampling, downmix, sample types, bad input, streaming ingest.

All audio is generated here with numpy/soundfile except one real AN4 file read from
``../shared/data`` (skipped when the shared data is absent).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from workers.audio.reader import AudioError, RawFormat, decode_raw_pcm, load_audio, read_audio
from workers.features.mfcc import FeatureConfig

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
AN4_ROOT = SHARED_DATA / "an4"


def sine(freq_hz: float, rate_hz: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def peak_frequency_hz(x: np.ndarray | torch.Tensor, rate_hz: int) -> float:
    x = np.asarray(x, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1.0 / rate_hz)[np.argmax(spectrum)])


def assert_audio_error(exc_info: pytest.ExceptionInfo, path: Path, *reason_words: str) -> None:
    message = str(exc_info.value)
    assert str(path) in message, message
    assert exc_info.value.source == str(path)
    for word in reason_words:
        assert word.lower() in message.lower(), message


# ---- formats -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "fmt", "subtype", "atol"),
    [
        (".wav", "WAV", "PCM_16", 1e-4),
        (".flac", "FLAC", "PCM_16", 1e-4),
        (".ogg", "OGG", "VORBIS", 0.05),  # lossy
    ],
)
def test_reads_formats_via_soundfile(tmp_path: Path, suffix: str, fmt: str, subtype: str, atol: float) -> None:
    x = sine(440.0, 16000, 1.0)
    path = tmp_path / f"tone{suffix}"
    sf.write(path, x, 16000, format=fmt, subtype=subtype)
    samples, rate = read_audio(path)
    assert rate == 16000
    assert samples.dtype == np.float32 and samples.shape == (len(x), 1)
    np.testing.assert_allclose(samples[:, 0], x, atol=atol)
    wave_16k = load_audio(path)
    assert wave_16k.dtype == torch.float32 and wave_16k.shape == (len(x),)
    assert abs(peak_frequency_hz(wave_16k, 16000) - 440.0) < 2.0


def test_raw_big_endian_pcm(tmp_path: Path) -> None:
    ints = (np.linspace(-1, 1, 3200) * 20000).astype(np.int16)
    path = tmp_path / "utt.raw"
    path.write_bytes(ints.astype(">i2").tobytes())
    samples, rate = read_audio(path)
    assert rate == 16000 and samples.shape == (len(ints), 1)
    np.testing.assert_allclose(samples[:, 0], ints / 32768.0, atol=1e-7)
    # the same bytes read as little-endian are different numbers: byte order is honoured
    swapped, _ = read_audio(path, RawFormat(big_endian=False))
    assert not np.allclose(swapped, samples)
    np.testing.assert_allclose(swapped[:, 0], ints.byteswap() / 32768.0, atol=1e-7)


def test_raw_format_rate_and_channels(tmp_path: Path) -> None:
    stereo = np.stack([np.full(800, 1000, np.int16), np.full(800, 3000, np.int16)], axis=1)
    path = tmp_path / "utt.pcm"
    path.write_bytes(stereo.astype("<i2").tobytes())
    fmt = RawFormat(sample_rate_hz=8000, big_endian=False, channels=2)
    samples, rate = read_audio(path, fmt)
    assert rate == 8000 and samples.shape == (800, 2)
    mono = load_audio(path, raw_format=fmt)
    assert mono.shape == (1600,)
    np.testing.assert_allclose(mono[200:-200].numpy(), 2000 / 32768.0, atol=1e-4)


@pytest.mark.skipif(not AN4_ROOT.is_dir(), reason="shared AN4 data not present")
def test_real_an4_raw_file_is_big_endian_speech() -> None:
    path = sorted((AN4_ROOT / "wav").rglob("*.raw"))[0]
    wave_16k = load_audio(path)
    assert wave_16k.numel() == path.stat().st_size // 2
    assert 0.0 < float(wave_16k.abs().max()) < 1.0
    # speech is low-pass: neighbouring samples correlate; byte-swapped samples look like noise
    x = wave_16k.numpy().astype(np.float64)
    swapped, _ = read_audio(path, RawFormat(big_endian=False))
    y = swapped[:, 0].astype(np.float64)
    lag1 = lambda s: np.corrcoef(s[:-1], s[1:])[0, 1]  # noqa: E731
    assert lag1(x) > 0.5
    assert lag1(x) > lag1(y) + 0.3


# ---- resampling, downmix, sample types ---------------------------------------------


@pytest.mark.parametrize("rate_hz", [8000, 44100])
def test_resamples_to_16k_preserving_length_and_frequency(tmp_path: Path, rate_hz: int) -> None:
    seconds, freq = 1.5, 1000.0
    x = sine(freq, rate_hz, seconds)
    path = tmp_path / f"tone_{rate_hz}.wav"
    sf.write(path, x, rate_hz, subtype="PCM_16")
    y = load_audio(path, target_rate_hz=16000)
    assert abs(y.numel() - round(len(x) * 16000 / rate_hz)) <= 1
    assert abs(peak_frequency_hz(y, 16000) - freq) < 2.0
    # amplitude survives too (the sine is well below both Nyquist rates)
    core = y[1000:-1000].numpy()
    assert abs(np.sqrt(np.mean(core**2)) - 0.5 / np.sqrt(2)) < 0.01


def test_stereo_is_downmixed_to_mean(tmp_path: Path) -> None:
    left = sine(300.0, 16000, 1.0, 0.6)
    right = np.full_like(left, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    samples, _ = read_audio(path)
    assert samples.shape == (len(left), 2)
    mono = load_audio(path)
    assert mono.shape == (len(left),)
    np.testing.assert_allclose(mono.numpy(), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize(
    ("subtype", "scale", "atol"),
    [("PCM_16", 2**15, 1e-4), ("PCM_32", 2**31, 1e-7), ("FLOAT", 1.0, 1e-7), ("DOUBLE", 1.0, 1e-7)],
)
def test_integer_and_float_wav_scale_to_unit_range(tmp_path: Path, subtype: str, scale: float, atol: float) -> None:
    x = sine(250.0, 16000, 0.5, 0.9)
    path = tmp_path / f"{subtype}.wav"
    if scale == 1.0:
        sf.write(path, x, 16000, subtype=subtype)
    else:
        ints = np.round(x * (scale - 1)).astype(np.int16 if scale == 2**15 else np.int32)
        sf.write(path, ints, 16000, subtype=subtype)
    assert sf.info(str(path)).subtype == subtype
    y = load_audio(path)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), x, atol=atol)


# ---- bad input -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError) as exc_info:
        load_audio(path)
    assert_audio_error(exc_info, path, "no such file")


@pytest.mark.parametrize("name", ["empty.wav", "empty.raw"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(AudioError) as exc_info:
        load_audio(path)
    assert_audio_error(exc_info, path, "empty")


def test_header_only_wav(tmp_path: Path) -> None:
    path = tmp_path / "header_only.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    assert path.stat().st_size > 0
    with pytest.raises(AudioError) as exc_info:
        load_audio(path)
    assert_audio_error(exc_info, path, "no audio samples")


def test_truncated_raw_pcm(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(np.zeros(1000, ">i2").tobytes() + b"\x01")
    with pytest.raises(AudioError) as exc_info:
        load_audio(path)
    assert_audio_error(exc_info, path, "truncated", "2001 bytes")
    with pytest.raises(AudioError, match="truncated"):
        decode_raw_pcm(b"\x00\x01\x02", RawFormat(), "bytes-source")


def test_text_file_named_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio, just some text\n" * 20)
    with pytest.raises(AudioError) as exc_info:
        load_audio(path)
    assert_audio_error(exc_info, path, "not readable audio")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_wav(tmp_path: Path, bad: float) -> None:
    x = sine(200.0, 16000, 0.5)
    x[1234] = bad
    path = tmp_path / "nonfinite.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as exc_info:
        load_audio(path)
    assert_audio_error(exc_info, path, "nan or infinite")


def test_too_short_for_one_feature_frame(tmp_path: Path) -> None:
    min_samples = FeatureConfig().min_samples
    short = tmp_path / "short.wav"
    sf.write(short, sine(300.0, 16000, 1.0)[: min_samples - 1], 16000, subtype="PCM_16")
    with pytest.raises(AudioError) as exc_info:
        load_audio(short, min_samples=min_samples)
    assert_audio_error(exc_info, short, "too short")
    # exactly one frame's worth is accepted
    ok = tmp_path / "ok.wav"
    sf.write(ok, sine(300.0, 16000, 1.0)[:min_samples], 16000, subtype="PCM_16")
    assert load_audio(ok, min_samples=min_samples).numel() == min_samples
    # the limit applies after resampling: 8 kHz audio needs half as many input samples
    short_8k = tmp_path / "short_8k.wav"
    sf.write(short_8k, sine(300.0, 8000, 1.0)[: min_samples // 2 - 10], 8000, subtype="PCM_16")
    with pytest.raises(AudioError, match="too short"):
        load_audio(short_8k, min_samples=min_samples)


def test_float_file_far_outside_full_scale_is_scaled_to_peak_one(tmp_path) -> None:
    """A float WAV holding 16-bit-sized values (or any gain) reads as the same waveform at full scale."""
    from workers.audio.reader import read_audio

    rng = np.random.default_rng(0)
    x = (0.4 * rng.standard_normal(8000)).clip(-0.9, 0.9).astype(np.float32)
    for gain in (1.0, 32768.0, 1e6):
        path = tmp_path / f"g{gain:g}.wav"
        sf.write(path, x * gain, 16000, subtype="FLOAT")
        samples, _ = read_audio(path)
        expected = x if gain == 1.0 else x / np.abs(x).max()
        np.testing.assert_allclose(samples[:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not AN4_ROOT.is_dir(), reason="shared AN4 data not present")
def test_scaled_float_speech_transcribes_like_the_original(tmp_path) -> None:
    from workers.model.bundle import DEFAULT_BUNDLE
    from workers.recognizer import Recognizer

    if not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("no shipped model")
    wave = load_audio(sorted((AN4_ROOT / "wav" / "an4_clstk" / "mcfl").glob("*.raw"))[3]).numpy()
    rec = Recognizer()
    texts = []
    for gain in (1.0, 1e6):
        sf.write(tmp_path / "s.wav", wave * gain, 16000, subtype="FLOAT")
        texts.append(rec.transcribe_file(tmp_path / "s.wav").text)
    assert texts[0] and texts[1] == rec.transcribe_file(tmp_path / "s.wav").text
    peak_one = wave / np.abs(wave).max()
    sf.write(tmp_path / "p.wav", peak_one, 16000, subtype="FLOAT")
    assert texts[1] == rec.transcribe_file(tmp_path / "p.wav").text


def test_truncated_wav_is_an_error_naming_both_durations(tmp_path) -> None:
    """libsndfile reads the part that is there without a word; the header says more."""
    x = (0.1 * np.random.default_rng(1).standard_normal(12800)).astype(np.float32)  # 0.80 s
    sf.write(tmp_path / "full.wav", x, 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: 44 + 2 * 4320])  # 0.27 s of samples left
    with pytest.raises(AudioError, match=r"truncated WAV: the header declares 0\.80 s, 0\.27 s are present") as err:
        read_audio(tmp_path / "cut.wav")
    assert "cut.wav" in str(err.value)
    assert read_audio(tmp_path / "full.wav")[0].shape == (12800, 1)
    unknown = bytearray(data[: 44 + 2 * 4320])
    unknown[40:44] = (0xFFFFFFFF).to_bytes(4, "little")  # a streaming writer's "length unknown"
    (tmp_path / "streamed.wav").write_bytes(bytes(unknown))
    assert read_audio(tmp_path / "streamed.wav")[0].shape[0] == 4320
