"""The character inventory of the CTC output layer.

Index 0 is the CTC blank (``-``), index 1 the word separator (``|``, a space in text),
then the apostrophe and the letters a-z: 29 tokens. ``tokens.txt`` in a model bundle
lists them one per line in this order, which is also what torchaudio's ``ctc_decoder``
expects.
"""

from __future__ import annotations

import re

BLANK = "-"
WORD_SEPARATOR = "|"
TOKENS: tuple[str, ...] = (BLANK, WORD_SEPARATOR, "'", *"abcdefghijklmnopqrstuvwxyz")
BLANK_ID = 0
SEPARATOR_ID = 1
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}

_ALLOWED = re.compile(r"[^a-z' ]")
_SPACES = re.compile(r"\s+")


class TextNormalizationError(ValueError):
    """A transcript holds characters the model cannot write (e.g. digits)."""


def normalize_text(text: str) -> str:
    """Lower-case, map hyphens/underscores to spaces, squeeze whitespace.

    Raises ``TextNormalizationError`` when characters outside a-z, apostrophe and
    space remain (digits, for instance, are not silently dropped).
    """
    lowered = text.lower().replace("-", " ").replace("_", " ")
    lowered = _SPACES.sub(" ", lowered).strip()
    bad = sorted(set(_ALLOWED.findall(lowered)))
    if bad:
        raise TextNormalizationError(f"unsupported characters {bad!r} in transcript {text!r}")
    return lowered


def encode(text: str) -> list[int]:
    """Normalised text -> token ids (spaces become the word separator)."""
    return [TOKEN_TO_ID[WORD_SEPARATOR if c == " " else c] for c in normalize_text(text)]


def decode_ids(ids: list[int]) -> str:
    """Token ids (already collapsed, blanks removed) -> text with single spaces."""
    chars = [" " if TOKENS[i] == WORD_SEPARATOR else TOKENS[i] for i in ids if i != BLANK_ID]
    return _SPACES.sub(" ", "".join(chars)).strip()
