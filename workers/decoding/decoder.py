"""CTC decoding of log-probability emissions: greedy, or beam search with lexicon and LM.

Emissions are float32 arrays of shape ``(frames, len(TOKENS))`` (29 columns, in
``workers.model.tokens.TOKENS`` order) holding per-frame log-probabilities, numpy arrays or torch
tensors (converted by ``check_emissions``; this module never imports torch, so the Ray
decoder actors run without it); one frame lasts ``frame_ms`` milliseconds. Beam search is
flashlight-text's, used directly (``workers.decoding.ctc_search``, equal to torchaudio's
``ctc_decoder`` wrapper): with a lexicon it only spells lexicon words and can use a word
ARPA LM; without one it is lexicon-free and can use a character LM whose vocabulary is
``tokens.txt``.

Streaming: ``begin()`` gives a state, ``step(state, chunk)`` feeds frames and returns the
partial hypothesis, ``end(state)`` the final one, equal to ``decode`` on the joined
chunks; ``end_nbest(state, n)`` finishes a stream with up to ``n`` distinct final
hypotheses instead. A flashlight decoder holds the search of one stream, so every state
(and every offline ``decode``) gets its own, built from a language model and dictionaries
loaded once per ``CtcDecoder``: many streams can be decoded side by side.

``word_confidences`` scores recognised words against the emissions they came from;
``normalize_phrases`` checks a restricted vocabulary (see ``workers.recognizer.phrase_decoder``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.decoding.ctc_search import BeamSearch, SearchModels, SearchSettings, load_search_models
from workers.model.tokens import BLANK, BLANK_ID, SEPARATOR_ID, TOKEN_TO_ID, TOKENS, WORD_SEPARATOR

NUM_TOKENS = len(TOKENS)
UNK_WORD = "<unk>"
# Log-probability of the non-separator tokens in the separator frame appended before a
# lexicon search ends. Spellings end in "|" and the model never emits one after the last
# word, so without that frame flashlight's word list drops the last word, and the best
# hypothesis can even stop inside a word (its tokens spelling no lexicon word).
_OFF = -1.0e4
#: A phrase-list entry that Vosk clients send to allow "any other word"; it is ignored here
#: (a restricted search spells list words only).
VOSK_UNK = "[unk]"


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder settings; scores are in natural-log units added to path log-probabilities."""

    kind: str = "beam"  # "greedy" or "beam"
    beam_size: int = 32  # hypotheses kept after each frame
    beam_threshold: float = 25.0  # drop hypotheses this far below the best one
    lm_weight: float = 1.0  # weight of the LM log-probability (ignored without an LM); see models/README.md
    word_score: float = 1.0  # added per word (insertion bonus); lexicon search only; see models/README.md
    unk_score: float = float("-inf")  # added per out-of-lexicon word; -inf forbids them
    sil_score: float = 0.0  # added per word separator / silence token
    # Words added to the bundle's lexicon (`--words FILE`): spelled by the search even when no
    # training text has them; an LM scores them as it scores <unk> (its unigram floor).
    extra_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.extra_words:
            if isinstance(self.extra_words, str):
                raise ValueError(f"decoder.extra_words must be a list of words, got the string {self.extra_words!r}")
            object.__setattr__(self, "extra_words", normalize_words(self.extra_words))
        else:
            object.__setattr__(self, "extra_words", ())
        if self.kind not in ("greedy", "beam"):
            raise ValueError(f"decoder.kind must be 'greedy' or 'beam', got {self.kind!r}")
        if self.beam_size < 1:
            raise ValueError(f"decoder.beam_size must be >= 1, got {self.beam_size}")
        if not self.beam_threshold > 0:
            raise ValueError(f"decoder.beam_threshold must be > 0, got {self.beam_threshold}")
        if not (0 <= self.lm_weight < math.inf):
            raise ValueError(f"decoder.lm_weight must be finite and >= 0, got {self.lm_weight}")
        for name in ("word_score", "sil_score"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"decoder.{name} must be finite, got {getattr(self, name)}")
        if math.isnan(self.unk_score) or self.unk_score == math.inf:
            raise ValueError(f"decoder.unk_score must be a number or -inf, got {self.unk_score}")


@dataclass
class WordTiming:
    """One recognised word and its time span in seconds from the start of the stream;
    ``conf``: its confidence in [0, 1] (``word_confidences``), None where not computed."""

    word: str
    start_s: float
    end_s: float
    conf: float | None = None


@dataclass
class Hypothesis:
    """A decoding result: text (words joined by single spaces), word timings, and score
    (greedy: best-path log-probability; beam: flashlight's total search score)."""

    text: str
    words: list[WordTiming]
    score: float


