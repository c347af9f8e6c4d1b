"""MFCC features: torchaudio MFCC, mean/variance normalisation, frame stacking.

Frames are computed without centre padding (frame k covers samples
``[k*hop, k*hop + win)``) and with ``log(mel + eps)`` rather than decibels with a
``top_db`` floor, so each frame depends only on its own window: this is what lets the
streaming extractor reproduce the offline features exactly.

Normalisation is either global (training-set mean and std, ``cmn_prior_frames=0``) or
a causal running cepstral mean: frame t is normalised by the mean of frames 0..t of its
own stream blended with the global mean, which counts as ``cmn_prior_frames`` frames
seen before the stream began. A change of input level or microphone adds a constant to
the cepstra; the running mean removes it within a second or two, using no future
frames, so the offline and the streaming extractor stay identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torchaudio

from workers.features.config import FeatureConfig


@dataclass
class CmnState:
    """A stream's running cepstral mean (n_mfcc,) float64 and the number of frames it stands for
    (None: not started, i.e. the global mean counting as the prior)."""

    mean: torch.Tensor | None = None
    count: float = 0.0


@dataclass
class Normalizer:
    """Global mean/variance statistics over MFCC frames, each of shape (n_mfcc,)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames - self.mean) / self.std

    def initial_state(self) -> CmnState:
        return CmnState()

    def causal(
        self, frames: torch.Tensor, state: CmnState, prior_frames: float, max_frames: float = math.inf, silence_std: float = 0.0
    ) -> tuple[torch.Tensor, CmnState]:
        """(frames, n_mfcc) raw MFCC -> normalised frames and the updated running mean.

        Frame t is centred on ``(prior_frames * mean + sum of frames 0..t) / (prior_frames + t + 1)``
        (frames counted from the start of the stream, across calls) and divided by the global std.
        Once that count reaches ``max_frames`` the mean forgets exponentially with that time
        constant (so a level change late in a long stream is absorbed as fast as an early one).
        Frames whose c0 lies more than ``silence_std`` global stds below the global mean
        (digital silence) are normalised but do not move the mean.
        """
        if frames.shape[0] == 0:
            return frames.clone(), state
        x = frames.double()
        mean = state.mean if state.mean is not None else self.mean.double()
        count = state.count if state.mean is not None else float(prior_frames)
        use = torch.ones(x.shape[0], dtype=torch.bool)
        if silence_std > 0:
            use = x[:, 0] >= float(self.mean[0]) - silence_std * float(self.std[0])
        counts = count + torch.cumsum(use.double(), dim=0)
        k = int((counts <= max_frames).sum())  # a prefix: the cumulative regime
        running = torch.empty_like(x)
        if k:
            total = mean * count + torch.cumsum(x[:k] * use[:k, None], dim=0)
            running[:k] = total / counts[:k, None]
            mean, count = running[k - 1].clone(), float(counts[k - 1])
        for t in range(k, x.shape[0]):  # the capped regime (streams longer than max_frames)
            if use[t]:
                count = min(count + 1.0, max_frames)
                mean = mean + (x[t] - mean) / count
            running[t] = mean
        out = ((x - running) / self.std.double()).float()
        return out, CmnState(mean, count)

    def causal_many(
        self, frames: list[torch.Tensor], states: list[CmnState], prior_frames: float, max_frames: float = math.inf,
        silence_std: float = 0.0,
    ) -> list[tuple[torch.Tensor, CmnState]]:
        """``causal`` for several streams at once (frames[i] (frames, n_mfcc) continues the stream
        of ``states[i]``), each getting exactly what ``causal`` gives it: streams with the same
        number of frames share one batch of tensor operations, so a feature actor does not pay
        Python's per-operation cost once per stream."""
        results: list[tuple[torch.Tensor, CmnState] | None] = [None] * len(frames)
        by_length: dict[int, list[int]] = {}
        for i, f in enumerate(frames):
            if f.shape[0] == 0:
                results[i] = (f.clone(), states[i])
            else:
                by_length.setdefault(f.shape[0], []).append(i)
        for rows in by_length.values():
            group = self._causal_batch(torch.stack([frames[i] for i in rows]), [states[i] for i in rows],
                                       prior_frames, max_frames, silence_std)
            for i, result in zip(rows, group):
                results[i] = result
        return results  # type: ignore[return-value]

    def _causal_batch(
        self, frames: torch.Tensor, states: list[CmnState], prior_frames: float, max_frames: float, silence_std: float
    ) -> list[tuple[torch.Tensor, CmnState]]:
        """``causal`` of (streams, frames, n_mfcc): the same operations, one row per stream."""
        x = frames.double()
        means = torch.stack([s.mean if s.mean is not None else self.mean.double() for s in states])  # (streams, n_mfcc)
        count0 = torch.tensor([s.count if s.mean is not None else float(prior_frames) for s in states], dtype=torch.float64)
        use = torch.ones(x.shape[:2], dtype=torch.bool)
        if silence_std > 0:
            use = x[:, :, 0] >= float(self.mean[0]) - silence_std * float(self.std[0])
        counts = count0[:, None] + torch.cumsum(use.double(), dim=1)  # (streams, frames)
        cumulative = counts <= max_frames  # a prefix of each row
        k = cumulative.sum(dim=1)
        total = means[:, None, :] * count0[:, None, None] + torch.cumsum(x * use[:, :, None], dim=1)
        running = total / counts[:, :, None]
        rows = torch.arange(x.shape[0])
        last = (k - 1).clamp_min(0)
        mean = torch.where((k > 0)[:, None], running[rows, last], means)
        count = torch.where(k > 0, counts[rows, last], count0)
        for t in range(int(k.min()), x.shape[1]):  # the capped regime (streams longer than max_frames)
            capped = t >= k
            update = capped & use[:, t]
            count = torch.where(update, (count + 1.0).clamp_max(max_frames), count)
            mean = torch.where(update[:, None], mean + (x[:, t] - mean) / count[:, None], mean)
            running[:, t] = torch.where(capped[:, None], mean, running[:, t])
        out = ((x - running) / self.std.double()).float()
        return [(out[i], CmnState(mean[i].clone(), float(count[i]))) for i in range(x.shape[0])]

    @classmethod
    def identity(cls, n_mfcc: int) -> Normalizer:
        return cls(torch.zeros(n_mfcc), torch.ones(n_mfcc))

    @classmethod
    def from_frames(cls, frame_batches: list[torch.Tensor]) -> Normalizer:
        """Statistics from a list of (frames, n_mfcc) raw MFCC tensors (training data only)."""
        total = torch.cat(frame_batches).double()
        return cls(total.mean(0).float(), total.std(0).clamp_min(1e-5).float())


