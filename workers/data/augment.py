"""Waveform degradations: the ones real recordings have, for training and for measuring.

Each function takes a float waveform (samples,) and returns one of the same length.
Random choices come from the ``random.Random`` / ``torch.Generator`` passed in, so a
seed reproduces them. Room impulse responses are simulated with pyroomacoustics (image
source method); mixing at an SNR, resampling and convolution use torchaudio.

``Augmenter`` draws a random chain of them per training utterance (reverberation,
additive noise, telephone band, input level); ``workers.data.perturb`` applies one fixed
degradation for evaluation.
"""

from __future__ import annotations

import math
import random

import torch
import torchaudio.functional as AF

from workers.training.config import AugmentConfig  # noqa: F401  (re-exported)

#: Telephone audio (what phone lines and Asterisk deliver) is sampled at 8 kHz.
TELEPHONE_RATE_HZ = 8000


def apply_gain(wave: torch.Tensor, gain_db: float, clip: bool = True) -> torch.Tensor:
    """Scale by ``gain_db``; with ``clip`` the result is limited to [-1, 1] as a 16-bit ADC would."""
    out = wave * (10.0 ** (gain_db / 20.0))
    return out.clamp(-1.0, 1.0) if clip else out


def band_limit(wave: torch.Tensor, rate_hz: int, band_rate_hz: int = TELEPHONE_RATE_HZ) -> torch.Tensor:
    """Down-sample to ``band_rate_hz`` and back: what remains of the signal after a telephone line."""
    low = AF.resample(wave, rate_hz, band_rate_hz)
    back = AF.resample(low, band_rate_hz, rate_hz)
    return _fit(back, wave.numel())


def _fit(wave: torch.Tensor, n: int) -> torch.Tensor:
    return wave[:n] if wave.numel() >= n else torch.nn.functional.pad(wave, (0, n - wave.numel()))