@dataclass
class Alternative:
    """One of the n best distinct transcripts of an utterance. ``confidence``: the softmax of
    the returned hypotheses' total search scores (natural-log units) over the returned list,
    so the alternatives' confidences sum to 1 and come sorted descending."""

    text: str
    words: list[WordTiming]
    confidence: float


def alternative_confidences(scores: list[float]) -> list[float]:
    """Softmax of search scores (see ``Alternative``); -inf scores get 0 (all -inf: uniform)."""
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return [1.0 / len(scores)] * len(scores) if scores else []
    top = max(finite)
    weights = [math.exp(s - top) if math.isfinite(s) else 0.0 for s in scores]
    total = math.fsum(weights)
    return [w / total for w in weights]


@dataclass
class StreamState:
    """One stream's decoding state; create with ``CtcDecoder.begin()``."""

    frames: int = 0  # emission frames fed so far
    best_ids: list[int] = field(default_factory=list)  # greedy: argmax token per frame
    best_logprobs: list[float] = field(default_factory=list)  # greedy: max log-prob per frame
    search: BeamSearch | None = None  # beam: this stream's own flashlight search
    finished: bool = False


def check_emissions(emissions: Any) -> np.ndarray:
    """Validate ``(frames, 29)`` log-probs, a numpy array or a torch tensor (any device, dtype or
    grad: duck-typed, no torch import); return a C-contiguous float32 numpy copy or view."""
    if hasattr(emissions, "detach"):
        emissions = emissions.detach().cpu().float().numpy()
    emissions = np.asarray(emissions)
    if emissions.ndim != 2 or emissions.shape[1] != NUM_TOKENS:
        raise ValueError(f"emissions must have shape (frames, {NUM_TOKENS}), got {tuple(emissions.shape)}")
    return np.ascontiguousarray(emissions, dtype=np.float32)


def word_confidences(log_probs: Any, words: list[WordTiming], frame_ms: float, offset_s: float = 0.0) -> list[float]:
    """Confidence in [0, 1] of each word, from the CTC posteriors of its frames.

    ``log_probs``: ``(frames, 29)`` log-probabilities; a word's times are seconds from
    ``offset_s`` before frame 0 (frame ``f`` covers ``offset_s + [f, f + 1) * frame_ms``).
    The word's frame span runs from its start frame to its end frame (the frame before
    ``end_s``), inclusive, widened by one frame on each side and clipped to the emissions.
    For each letter of the word, take the highest posterior probability that letter's token
    reaches within the span; the word's confidence is the geometric mean of those over its
    letters. A word with no frame in the emissions, or no letter of the token set, gets 0.
    """
    emissions = check_emissions(log_probs)
    n = emissions.shape[0]
    out: list[float] = []
    for w in words:
        ids = [TOKEN_TO_ID[c] for c in w.word if c in TOKEN_TO_ID and TOKEN_TO_ID[c] > SEPARATOR_ID]
        start = int(round((w.start_s - offset_s) * 1000 / frame_ms))
        end = int(round((w.end_s - offset_s) * 1000 / frame_ms)) - 1  # inclusive
        first, last = start - 1, end + 1  # widened by a frame each side
        first, last = max(first, 0), min(last, n - 1)
        if not ids or first > last:
            out.append(0.0)
            continue
        best = emissions[first : last + 1, ids].max(axis=0)  # (letters,) log-probs
        out.append(min(1.0, max(0.0, math.exp(float(best.astype(np.float64).mean())))))
    return out


def normalize_words(words: Iterable[str]) -> tuple[str, ...]:
    """The distinct words of ``words`` (each may hold several), checked as ``normalize_phrases`` checks them, in order."""
    return tuple(dict.fromkeys(w for phrase in normalize_phrases(words) for w in phrase.split()))


def normalize_phrases(phrases: Iterable[str]) -> tuple[str, ...]:
    """Phrases of a restricted vocabulary, checked: each lower-cased with its whitespace
    squeezed; the Vosk token ``[unk]`` is dropped wherever it appears (ignored: a restricted
    search never produces out-of-list words); empty and repeated phrases dropped, order kept.

    Raises ``ValueError`` naming the word and its characters outside the model's tokens
    (letters a-z and the apostrophe), and when no phrase is left.
    """
    if isinstance(phrases, str):
        raise ValueError(f"phrases must be a list of strings, got the string {phrases!r}")
    out: dict[str, None] = {}
    for phrase in phrases:
        if not isinstance(phrase, str):
            raise ValueError(f"phrases must be strings, got {phrase!r}")
        words = [w for w in phrase.lower().split() if w != VOSK_UNK]
        for word in words:
            bad = sorted({c for c in word if c not in TOKEN_TO_ID or TOKEN_TO_ID[c] <= SEPARATOR_ID})
            if bad:
                raise ValueError(f"phrase word {word!r} has characters the model cannot spell: {bad!r} (allowed: a-z and ')")
        if words:
            out[" ".join(words)] = None
    if not out:
        raise ValueError("the phrase list has no words (\"[unk]\" is ignored)")
    return tuple(out)


