"""`asr eval --perturb` degradations and the training augmenter do what they say, measured on the output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workers.audio.reader import load_audio
from workers.data.augment import AugmentConfig, Augmenter, band_limit, colored_noise, pad_with_background, simulate_rir
from workers.data.perturb import Perturbation, perturb, removes_speech

AN4 = Path(__file__).resolve().parents[4] / "shared" / "data" / "an4"
RATE = 16000


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    path = AN4 / "wav" / "an4_clstk" / "mcfl" / "an261-mcfl-b.raw"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return load_audio(path)


@pytest.fixture(scope="module")
def pool() -> list[torch.Tensor]:
    files = sorted((AN4 / "wav" / "an4_clstk" / "fash").glob("*.raw"))[:6]
    if not files:
        pytest.skip("AN4 not present")
    return [load_audio(f) for f in files]


def power_db(x: torch.Tensor) -> float:
    return 10 * math.log10(float(x.double().pow(2).mean()))


def one(text: str) -> list[Perturbation]:
    return [Perturbation.parse(text)]


@pytest.mark.parametrize("gain_db", [-35.0, -20.0, 6.0])
def test_gain_changes_the_level_by_that_many_db(speech: torch.Tensor, gain_db: float) -> None:
    out, rate = perturb(speech, RATE, one(f"gain_db={gain_db}"), "u")
    assert rate == RATE and out.shape == speech.shape
    assert power_db(out) - power_db(speech) == pytest.approx(gain_db, abs=0.01)


def test_positive_gain_clips_to_full_scale(speech: torch.Tensor) -> None:
    out, _ = perturb(speech, RATE, one("gain_db=30"), "u")
    assert float(out.abs().max()) == 1.0
    assert float((out.abs() == 1.0).float().mean()) > 0.01  # a real share of samples is clipped


def test_rate_down_samples_and_keeps_the_duration(speech: torch.Tensor) -> None:
    out, rate = perturb(speech, RATE, one("rate_hz=8000"), "u")
    assert rate == 8000
    assert abs(out.numel() - speech.numel() // 2) <= 1
    spectrum = torch.fft.rfft(band_limit(speech, RATE)).abs().pow(2)
    freqs = torch.fft.rfftfreq(speech.numel(), 1 / RATE)
    above = float(spectrum[freqs > 4200].sum() / spectrum.sum())
    assert above < 1e-3  # nothing left above the telephone band


@pytest.mark.parametrize("kind,snr_db", [("noise_snr_db", 10.0), ("noise_snr_db", 20.0), ("babble_snr_db", 10.0)])
def test_noise_is_mixed_at_the_requested_snr(speech: torch.Tensor, pool: list[torch.Tensor], kind: str, snr_db: float) -> None:
    out, _ = perturb(speech, RATE, one(f"{kind}={snr_db}"), "u", babble_pool=pool)
    noise = out - speech
    assert power_db(speech) - power_db(noise) == pytest.approx(snr_db, abs=0.05)


def test_white_noise_is_white_and_babble_is_speech_like(speech: torch.Tensor, pool: list[torch.Tensor]) -> None:
    white = perturb(speech, RATE, one("noise_snr_db=0"), "u")[0] - speech
    babble = perturb(speech, RATE, one("babble_snr_db=0"), "u", babble_pool=pool)[0] - speech
    freqs = torch.fft.rfftfreq(speech.numel(), 1 / RATE)

    def high_share(x: torch.Tensor) -> float:
        p = torch.fft.rfft(x).abs().pow(2)
        return float(p[freqs > 4000].sum() / p.sum())

    assert high_share(white) == pytest.approx(0.5, abs=0.05)  # flat spectrum: half the power above fs/4
    assert high_share(babble) < 0.2  # speech has most of its power below 4 kHz


def test_perturbations_are_deterministic_per_seed_and_utterance(speech: torch.Tensor) -> None:
    spec = one("noise_snr_db=10")
    a, _ = perturb(speech, RATE, spec, "utt1", seed=3)
    b, _ = perturb(speech, RATE, spec, "utt1", seed=3)
    c, _ = perturb(speech, RATE, spec, "utt2", seed=3)
    d, _ = perturb(speech, RATE, spec, "utt1", seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_reverb_has_the_requested_reverberation_time() -> None:
    import random

    import pyroomacoustics as pra

    for rt60 in (0.3, 0.5, 0.8):
        rir = simulate_rir(rt60, RATE, random.Random(0))
        measured = pra.experimental.measure_rt60(rir.numpy(), fs=RATE, decay_db=30)
        assert measured == pytest.approx(rt60, rel=0.2), (rt60, measured)


def test_reverb_keeps_length_and_level_and_smears_the_signal(speech: torch.Tensor) -> None:
    out, _ = perturb(speech, RATE, one("reverb_rt60_s=0.5"), "u")
    assert out.shape == speech.shape
    assert power_db(out) == pytest.approx(power_db(speech), abs=0.01)
    # energy after the speech's last loud sample grows: the room's tail
    corr = torch.nn.functional.cosine_similarity(out, speech, dim=0)
    assert 0.0 < float(corr) < 0.95


def test_silence_and_faint_noise(speech: torch.Tensor) -> None:
    silent, rate = perturb(speech, RATE, one("silence_s=5"), "u")
    assert rate == RATE and silent.numel() == 5 * RATE and not silent.any()
    spec = one("silence_s=5") + one("noise_dbfs=-60")
    faint, _ = perturb(speech, RATE, spec, "u")
    assert power_db(faint) == pytest.approx(-60, abs=0.1)
    assert removes_speech(spec) and not removes_speech(one("gain_db=-20"))


@pytest.mark.parametrize("text", ["gain_db", "loud=3", "gain_db=abc", "rate_hz=10", "silence_s=0", "reverb_rt60_s=-1"])
def test_bad_specs_are_rejected_with_the_reason(text: str) -> None:
    with pytest.raises(ValueError, match="perturbation"):
        Perturbation.parse(text)


def test_babble_needs_a_pool(speech: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="babble"):
        perturb(speech, RATE, one("babble_snr_db=10"), "u")


def test_colored_noise_slope() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 1 << 16
    freqs = torch.fft.rfftfreq(n, 1 / RATE)

    def low_high(x: torch.Tensor) -> float:
        p = torch.fft.rfft(x).abs().pow(2)
        return float(p[(freqs > 100) & (freqs < 200)].mean() / p[(freqs > 4000) & (freqs < 8000)].mean())

    white, pink, brown = (colored_noise(n, e, gen) for e in (0.0, 1.0, 2.0))
    assert 0.5 < low_high(white) < 2
    assert 10 < low_high(pink) < 100  # ~ 4000/150 ≈ 27
    assert low_high(brown) > 200  # ~ 27**2


def test_augmenter_is_seeded_keeps_length_and_changes_the_audio(speech: torch.Tensor, pool: list[torch.Tensor]) -> None:
    cfg = AugmentConfig(rir_pool_size=4)
    a = Augmenter(cfg, RATE, pool, seed=1)
    b = Augmenter(cfg, RATE, pool, seed=1)
    outs_a = [a(speech) for _ in range(12)]
    outs_b = [b(speech) for _ in range(12)]
    for x, y in zip(outs_a, outs_b):
        assert x.shape == speech.shape and torch.isfinite(x).all() and float(x.abs().max()) <= 1.0
        assert torch.equal(x, y)
    levels = [power_db(x) - power_db(speech) for x in outs_a]
    assert max(levels) - min(levels) > 10  # random gain over a wide range
    assert all(not torch.equal(x, speech) for x in outs_a)


def test_non_finite_values_are_rejected() -> None:
    for text in ("gain_db=nan", "noise_snr_db=inf"):
        with pytest.raises(ValueError, match="finite"):
            Perturbation.parse(text)


def test_lead_in_and_tail_surround_the_utterance_with_faint_noise(speech: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    lead, tail = RATE // 2, RATE // 4
    out = pad_with_background(speech, lead, tail, -60.0, 1.0, gen)
    assert out.numel() == lead + speech.numel() + tail
    assert -62 < power_db(out[:lead]) < -58 and -62 < power_db(out[-tail:]) < -58
    assert torch.allclose(out[lead : lead + speech.numel()], speech, atol=0.01)  # the speech itself is untouched


def test_augmenter_pads_the_share_it_is_told_to(speech: torch.Tensor, pool: list[torch.Tensor]) -> None:
    """pad_prob 1: every draw is longer by at most two pad_s_range maxima; pad_prob 0: never."""
    padded = Augmenter(AugmentConfig(rir_pool_size=0, reverb_prob=0, pad_prob=1.0, pad_s_range=(0.2, 0.5)), RATE, pool, seed=3)
    lengths = [padded(speech).numel() - speech.numel() for _ in range(8)]
    assert all(0.4 * RATE <= n <= 1.0 * RATE for n in lengths) and len(set(lengths)) > 1
    plain = Augmenter(AugmentConfig(rir_pool_size=0, reverb_prob=0, pad_prob=0.0), RATE, pool, seed=3)
    assert all(plain(speech).numel() == speech.numel() for _ in range(8))
