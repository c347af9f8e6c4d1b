"""The recognition stages as plain Python classes (audio in, MFCC, BiLSTM-CTC, CTC decoding),
in a folder per concern: ``audio``, ``features``, ``model``, ``decoding``, ``data``,
``training``; ``recognizer`` is the in-process recogniser every mode must equal.

This package never imports ``ray`` or ``pipeline`` (``tests/unit/pipeline/test_layering.py``).
The names a Python user needs are here, loaded on first use (importing ``workers`` loads no
torch, so the torch-free Ray actors can import its modules)::

    from workers import Recognizer, StreamingRecognizer
    Recognizer().transcribe_file("a.wav").text
    rec = StreamingRecognizer(endpoint_silence_ms=800)
    results = rec.push(samples, 16000) + rec.finish()
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Recognizer": "workers.recognizer",
    "StreamingRecognizer": "workers.recognizer",
    "Transcript": "workers.recognizer",
    "RecognitionResult": "workers.decoding.stage",
    "StreamOptions": "workers.decoding.stage",
    "DecoderConfig": "workers.decoding.decoder",
    "VadConfig": "workers.audio.vad_gate",
    "AudioError": "workers.audio.checks",
    "load_bundle": "workers.model.bundle",
    "read_corpus": "workers.data.corpus",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