def _words_from_path(token_ids: list[int], first_frames: list[int], last_frames: list[int], frame_ms: float) -> list[WordTiming]:
    """Group collapsed non-blank tokens into words at separators.

    ``first_frames[i]`` / ``last_frames[i]``: first / last emission frame of token i.
    A word spans from its first letter's first frame to the end of its last letter's
    last frame.
    """
    words: list[WordTiming] = []
    letters: list[str] = []
    start = end = 0
    for token, first, last in zip(token_ids, first_frames, last_frames, strict=True):
        if token == SEPARATOR_ID:
            if letters:
                words.append(WordTiming("".join(letters), start * frame_ms / 1000, end * frame_ms / 1000))
            letters = []
            continue
        if not letters:
            start = first
        letters.append(TOKENS[token])
        end = last + 1
    if letters:
        words.append(WordTiming("".join(letters), start * frame_ms / 1000, end * frame_ms / 1000))
    return words


def _greedy_from_best(best_ids: list[int], best_logprobs: list[float], frame_ms: float) -> Hypothesis:
    """Collapse a per-frame best path (argmax ids and their log-probs) into a hypothesis."""
    token_ids: list[int] = []
    first_frames: list[int] = []
    last_frames: list[int] = []
    previous = BLANK_ID
    for frame, token in enumerate(best_ids):
        if token != BLANK_ID and token == previous:
            last_frames[-1] = frame
        elif token != BLANK_ID:
            token_ids.append(token)
            first_frames.append(frame)
            last_frames.append(frame)
        previous = token
    words = _words_from_path(token_ids, first_frames, last_frames, frame_ms)
    text = " ".join(w.word for w in words)
    return Hypothesis(text, words, math.fsum(best_logprobs))


def _best_path(emissions: np.ndarray) -> tuple[list[int], list[float]]:
    """Per frame of (frames, 29) log-probs: the best token (the first of equals) and its log-prob."""
    best_ids = emissions.argmax(axis=1)
    return best_ids.tolist(), emissions[np.arange(len(emissions)), best_ids].tolist()


def greedy_decode(emissions: Any, frame_ms: float) -> Hypothesis:
    """Best-path CTC decoding of ``(frames, 29)`` log-probs: argmax per frame, collapse
    repeats, drop blanks. Word times come from the frames of each word's letters."""
    best_ids, best_logprobs = _best_path(check_emissions(emissions))
    return _greedy_from_best(best_ids, best_logprobs, frame_ms)


