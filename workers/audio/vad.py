"""Voice activity: silero-vad (its model ships inside the ``silero-vad`` package).

The detector runs on fixed windows of 512 samples at 16 kHz (32 ms), carrying the
model's recurrent state and 64 samples of context from window to window, so a stream fed
in chunks of any size gets exactly the probabilities of the whole signal. The recogniser
uses them to emit no words where nobody speaks: a word is kept only if some speech
window lies within ``pad_ms`` of its time span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from workers.audio.vad_gate import VAD_RATE_HZ, WINDOW_S, WINDOW_SAMPLES, VadConfig, gate_words, keep_spoken_words

__all__ = [  # the settings and the word gating live in workers.audio.vad_gate (torch-free); re-exported
    "VAD_RATE_HZ", "WINDOW_S", "WINDOW_SAMPLES", "SpeechDetector", "VadConfig", "VadState", "gate_words", "keep_spoken_words",
    "pause_cuts", "quiet_cuts", "speech_detector", "trim_to_speech", "window_energy_db",
]

@lru_cache(maxsize=1)
def _silero() -> torch.jit.ScriptModule:
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)  # silero-vad's use of importlib.resources.path
        model = load_silero_vad()
    return model._model  # the 16 kHz network, whose state is explicit: forward(x, state) -> (prob, state)


@lru_cache(maxsize=1)
def _silero_lstm() -> torch.nn.LSTM:
    """The LSTM cell of silero's 16 kHz network as a one-layer ``torch.nn.LSTM`` with its weights,
    so that a sequence of windows runs in one call."""
    cell = _silero().decoder.rnn
    lstm = torch.nn.LSTM(cell.weight_ih.shape[1], cell.weight_hh.shape[1], batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(lstm, f"{name}_l0").copy_(getattr(cell, name))
    return lstm.eval()


@dataclass
class VadState:
    """What one stream carries between chunks: pending samples, 64 samples of context, the LSTM state."""

    pending: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    context: torch.Tensor = field(default_factory=lambda: torch.zeros(64))
    state: torch.Tensor = field(default_factory=lambda: torch.zeros(2, 1, 128))
    peak: float = 0.0  # largest |sample| of the stream so far


class SpeechDetector:
    """Speech probability per 32 ms window of a 16 kHz waveform, offline or chunk by chunk."""

    def __init__(self, config: VadConfig | None = None, rate_hz: int = VAD_RATE_HZ) -> None:
        if rate_hz != VAD_RATE_HZ:
            raise ValueError(f"voice activity detection needs {VAD_RATE_HZ} Hz audio, the model runs at {rate_hz} Hz "
                             "(set vad.enabled=false for this model)")
        self.config = config or VadConfig()
        self.model = _silero()
        self.context_samples = int(self.model.context_size_samples)

    def initial_state(self) -> VadState:
        return VadState(context=torch.zeros(self.context_samples))

    def online(self, chunk: torch.Tensor, state: VadState) -> tuple[torch.Tensor, VadState]:
        """(samples,) at 16 kHz -> speech probabilities (windows,) of the windows this chunk completed."""
        return self.online_many([chunk], [state])[0]

    def online_many(self, chunks: list[torch.Tensor], states: list[VadState]) -> list[tuple[torch.Tensor, VadState]]:
        """``online`` for several streams at once: chunk i (samples,) continues the stream of
        ``states[i]``. Returns per stream the speech probabilities (windows,) of the windows its
        chunk completed, and its new state.

        silero's network is a per-window encoder (STFT and convolutions, nothing carried
        between windows) followed by one LSTM cell across windows and a per-window head. So
        every window of every stream goes through the encoder in one batch, the LSTM runs over
        each stream's windows in one ``torch.nn.LSTM`` call (its loop in C++, the streams as a
        packed batch) and the head in one batch: about 0.1 ms of one core per second of audio
        at batch sizes where calling the network window by window costs 5-15 ms. The
        probabilities equal the network's own window-by-window ones up to float rounding
        (~1e-6; tested), so a stream fed in chunks of any size gets those of the whole signal."""
        samples = [torch.cat([s.pending, c.float()]) for c, s in zip(chunks, states)]
        counts = [x.numel() // WINDOW_SAMPLES for x in samples]
        inputs, peaks = [], []
        for x, n, s in zip(samples, counts, states):
            windows, peak = self._normalised_windows(x[: n * WINDOW_SAMPLES].reshape(n, WINDOW_SAMPLES), s.peak)
            context = torch.cat([s.context[None], windows[:-1, -self.context_samples :]]) if n else s.context[None, :0]
            inputs.append(torch.cat([context[:n], windows], dim=1))
            peaks.append(peak)
        probs, hidden = self._run(inputs, [s.state for s in states])
        return [
            (p, VadState(x[n * WINDOW_SAMPLES :].clone(), (i[-1, -self.context_samples :].clone() if n else s.context), h, peak))
            for p, x, n, i, s, h, peak in zip(probs, samples, counts, inputs, states, hidden, peaks)
        ]

    def _normalised_windows(self, windows: torch.Tensor, peak: float) -> tuple[torch.Tensor, float]:
        """(windows, 512) raw -> the same scaled as the detector hears them (causal level
        normalisation: window k's gain depends on the running peak of windows 0..k and the
        stream's ``peak`` before them), and the new running peak."""
        if not len(windows):
            return windows, peak
        running = torch.cummax(windows.abs().amax(dim=1), dim=0).values.clamp(min=peak)
        max_gain = 10.0 ** (self.config.max_gain_db / 20.0)
        gains = (self.config.target_peak / running.clamp(min=1e-9)).clamp(max=max_gain)
        return windows * gains[:, None], float(running[-1])

    def _run(self, inputs: list[torch.Tensor], states: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The network over streams' windows: ``inputs[i]`` (windows_i, 576) (64 context samples +
        one window each), ``states[i]`` (2, 1, 128) the LSTM's (h, c) before them -> speech
        probabilities (windows_i,) and the state after them, per stream."""
        counts = [len(x) for x in inputs]
        probs = [torch.empty(0) for _ in inputs]
        hidden = list(states)
        live = [i for i, n in enumerate(counts) if n]
        if not live:
            return probs, hidden
        with torch.no_grad():
            encoded = self.model.encoder(self.model.run_extractors(torch.cat([inputs[i] for i in live])))[..., 0]  # (N, 128)
            sequences = torch.split(encoded, [counts[i] for i in live])
            packed = torch.nn.utils.rnn.pack_sequence(list(sequences), enforce_sorted=False)
            h0 = torch.cat([states[i][0] for i in live], dim=0)[None]  # (1, streams, 128)
            c0 = torch.cat([states[i][1] for i in live], dim=0)[None]
            out, (h_n, c_n) = self._lstm()(packed, (h0, c0))
            padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)  # (streams, longest, 128)
            head = self.model.decoder.decoder
            logits = head(padded.reshape(-1, 128, 1)).reshape(len(live), -1)  # ReLU, 1x1 conv, sigmoid
        for j, i in enumerate(live):
            probs[i] = logits[j, : counts[i]].clone()
            hidden[i] = torch.stack([h_n[0, j : j + 1], c_n[0, j : j + 1]])
        return probs, hidden

    def _lstm(self) -> torch.nn.LSTM:
        """silero's LSTM cell as a one-layer ``torch.nn.LSTM`` (the same weights)."""
        return _silero_lstm()

    def probabilities(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) at 16 kHz -> (windows,) speech probabilities of the whole signal."""
        return self.online(wave, self.initial_state())[0]

    def speech(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) -> (windows,) bool: speech or not."""
        return self.probabilities(wave) > self.config.threshold

    def speech_many(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """``speech`` of several whole signals (each (samples,) at 16 kHz) in one batch ->
        (windows_i,) bool per signal, as ``speech`` gives each alone."""
        return [p > self.config.threshold for p, _ in self.online_many(waves, [self.initial_state() for _ in waves])]


def speech_detector(config: VadConfig, rate_hz: int) -> SpeechDetector | None:
    """The detector for a model running at ``rate_hz``, or None when ``config`` turns detection off."""
    return SpeechDetector(config, rate_hz) if config.enabled else None


def pause_cuts(speech: torch.Tensor, max_segment_s: float, min_pause_s: float) -> list[tuple[int, int]]:
    """Cut a recording into utterances at the middle of its pauses, none longer than ``max_segment_s``.

    ``speech``: (windows,) bool flags of the whole recording. Returns (first, end) window
    ranges that tile it: a cut in every pause (a non-speech run of at least
    ``min_pause_s``), and where a stretch between pauses is still longer than
    ``max_segment_s``, cuts at the limit.
    """
    n = int(speech.numel())
    limit = max(1, int(max_segment_s / WINDOW_S))
    min_pause = max(1, int(round(min_pause_s / WINDOW_S)))
    cuts, run_start = [0], None
    for i, is_speech in enumerate([*speech.tolist(), True]):
        if not is_speech and run_start is None:
            run_start = i
        elif is_speech and run_start is not None:
            if i - run_start >= min_pause and 0 < run_start and i < n:
                cuts.append((run_start + i) // 2)
            run_start = None
    cuts.append(n)
    pieces = []
    for start, end in zip(cuts, cuts[1:]):
        while end - start > limit:
            pieces.append((start, start + limit))
            start += limit
        pieces.append((start, end))
    return pieces


def trim_to_speech(speech: torch.Tensor, first: int, end: int, pad_ms: float) -> tuple[int, int]:
    """The windows [first, end) of a piece narrowed to its speech and ``pad_ms`` around it
    (within the piece). ``speech``: (windows,) bool flags of the whole recording; the piece must
    hold speech."""
    found = torch.nonzero(speech[first:end]).flatten()
    pad = int(round(pad_ms / 1000 / WINDOW_S))
    return max(first, first + int(found[0]) - pad), min(end, first + int(found[-1]) + 1 + pad)


def window_energy_db(wave: torch.Tensor) -> torch.Tensor:
    """(samples,) -> (windows,) mean power in dB of each complete 32 ms window (``WINDOW_SAMPLES``)."""
    n = wave.numel() // WINDOW_SAMPLES
    windows = wave[: n * WINDOW_SAMPLES].double().reshape(n, WINDOW_SAMPLES)
    return (10 * torch.log10(windows.pow(2).mean(dim=1) + 1e-10)).float()


def quiet_cuts(energy_db: torch.Tensor, max_segment_s: float, search_s: float = 5.0) -> list[tuple[int, int]]:
    """Cut a recording without voice activity flags into pieces of at most ``max_segment_s``.

    ``energy_db``: (windows,) ``window_energy_db`` of the whole recording. Returns (first, end)
    window ranges that tile it; each cut lies at the quietest moment (energy averaged over
    9 windows, 0.29 s) of the last ``search_s`` (at most half a piece) before the limit.
    """
    n = int(energy_db.numel())
    limit = max(1, int(max_segment_s / WINDOW_S))
    search = max(1, min(limit // 2, int(search_s / WINDOW_S)))
    smooth = torch.nn.functional.avg_pool1d(energy_db.float()[None, None], 9, 1, 4, count_include_pad=False)[0, 0] if n else energy_db
    pieces, start = [], 0
    while n - start > limit:
        first_candidate = start + limit - search
        cut = first_candidate + int(torch.argmin(smooth[first_candidate : start + limit]))
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces
