"""flashlight-text's CTC beam search, used directly on numpy arrays (no torch).

This does what torchaudio's ``ctc_decoder(...)`` and ``CTCDecoder`` (a thin wrapper over
flashlight-text) did for ``workers.decoding.decoder``, step for step, so the hypotheses, scores and
timesteps are the same bit for bit:

- ``SearchModels``: the token dictionary (``tokens.txt`` or the token list), the word
  dictionary (from the lexicon; with a character LM and no lexicon, ``tokens.txt`` in LM
  order), the LM (KenLM from an ARPA file, else flashlight's ``ZeroLM``) and the lexicon,
  loaded once per decoder and shared by every stream's search;
- ``BeamSearch``: one stream's flashlight search: the lexicon trie (each spelling scored
  by the LM's unigram score of its word, smeared with ``SmearingMode.MAX``) and a
  ``LexiconDecoder``, or a ``LexiconFreeDecoder`` without a lexicon; emissions go to
  ``decode_step`` as a pointer to C-contiguous float32 (frames, num_tokens) memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
from flashlight.lib.text.decoder import (
    CriterionType,
    LexiconDecoder,
    LexiconDecoderOptions,
    LexiconFreeDecoder,
    LexiconFreeDecoderOptions,
    SmearingMode,
    Trie,
    ZeroLM,
)
from flashlight.lib.text.decoder.kenlm import KenLM
from flashlight.lib.text.dictionary import Dictionary, create_word_dict, load_words


@dataclass
class SearchSettings:
    """flashlight's beam-search settings (natural-log scores; ``word_score`` and ``unk_score``
    apply to lexicon search only)."""

    beam_size: int
    beam_size_token: int
    beam_threshold: float
    lm_weight: float
    word_score: float
    unk_score: float
    sil_score: float


@dataclass
class SearchModels:
    """What every search of one decoder shares; see ``load_search_models``."""

    tokens_dict: Dictionary
    word_dict: Dictionary | None  # None: lexicon-free without an LM
    lm: Any  # KenLM or ZeroLM
    trie: Trie | None  # the lexicon's spellings, shared by every search (read-only); None: lexicon-free
    options: LexiconDecoderOptions | LexiconFreeDecoderOptions
    blank: int  # index of the blank token in tokens_dict
    silence: int  # index of the word separator
    unk_word: str

    @property
    def lexicon(self) -> bool:
        """Whether the search spells lexicon words only."""
        return self.trie is not None


def load_search_models(
    settings: SearchSettings,
    tokens: str | Path | list[str],
    blank_token: str,
    sil_token: str,
    unk_word: str,
    lexicon_path: str | Path | None = None,
    lm_path: str | Path | None = None,
    lm_dict_path: str | Path | None = None,
) -> SearchModels:
    """Load the dictionaries, lexicon and LM as ``torchaudio.models.decoder.ctc_decoder`` does.

    ``tokens``: a ``tokens.txt`` path or the token list; ``lm_path``: an ARPA (or KenLM
    binary) file; ``lm_dict_path``: the LM's word list in LM index order (for a character LM
    without a lexicon: ``tokens.txt``); without it the lexicon's words are the LM's."""
    tokens_dict = Dictionary(tokens if isinstance(tokens, list) else str(tokens))
    lexicon = load_words(str(lexicon_path)) if lexicon_path else None
    common = dict(
        beam_size=settings.beam_size,
        beam_size_token=settings.beam_size_token,
        beam_threshold=settings.beam_threshold,
        lm_weight=settings.lm_weight,
        sil_score=settings.sil_score,
        log_add=False,
        criterion_type=CriterionType.CTC,
    )
    if lexicon:
        options = LexiconDecoderOptions(word_score=settings.word_score, unk_score=settings.unk_score, **common)
    else:
        options = LexiconFreeDecoderOptions(**common)
    word_dict = None  # lexicon-free without an LM needs none
    if lm_dict_path is not None:
        word_dict = Dictionary(str(lm_dict_path))
    elif lexicon:
        word_dict = create_word_dict(lexicon)
    elif lm_path is not None:
        raise ValueError("an LM without a lexicon needs lm_dict_path (its word list in LM order, e.g. tokens.txt)")
    lm = KenLM(str(lm_path), word_dict) if lm_path is not None else ZeroLM()
    silence = tokens_dict.get_index(sil_token)
    # Built once here, not per search: for a 125,000-word English lexicon it takes about 1 s and 95 MB,
    # and the Python lexicon (about 100 MB for those words) is not kept once it is built.
    trie = _trie(lexicon, tokens_dict, word_dict, lm, silence) if lexicon else None
    return SearchModels(tokens_dict, word_dict, lm, trie, options, tokens_dict.get_index(blank_token), silence, unk_word)


def _trie(lexicon: dict[str, list[list[str]]], tokens_dict: Dictionary, word_dict: Dictionary, lm: Any, silence: int) -> Trie:
    """The lexicon's spellings as a token trie, each word scored by the LM from its start state."""
    trie = Trie(tokens_dict.index_size(), silence)
    start_state = lm.start(False)
    for word, spellings in lexicon.items():
        word_idx = word_dict.get_index(word)
        _, score = lm.score(start_state, word_idx)
        for spelling in spellings:
            trie.insert([tokens_dict.get_index(token) for token in spelling], word_idx, score)
    trie.smear(SmearingMode.MAX)
    return trie


class BeamSearch:
    """One stream's flashlight search: ``begin``, ``step`` (frames, num_tokens) float32 log-probs,
    ``end``; ``results()`` gives flashlight's raw hypotheses (unsorted before ``end``), and
    ``token_path`` one of them as collapsed tokens and their first frames."""

    def __init__(self, models: SearchModels) -> None:
        self.models = models  # holds the LM: flashlight keeps only a reference (pytorch/audio#3218)
        if models.trie is not None:
            unk = models.word_dict.get_index(models.unk_word)
            self.decoder = LexiconDecoder(models.options, models.trie, models.lm, models.silence, models.blank, unk, [], False)
        else:
            self.decoder = LexiconFreeDecoder(models.options, models.lm, models.silence, models.blank, [])

    def begin(self) -> None:
        self.decoder.decode_begin()

    def step(self, emissions: np.ndarray) -> None:
        """Feed (frames, num_tokens) log-probs: float32, C-contiguous (read in place by flashlight)."""
        if emissions.dtype != np.float32 or emissions.ndim != 2 or not emissions.flags.c_contiguous:
            raise ValueError(f"emissions must be C-contiguous float32 (frames, tokens), got {emissions.dtype} {emissions.shape}")
        frames, tokens = emissions.shape
        self.decoder.decode_step(emissions.ctypes.data, frames, tokens)

    def end(self) -> None:
        self.decoder.decode_end()

    def results(self) -> list:
        """flashlight's ``DecodeResult``s: ``score``, ``tokens`` (one per frame, from the start state)."""
        return self.decoder.get_all_final_hypothesis()

    def token_path(self, result: Any) -> tuple[list[int], list[int]]:
        """A result's tokens with repeats collapsed and blanks dropped, and the emission frame
        where each begins. flashlight's ``tokens`` start with the start state (index 0, a
        separator), which is no emission frame and is dropped, so frame = index - 1."""
        tokens, blank = list(result.tokens), self.models.blank
        ids = [token for token, _ in groupby(tokens) if token != blank]
        starts = [i for i, token in enumerate(tokens) if token != blank and (i == 0 or token != tokens[i - 1])]
        pairs = [(token, start - 1) for token, start in zip(ids, starts, strict=True) if start >= 1]
        return [t for t, _ in pairs], [f for _, f in pairs]