class MfccExtractor:
    """Offline feature extraction: waveform (samples,) -> normalised stacked features (frames, feature_dim)."""

    def __init__(self, config: FeatureConfig, normalizer: Normalizer | None = None) -> None:
        self.config = config
        self.normalizer = normalizer or Normalizer.identity(config.n_mfcc)
        self._mfcc = torchaudio.transforms.MFCC(
            sample_rate=config.sample_rate_hz,
            n_mfcc=config.n_mfcc,
            log_mels=True,
            melkwargs={
                "n_fft": config.window_samples,
                "win_length": config.window_samples,
                "hop_length": config.hop_samples,
                "n_mels": config.n_mels,
                "center": False,
            },
        )

    def raw_mfcc(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) -> un-normalised MFCC (frames_10ms, n_mfcc); zero frames if too short."""
        return self.raw_mfcc_many([wave])[0]

    def raw_mfcc_many(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """``raw_mfcc`` of several waveforms: those of the same length go through the transforms
        as one batch (the same numbers as one by one)."""
        out = [torch.zeros(0, self.config.n_mfcc)] * len(waves)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            if w.numel() >= self.config.window_samples:
                by_length.setdefault(w.numel(), []).append(i)
        with torch.no_grad():
            for rows in by_length.values():
                # torchaudio's MFCC with log_mels=True, but with our floor inside the log
                mel = self._mfcc.MelSpectrogram(torch.stack([waves[i].float() for i in rows]))  # (rows, n_mels, frames)
                mfcc = torch.matmul((mel + self.config.log_floor).log().transpose(1, 2), self._mfcc.dct_mat)
                for j, i in enumerate(rows):
                    out[i] = mfcc[j].contiguous()
        return out

    def normalize_many(self, frames: list[torch.Tensor], states: list[CmnState | None]) -> list[tuple[torch.Tensor, CmnState]]:
        """``normalize`` for several streams at once (the same results)."""
        states = [s if s is not None else self.normalizer.initial_state() for s in states]
        if self.config.cmn_prior_frames > 0:
            cfg = self.config
            return self.normalizer.causal_many(frames, states, cfg.cmn_prior_frames, cfg.cmn_max_frames, cfg.cmn_silence_std)
        return [(self.normalizer(f), s) for f, s in zip(frames, states)]

    def stack(self, frames: torch.Tensor) -> torch.Tensor:
        """(frames_10ms, n_mfcc) -> (frames_10ms // stack, n_mfcc * stack); a partial group is dropped."""
        k = self.config.stack_frames
        n = frames.shape[0] // k
        return frames[: n * k].reshape(n, k * frames.shape[1])

    def normalize(self, frames: torch.Tensor, state: CmnState | None = None) -> tuple[torch.Tensor, CmnState]:
        """(frames_10ms, n_mfcc) raw MFCC -> normalised frames; ``state`` carries a stream's running mean."""
        state = state if state is not None else self.normalizer.initial_state()
        if self.config.cmn_prior_frames > 0:
            cfg = self.config
            return self.normalizer.causal(frames, state, cfg.cmn_prior_frames, cfg.cmn_max_frames, cfg.cmn_silence_std)
        return self.normalizer(frames), state

    def features_from_raw(self, frames: torch.Tensor) -> torch.Tensor:
        """Raw MFCC of a whole utterance (frames_10ms, n_mfcc) -> model input (frames, feature_dim)."""
        return self.stack(self.normalize(frames)[0])

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) -> (frames, feature_dim)."""
        return self.features_from_raw(self.raw_mfcc(wave))


@dataclass
class FeatureState:
    """What a streaming extractor carries between chunks."""

    pending_samples: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    pending_frames: torch.Tensor | None = None  # (< stack_frames, n_mfcc) not yet stacked
    cmn: CmnState | None = None  # running mean of the causal normalisation


class StreamingFeatures:
    """Chunk-wise extraction whose concatenated output equals ``MfccExtractor`` on the whole signal.

    ``online_inference(chunk, state) -> (features, state)``: chunk is (samples,) at the
    model rate, features is (new_frames, feature_dim).
    """

    def __init__(self, extractor: MfccExtractor) -> None:
        self.extractor = extractor
        self.config = extractor.config

    def initial_state(self) -> FeatureState:
        return FeatureState(pending_frames=torch.zeros(0, self.config.n_mfcc), cmn=self.extractor.normalizer.initial_state())

    def online_inference(self, chunk: torch.Tensor, state: FeatureState) -> tuple[torch.Tensor, FeatureState]:
        return self.online_many([chunk], [state])[0]

    def online_many(self, chunks: list[torch.Tensor], states: list[FeatureState]) -> list[tuple[torch.Tensor, FeatureState]]:
        """``online_inference`` for several streams at once (chunk i continues the stream of
        ``states[i]``): the MFCC and the running mean of all of them in batches, each stream
        getting exactly what it gets alone."""
        cfg = self.config
        samples = [torch.cat([state.pending_samples, chunk.float()]) for chunk, state in zip(chunks, states)]
        n_frames = [0 if x.numel() < cfg.window_samples else 1 + (x.numel() - cfg.window_samples) // cfg.hop_samples for x in samples]
        raw = self.extractor.raw_mfcc_many([x[: n * cfg.hop_samples - cfg.hop_samples + cfg.window_samples] if n else x[:0]
                                            for x, n in zip(samples, n_frames)])
        normalized = self.extractor.normalize_many(raw, [state.cmn for state in states])
        results = []
        for x, n, state, (norm, cmn) in zip(samples, n_frames, states, normalized):
            pending = state.pending_frames if state.pending_frames is not None else torch.zeros(0, cfg.n_mfcc)
            frames = torch.cat([pending, norm])
            n_stacked = frames.shape[0] // cfg.stack_frames
            results.append((self.extractor.stack(frames), FeatureState(
                pending_samples=x[n * cfg.hop_samples :].clone(), pending_frames=frames[n_stacked * cfg.stack_frames :].clone(), cmn=cmn)))
        return results
