"""Fixed degradations for measuring robustness: ``asr eval --perturb KIND=VALUE``.

Each perturbation is applied to an utterance's waveform before it enters the pipeline,
in the order given, with randomness seeded by (seed, utterance id) so every run and
every mode hears the same audio.

    gain_db=-20          scale the level (then clip to [-1, 1], as a 16-bit input would)
    rate_hz=8000         down-sample; the pipeline gets 8 kHz input and resamples it itself
    noise_snr_db=10      white noise at this SNR
    babble_snr_db=10     babble (5 talkers from the babble pool) at this SNR
    reverb_rt60_s=0.5    convolve with a simulated room impulse response of this RT60
    silence_s=5          replace the speech with this much digital silence (reference: no words)
    noise_dbfs=-60       add white noise at this absolute RMS level (after silence_s: faint noise only)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from workers.data.augment import add_noise, apply_gain, babble_noise, colored_noise, reverberate, simulate_rir

ROOMS_PER_RT60 = 8  # reverb_rt60_s draws one of this many simulated rooms per utterance
KINDS = ("gain_db", "rate_hz", "noise_snr_db", "babble_snr_db", "reverb_rt60_s", "silence_s", "noise_dbfs")
BABBLE_TALKERS = 5


@dataclass(frozen=True)
class Perturbation:
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    @classmethod
    def parse(cls, text: str) -> Perturbation:
        """``"KIND=VALUE"`` -> Perturbation; ``ValueError`` with the reason for anything else."""
        kind, sep, value = text.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise ValueError(f"perturbation {text!r}: expected KIND=VALUE with KIND one of {', '.join(KINDS)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"perturbation {text!r}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"perturbation {text!r}: the value must be finite")
        if kind == "rate_hz" and not 1000 <= number <= 192000:
            raise ValueError(f"perturbation {text!r}: rate_hz must be in [1000, 192000]")
        if kind in ("reverb_rt60_s", "silence_s") and number <= 0:
            raise ValueError(f"perturbation {text!r}: {kind} must be > 0")
        return cls(kind, number)


def perturb(
    wave: torch.Tensor, rate_hz: int, perturbations: list[Perturbation], utterance_id: str, seed: int = 0,
    babble_pool: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """(samples,) at ``rate_hz`` -> the degraded waveform and its rate (changed only by ``rate_hz=``)."""
    import torchaudio.functional as AF

    rng = random.Random(f"{seed}:{utterance_id}")
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    for p in perturbations:
        if p.kind == "gain_db":
            wave = apply_gain(wave, p.value)
        elif p.kind == "rate_hz":
            wave = AF.resample(wave, rate_hz, int(p.value))
            rate_hz = int(p.value)
        elif p.kind == "noise_snr_db":
            wave = add_noise(wave, colored_noise(wave.numel(), 0.0, generator), p.value)
        elif p.kind == "babble_snr_db":
            if not babble_pool:
                raise ValueError("babble_snr_db needs a babble pool (speech of speakers not evaluated)")
            wave = add_noise(wave, babble_noise(wave.numel(), babble_pool, BABBLE_TALKERS, rng), p.value)
        elif p.kind == "reverb_rt60_s":
            wave = reverberate(wave, _room(p.value, rate_hz, seed, rng.randrange(ROOMS_PER_RT60)))
        elif p.kind == "silence_s":
            wave = torch.zeros(int(round(p.value * rate_hz)))
        elif p.kind == "noise_dbfs":
            wave = wave + colored_noise(wave.numel(), 0.0, generator) * 10.0 ** (p.value / 20.0)
    return wave, rate_hz


@lru_cache(maxsize=64)
def _room(rt60_s: float, rate_hz: int, seed: int, index: int) -> torch.Tensor:
    """Room ``index`` of the evaluation's set for this RT60 (simulating one takes up to a second)."""
    return simulate_rir(rt60_s, rate_hz, random.Random(f"room:{seed}:{rt60_s}:{index}"))


def removes_speech(perturbations: list[Perturbation]) -> bool:
    """True when the perturbed audio has no speech left, so the reference is empty."""
    return any(p.kind == "silence_s" for p in perturbations)
