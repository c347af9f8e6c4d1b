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

from workers.decoder import WordTiming

VAD_RATE_HZ = 16000
WINDOW_SAMPLES = 512  # silero-vad's window at 16 kHz
WINDOW_S = WINDOW_SAMPLES / VAD_RATE_HZ


@dataclass(frozen=True)
class VadConfig:
    """Speech / non-speech gating of recognised words."""

    enabled: bool = True
    threshold: float = 0.5  # speech probability above which a 32 ms window counts as speech
    pad_ms: float = 300.0  # a word is kept if a speech window lies within this distance of its span
    max_segment_s: float = 20.0  # offline/batch: longer recordings are cut at pauses into pieces at most this long
    # Long recordings: shortest non-speech stretch cut at, and the speech padding each piece keeps
    # (it is recognised as its speech +- piece_pad_ms, like an utterance recording, not with the whole
    # pause). The 105 dev utterances joined with 0.3-0.8 s of silence, three random draws, WER over
    # separate files (11.84 %): min_pause 0.35 s + whole pauses 1.17x; + 300 ms 1.11 / 1.03 / 1.09x;
    # 0.5 s + 300 ms 1.10 / 1.03 / 1.01x (chosen); 0.7 s + 300 ms 1.10 / 1.03 / 1.03x; 400 ms worse.
    min_pause_s: float = 0.5
    piece_pad_ms: float = 300.0
    target_peak: float = 0.5  # the detector hears the input scaled so that its running peak is this ...
    max_gain_db: float = 40.0  # ... amplified by at most this much (silero misses speech 35 dB below AN4's level)

    @property
    def gate_pad_ms(self) -> float | None:
        """What the decoder stages gate words with: ``pad_ms``, or None when detection is off."""
        return self.pad_ms if self.enabled else None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"vad.threshold must be in (0, 1), got {self.threshold}")
        if self.pad_ms < 0 or self.piece_pad_ms < 0:
            raise ValueError(f"vad.pad_ms and vad.piece_pad_ms must be >= 0, got {self.pad_ms}, {self.piece_pad_ms}")
        if self.max_segment_s < 1.0 or self.min_pause_s <= 0:
            raise ValueError(f"vad.max_segment_s must be >= 1 and min_pause_s > 0, got {self.max_segment_s}, {self.min_pause_s}")
        if self.max_gain_db < 0 or not 0 < self.target_peak <= 1:
            raise ValueError(f"vad.max_gain_db must be >= 0 and target_peak in (0, 1], got {self.max_gain_db}, {self.target_peak}")


@lru_cache(maxsize=1)
def _silero() -> torch.jit.ScriptModule:
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)  # silero-vad's use of importlib.resources.path
        model = load_silero_vad()
    return model._model  # the 16 kHz network, whose state is explicit: forward(x, state) -> (prob, state)


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
        samples = torch.cat([state.pending, chunk.float()])
        n = samples.numel() // WINDOW_SAMPLES
        if n == 0:
            return torch.zeros(0), VadState(samples, state.context, state.state, state.peak)
        probs = torch.empty(n)
        context, h, peak = state.context, state.state, state.peak
        max_gain = 10.0 ** (self.config.max_gain_db / 20.0)
        with torch.no_grad():
            for i in range(n):
                raw = samples[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]
                # causal level normalisation: the gain depends on this window and the ones before it only
                peak = max(peak, float(raw.abs().max()))
                window = raw * min(max_gain, self.config.target_peak / max(peak, 1e-9))
                out, h = self.model(torch.cat([context, window])[None], h)
                probs[i] = out[0, 0]
                context = window[-self.context_samples :]
        return probs, VadState(samples[n * WINDOW_SAMPLES :].clone(), context.clone(), h, peak)

    def probabilities(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) at 16 kHz -> (windows,) speech probabilities of the whole signal."""
        return self.online(wave, self.initial_state())[0]

    def speech(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) -> (windows,) bool: speech or not."""
        return self.probabilities(wave) > self.config.threshold


def speech_detector(config: VadConfig, rate_hz: int) -> SpeechDetector | None:
    """The detector for a model running at ``rate_hz``, or None when ``config`` turns detection off."""
    return SpeechDetector(config, rate_hz) if config.enabled else None


def gate_words(
    text: str, words: list[WordTiming], speech: torch.Tensor, pad_ms: float, offset_s: float = 0.0
) -> tuple[str, list[WordTiming]]:
    """(text, words) of a hypothesis with the unspoken words removed (``keep_spoken_words``);
    the text is rebuilt only when a word was dropped."""
    kept = keep_spoken_words(words, speech, pad_ms, offset_s)
    return (text, words) if len(kept) == len(words) else (" ".join(w.word for w in kept), kept)


def keep_spoken_words(words: list[WordTiming], speech: torch.Tensor, pad_ms: float, offset_s: float = 0.0) -> list[WordTiming]:
    """The words whose span (seconds from the stream start) has a speech window within ``pad_ms``:
    ``speech`` (windows,) bool, window i covering ``offset_s + [i, i+1) * 32 ms``."""
    if not words:
        return words
    idx = torch.nonzero(speech).flatten()
    if idx.numel() == 0:
        return []
    starts = idx.double() * WINDOW_S + offset_s
    pad = pad_ms / 1000
    return [w for w in words if bool(((starts <= w.end_s + pad) & (starts + WINDOW_S >= w.start_s - pad)).any())]


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