class CtcDecoder:
    """Greedy or beam-search CTC decoder, offline (``decode``) and streaming
    (``begin`` / ``step`` / ``end``).

    ``lexicon_path``: flashlight lexicon (``workers.decoding.lm.write_lexicon``); ``lm_path``: ARPA
    model (``workers.decoding.lm.build_arpa``), a word LM with a lexicon or a character LM over
    ``tokens.txt`` without one (needs ``tokens_path``); ``tokens_path``: ``tokens.txt``,
    checked to match ``workers.model.tokens.TOKENS``. Paths are ignored by the greedy kind.
    """

    def __init__(
        self,
        config: DecoderConfig,
        frame_ms: float,
        lexicon_path: str | Path | None = None,
        lm_path: str | Path | None = None,
        tokens_path: str | Path | None = None,
    ) -> None:
        if not frame_ms > 0:
            raise ValueError(f"frame_ms must be > 0, got {frame_ms}")
        self.config = config
        self.frame_ms = frame_ms
        if config.kind == "beam":
            self._models = self._load_models(lexicon_path, lm_path, tokens_path)

    def _load_models(self, lexicon_path: str | Path | None, lm_path: str | Path | None, tokens_path: str | Path | None) -> SearchModels:
        """Load the LM and dictionaries once; per-stream searches share them (the KenLM model
        is only read while decoding)."""
        if tokens_path is not None:
            listed = tuple(Path(tokens_path).read_text(encoding="utf-8").split())
            if listed != TOKENS:
                raise ValueError(f"{tokens_path} lists {listed}, expected {TOKENS}")
        if lm_path is not None and lexicon_path is None and tokens_path is None:
            raise ValueError("a character LM (lm_path without lexicon_path) needs tokens_path")
        cfg = self.config
        settings = SearchSettings(cfg.beam_size, NUM_TOKENS, cfg.beam_threshold, cfg.lm_weight, cfg.word_score, cfg.unk_score, cfg.sil_score)
        return load_search_models(
            settings,
            tokens_path if tokens_path else list(TOKENS),
            BLANK,
            WORD_SEPARATOR,
            UNK_WORD,
            lexicon_path,
            lm_path,
            # A character LM's indices must follow tokens.txt, or they don't match.
            lm_dict_path=tokens_path if lm_path and not lexicon_path else None,
        )

    def decode(self, emissions: Any) -> Hypothesis:
        """Decode a whole utterance of ``(frames, 29)`` log-probs."""
        if self.config.kind == "greedy":
            return greedy_decode(emissions, self.frame_ms)
        state = self.begin()
        self._feed(state, check_emissions(emissions))
        return self.end(state)

    def begin(self) -> StreamState:
        """Start a stream; the state is this stream's alone."""
        if self.config.kind == "greedy":
            return StreamState()
        search = BeamSearch(self._models)
        search.begin()
        return StreamState(search=search)

    def step(self, state: StreamState, emissions: Any) -> Hypothesis:
        """Feed ``(frames, 29)`` more log-probs; return the partial hypothesis so far
        (for beam, its last word may be an unfinished prefix of a lexicon word)."""
        self._feed(state, check_emissions(emissions))
        if state.search is None:
            return _greedy_from_best(state.best_ids, state.best_logprobs, self.frame_ms)
        return self._best(state.search)

    def end(self, state: StreamState) -> Hypothesis:
        """Finish a stream and return its final hypothesis."""
        return self.end_nbest(state, 1)[0]

    def end_nbest(self, state: StreamState, max_alternatives: int) -> list[Hypothesis]:
        """Finish a stream and return its final hypotheses with distinct texts, best score
        first, at most ``max_alternatives`` (the greedy kind has one); the first is what
        ``end`` returns. Never empty: an empty search gives one empty hypothesis."""
        if max_alternatives < 1:
            raise ValueError(f"max_alternatives must be >= 1, got {max_alternatives}")
        if state.finished:
            raise RuntimeError("decoder stream already ended")
        state.finished = True
        if state.search is None:
            return [_greedy_from_best(state.best_ids, state.best_logprobs, self.frame_ms)]
        if self._models.lexicon:
            separator = np.full((1, NUM_TOKENS), _OFF, dtype=np.float32)
            separator[0, SEPARATOR_ID] = 0.0
            state.search.step(separator)
        state.search.end()
        if max_alternatives == 1:
            hypotheses = [self._best(state.search)]
        else:
            hypotheses = self._distinct(state.search, max_alternatives)
        state.search = None  # free the search graph
        return hypotheses

    def _feed(self, state: StreamState, emissions: np.ndarray) -> None:
        if state.finished:
            raise RuntimeError("decoder stream already ended")
        state.frames += emissions.shape[0]
        if state.search is None:
            best_ids, best_logprobs = _best_path(emissions)
            state.best_ids += best_ids
            state.best_logprobs += best_logprobs
        elif emissions.shape[0]:
            state.search.step(emissions)

    def _best(self, search: BeamSearch) -> Hypothesis:
        # Pick the best of flashlight's raw results and convert only that one: converting
        # all of them walks every path in Python at every chunk.
        results = search.results()
        if not results:
            return Hypothesis("", [], float("-inf"))
        best = max(results, key=lambda r: r.score)
        return self._from_result(search, best)

    def _distinct(self, search: BeamSearch, limit: int) -> list[Hypothesis]:
        """The best-scoring hypothesis of each distinct text, best first, at most ``limit``."""
        results = sorted(search.results(), key=lambda r: -r.score)  # stable: ties keep _best's pick
        if not results:
            return [Hypothesis("", [], float("-inf"))]
        distinct: dict[str, Hypothesis] = {}
        for result in results:  # converted one by one: the loop usually stops early
            converted = self._from_result(search, result)
            distinct.setdefault(converted.text, converted)
            if len(distinct) == limit:
                break
        return list(distinct.values())

    def _from_result(self, search: BeamSearch, result: Any) -> Hypothesis:
        """A flashlight result as a hypothesis. A letter's span is known only by its first
        frame (``BeamSearch.token_path``), so a word ends one frame after the first frame
        of its last letter."""
        token_ids, starts = search.token_path(result)
        words = _words_from_path(token_ids, starts, starts, self.frame_ms)
        return Hypothesis(" ".join(w.word for w in words), words, float(result.score))
