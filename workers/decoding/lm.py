"""Word n-gram language models estimated from transcripts, written as ARPA files.

No KenLM ``lmplz`` binary installs here, so the model is estimated in Python with
interpolated Kneser-Ney smoothing (one absolute discount per order, ``D = n1 / (n1 + 2 n2)``)
and written in backoff form: for every listed n-gram ``h w`` the ARPA probability is the
interpolated ``p(w | h)``, and the backoff weight of ``h`` is its interpolation weight, so
``p(. | h)`` sums to 1 over the vocabulary (all words, ``</s>`` and ``<unk>``) for every
context. ``<s>`` is never predicted (log10 probability -99), as in KenLM's output.

Also writes the other two files ``torchaudio``'s ``ctc_decoder`` reads: the lexicon
(``word<TAB>w o r d |``) and ``tokens.txt``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from workers.model.tokens import TOKEN_TO_ID, TOKENS, WORD_SEPARATOR

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
_NEVER = -99.0  # log10 probability KenLM writes for <s>, which is never predicted

NGram = tuple[str, ...]


def vocabulary(sentences: Iterable[str]) -> list[str]:
    """Sorted distinct words of normalised (lower-case, single-spaced) sentences."""
    return sorted({word for sentence in sentences for word in sentence.split()})


def write_tokens(path: str | Path) -> Path:
    """Write ``tokens.txt``: ``workers.model.tokens.TOKENS``, one per line, in output-layer order."""
    path = Path(path)
    path.write_text("".join(f"{token}\n" for token in TOKENS), encoding="utf-8")
    return path


def write_lexicon(words: Iterable[str], path: str | Path) -> Path:
    """Write a flashlight lexicon: one ``word<TAB>w o r d |`` line per distinct word.

    Each spelling ends in the word separator, so the decoder closes a word when the
    model emits ``|``. The model never emits one after the last word of an utterance,
    which is why ``workers.decoding.decoder`` appends one separator frame before finishing.
    """
    lines = []
    for word in sorted(set(words)):
        bad = sorted({c for c in word if c not in TOKEN_TO_ID or c == WORD_SEPARATOR})
        if not word or bad:
            raise ValueError(f"cannot spell word {word!r} with the token set (bad: {bad!r})")
        lines.append(f"{word}\t{' '.join(word)} {WORD_SEPARATOR}\n")
    path = Path(path)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def build_arpa(sentences: Iterable[str], order: int = 3, *, path: str | Path, vocabulary: Iterable[str] = ()) -> Path:
    """Estimate an interpolated Kneser-Ney word ``order``-gram model and write it as ARPA.

    ``sentences`` are normalised text (lower-case, single spaces); empty ones are
    skipped. ``vocabulary``: more words the model predicts though no sentence has them (a
    dictionary): each gets the unigram floor, the share of the uniform distribution that
    Kneser-Ney's unigram level interpolates with (``gamma / |V|``, as ``<unk>`` has). Raises
    ``ValueError`` for ``order < 1`` or when no sentence has a word.
    """
    if order < 1:
        raise ValueError(f"lm order must be >= 1, got {order}")
    counts = _count_ngrams([s.split() for s in sentences], order)
    if not counts[1]:
        raise ValueError("cannot build a language model from no words")
    probs, backoffs = _kneser_ney(counts, order, vocabulary)
    return _write_arpa(probs, backoffs, order, Path(path))


def _count_ngrams(sentences: list[list[str]], order: int) -> list[Counter[NGram]]:
    """Raw n-gram counts per order (index 1..order) over ``<s> w1 .. wn </s>``."""
    counts: list[Counter[NGram]] = [Counter() for _ in range(order + 1)]
    for words in sentences:
        if not words:
            continue
        padded = (BOS, *words, EOS)
        for n in range(1, order + 1):
            for i in range(len(padded) - n + 1):
                counts[n][padded[i : i + n]] += 1
    return counts


def _adjusted_counts(counts: list[Counter[NGram]], order: int) -> list[Counter[NGram]]:
    """Kneser-Ney counts: raw at the top order and for n-grams starting with ``<s>``
    (they have no left context), else the number of distinct words seen to the left."""
    adjusted: list[Counter[NGram]] = [Counter() for _ in range(order + 1)]
    adjusted[order] = Counter(counts[order])
    for n in range(1, order):
        for gram, count in counts[n].items():
            if gram[0] == BOS:
                adjusted[n][gram] = count
        for gram in counts[n + 1]:
            adjusted[n][gram[1:]] += 1
    return adjusted


def _discount(adjusted: Counter[NGram]) -> float:
    """Absolute discount ``n1 / (n1 + 2 n2)`` (Ney et al.); 0.5 when it is undefined."""
    n1 = sum(1 for c in adjusted.values() if c == 1)
    n2 = sum(1 for c in adjusted.values() if c == 2)
    if n1 == 0 or n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.1), 0.9)


def _kneser_ney(counts: list[Counter[NGram]], order: int,
                vocabulary: Iterable[str] = ()) -> tuple[list[dict[NGram, float]], dict[NGram, float]]:
    """Interpolated probabilities of every seen n-gram, and each context's backoff weight.

    ``p(w | h) = (a(hw) - D) / a(h.) + gamma(h) p(w | h[1:])`` with
    ``gamma(h) = D * |{w: a(hw) > 0}| / a(h.)``; the unigram level interpolates with the
    uniform distribution over the predicted vocabulary. Returns natural probabilities.
    """
    adjusted = _adjusted_counts(counts, order)
    adjusted[1].pop((BOS,), None)  # never predicted
    adjusted[1].setdefault((UNK,), 0)
    for word in vocabulary:
        adjusted[1].setdefault((word,), 0)
    probs: list[dict[NGram, float]] = [{} for _ in range(order + 1)]
    backoffs: dict[NGram, float] = {}
    for n in range(1, order + 1):
        discount = _discount(adjusted[n])
        totals: dict[NGram, int] = defaultdict(int)
        types: dict[NGram, int] = defaultdict(int)
        for gram, count in adjusted[n].items():
            totals[gram[:-1]] += count
            types[gram[:-1]] += count > 0
        gammas = {h: discount * types[h] / totals[h] for h in totals}
        for gram, count in adjusted[n].items():
            lower = 1.0 / len(adjusted[1]) if n == 1 else probs[n - 1][gram[1:]]
            context = gram[:-1]
            own = max(count - discount, 0.0) / totals[context]
            probs[n][gram] = own + gammas[context] * lower
        if n > 1:
            backoffs.update(gammas)
    return probs, backoffs


def _write_arpa(probs: list[dict[NGram, float]], backoffs: dict[NGram, float], order: int, path: Path) -> Path:
    """Write log10 probabilities and backoff weights in ARPA text format."""
    unigrams = {(BOS,): 0.0, **probs[1]}
    tables = [unigrams, *probs[2:]]
    lines = ["", "\\data\\"]
    lines += [f"ngram {n}={len(table)}" for n, table in enumerate(tables, start=1)]
    for n, table in enumerate(tables, start=1):
        lines += ["", f"\\{n}-grams:"]
        for gram in sorted(table):
            logp = _NEVER if gram == (BOS,) else math.log10(table[gram])
            line = f"{logp:.7f}\t{' '.join(gram)}"
            if n < order and gram in backoffs:
                line += f"\t{math.log10(backoffs[gram]):.7f}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