def colored_noise(n: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """Unit-RMS noise (n,) with power spectral density ~ 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spectrum = torch.fft.rfft(torch.randn(n, generator=generator))
    freqs = torch.arange(spectrum.numel(), dtype=torch.float32).clamp_min(1.0)
    noise = torch.fft.irfft(spectrum / freqs ** (exponent / 2.0), n=n)
    return noise / noise.pow(2).mean().sqrt().clamp_min(1e-12)


def babble_noise(n: int, pool: list[torch.Tensor], talkers: int, rng: random.Random) -> torch.Tensor:
    """Sum of ``talkers`` random stretches of speech from ``pool`` (each (samples,)), looped to n samples, unit RMS."""
    if not pool:
        raise ValueError("babble noise needs a pool of speech recordings")
    mix = torch.zeros(n)
    for _ in range(talkers):
        speech = pool[rng.randrange(len(pool))]
        speech = speech / speech.pow(2).mean().sqrt().clamp_min(1e-8)
        reps = speech.repeat(math.ceil(n / speech.numel()) + 1)
        start = rng.randrange(speech.numel())
        mix += reps[start : start + n]
    return mix / mix.pow(2).mean().sqrt().clamp_min(1e-12)


def add_noise(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Mix ``noise`` (same length) into ``wave`` at ``snr_db`` (signal power over the whole file)."""
    return AF.add_noise(wave[None], noise[None], torch.tensor([float(snr_db)]))[0]


def simulate_rir(rt60_s: float, rate_hz: int, rng: random.Random, calibrate: bool = True) -> torch.Tensor:
    """A room impulse response (taps,) for a random shoebox room with reverberation time ``rt60_s``.

    Image source method (pyroomacoustics) with wall absorption from Sabine's formula;
    source and microphone at random positions at least 0.5 m from the walls. Sabine's
    formula overestimates absorption for these rooms (the simulated RT60 came out 30-40 %
    long), so with ``calibrate`` the room is simulated once more with the target corrected
    by the ratio measured on the first try (Schroeder integration, pyroomacoustics).
    """
    import numpy as np
    import pyroomacoustics as pra

    room_dim = [rng.uniform(3.0, 8.0), rng.uniform(3.0, 7.0), rng.uniform(2.4, 3.5)]

    def point() -> list[float]:
        return [rng.uniform(0.5, d - 0.5) for d in room_dim[:2]] + [rng.uniform(1.0, 1.8)]

    source, mic = point(), point()

    def simulate(target_s: float) -> np.ndarray:
        absorption, max_order = pra.inverse_sabine(target_s, room_dim)
        room = pra.ShoeBox(room_dim, fs=rate_hz, materials=pra.Material(min(absorption, 1.0)), max_order=min(max_order, 80))
        room.add_source(source)
        room.add_microphone(np.array(mic)[:, None])
        room.compute_rir()
        return np.asarray(room.rir[0][0])

    rir = simulate(rt60_s)
    if calibrate:
        measured = float(pra.experimental.measure_rt60(rir, fs=rate_hz, decay_db=30))
        if measured > 0:
            rir = simulate(rt60_s * rt60_s / measured)
    out = torch.as_tensor(rir, dtype=torch.float32)
    return out / out.abs().max().clamp_min(1e-12)


def reverberate(wave: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve with a room impulse response, aligned on its direct path, same length and RMS as the input."""
    direct = int(rir.abs().argmax())
    wet = AF.fftconvolve(wave, rir[direct:])[: wave.numel()]
    scale = wave.pow(2).mean().sqrt() / wet.pow(2).mean().sqrt().clamp_min(1e-12)
    return wet * scale


def pad_with_background(wave: torch.Tensor, lead_samples: int, tail_samples: int, level_dbfs: float,
                        exponent: float, generator: torch.Generator) -> torch.Tensor:
    """(samples,) -> (lead + samples + tail,): the wave with ``lead_samples`` before and ``tail_samples``
    after it, and coloured noise (1/f**exponent) at ``level_dbfs`` RMS under all of it."""
    padded = torch.nn.functional.pad(wave, (lead_samples, tail_samples))
    return padded + colored_noise(padded.numel(), exponent, generator) * (10.0 ** (level_dbfs / 20.0))


class Augmenter:
    """Draws a random degradation chain per call: a faint-noise lead-in and tail, reverberation, then
    noise, then telephone band, then gain."""

    def __init__(self, config: AugmentConfig, rate_hz: int, babble_pool: list[torch.Tensor], seed: int = 0,
                 rirs: list[torch.Tensor] | None = None) -> None:
        """``rirs``: the room pool, when already simulated (by an ``Augmenter`` of the same config and
        seed: the pool is the first thing drawn from the seed); otherwise it is simulated here."""
        self.config = config
        self.rate_hz = rate_hz
        self.babble_pool = babble_pool
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        lo, hi = config.reverb_rt60_s_range
        if rirs is not None:
            self.rirs = list(rirs)
        else:
            self.rirs = [simulate_rir(self.rng.uniform(lo, hi), rate_hz, self.rng) for _ in range(config.rir_pool_size)] if config.reverb_prob > 0 else []

    def reseed(self, seed: int) -> None:
        """Restart the random draws from ``seed`` (the room pool stays): a draw that depends on the
        utterance alone, wherever and in whatever order it is computed."""
        self.rng.seed(seed)
        self.generator.manual_seed(seed)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) -> (samples',): one random degradation chain (longer than the input when a
        lead-in or tail is drawn)."""
        cfg, rng = self.config, self.rng
        if cfg.pad_prob > 0 and rng.random() < cfg.pad_prob:
            lead, tail = (int(rng.uniform(*cfg.pad_s_range) * self.rate_hz) for _ in range(2))
            wave = pad_with_background(wave, lead, tail, rng.uniform(*cfg.pad_noise_dbfs_range), rng.uniform(0.0, 2.0),
                                       self.generator)
        if self.rirs and rng.random() < cfg.reverb_prob:
            wave = reverberate(wave, self.rirs[rng.randrange(len(self.rirs))])
        if rng.random() < cfg.noise_prob:
            if self.babble_pool and rng.random() < cfg.babble_share:
                noise = babble_noise(wave.numel(), self.babble_pool, rng.randint(*cfg.babble_talkers), rng)
            else:
                noise = colored_noise(wave.numel(), rng.uniform(0.0, 2.0), self.generator)
            wave = add_noise(wave, noise, rng.uniform(*cfg.noise_snr_db_range))
        if rng.random() < cfg.band_limit_prob:
            wave = band_limit(wave, self.rate_hz)
        return apply_gain(wave, rng.uniform(*cfg.gain_db_range))
