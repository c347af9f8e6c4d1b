"""The batch job's three stages, over one planned batch of files at a time.

    analyse   read + decode + resample + MFCC + voice activity  (CPU: Ray Data tasks over all cores)
    acoustic  BiLSTM-CTC forward pass over the whole batch      (actor pool: the GPUs, or CPU actors)
    decode    CTC search (greedy, or beam + lexicon + LM), word gating, records   (CPU actor pool)

Each is a plain function of a ``Recognizer`` (``analyse_paths``, ``acoustic_items``,
``decode_items``), so the in-process run (``transcribe_batch``) and the Ray Data operators
(``analyse_rows``, ``AcousticRows``, ``DecodeRows``) run the same code on the same batches and
give the same records. Between stages a batch travels as a list of ``BatchItem``, pickled into
one row.

A file longer than ``vad.max_segment_s`` is not analysed up front: the acoustic stage reads it
piece by piece and recognises it whole (``Recognizer.transcribe_reader``), so no row and no
worker holds more than a bounded amount of it. Every failure costs one input: an unreadable
file, or one whose features break the model or the search, gets an error record and the rest of
its batch goes on.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.batch.files import error_record, transcript_record
from workers.audio.reader import RAW_SUFFIXES, AudioError, AudioReader, RawFormat
from workers.recognizer import Recognizer


@dataclass
class BatchItem:
    """One input on its way through the stages.

    ``features``: (frames, feature_dim) float32 after ``analyse``; ``speech``: (windows,) bool
    voice activity (None without detection); ``emission``: (frames', num_tokens) float32 CTC
    log-probs after ``acoustic``; ``record``: set as soon as the input's line is known (an error,
    or a long file recognised in pieces); ``long``: to be recognised in pieces by the acoustic
    stage; ``stage_s``: wall seconds the stages spent on it (its share of each batch call)."""

    path: str
    features: np.ndarray | None = None
    speech: np.ndarray | None = None
    emission: np.ndarray | None = None
    duration_s: float = 0.0
    record: dict | None = None
    long: bool = False
    stage_s: float = 0.0


def _failure(path: str, exc: Exception) -> dict:
    """The error record of an input: the reader's reason, or the exception (a bug or odd file)."""
    return error_record(path, exc.reason if isinstance(exc, AudioError) else f"{type(exc).__name__}: {exc}")


def _share_time(items: Sequence[BatchItem], t0: float) -> None:
    """Add the seconds since ``t0`` to the items' ``stage_s``, in equal shares."""
    share = (time.perf_counter() - t0) / max(1, len(items))
    for item in items:
        item.stage_s += share


def _open(rec: Recognizer, path: str, raw_format: RawFormat | None) -> AudioReader:
    """``path`` opened for reading at the model rate (header only); ``raw_format`` applies to headerless raw PCM files."""
    return rec.open(path, raw_format if Path(path).suffix.lower() in RAW_SUFFIXES else None)


def _each_or_all(fn: Callable[[list], list], inputs: list) -> list:
    """``fn`` over all ``inputs`` at once (one batch); if that raises, over each input alone, an
    exception becoming that input's result."""
    if not inputs:
        return []
    try:
        return fn(inputs)
    except Exception:  # find the input that broke the batch; the others still get through
        pass
    results = []
    for x in inputs:
        try:
            results.append(fn([x])[0])
        except Exception as exc:
            results.append(exc)
    return results


def analyse_paths(rec: Recognizer, paths: Sequence[str], raw_format: RawFormat | None = None) -> list[BatchItem]:
    """Read each file at the model rate; features and voice activity of the short ones (the
    detector runs over all of them in one batch); long ones are marked ``long``."""
    t0 = time.perf_counter()
    items = [BatchItem(str(p)) for p in paths]
    readable: list[tuple[BatchItem, torch.Tensor]] = []
    for item in items:
        try:
            with _open(rec, item.path, raw_format) as reader:  # reads the header only
                if rec.is_long(reader.num_samples):
                    item.long = True
                else:
                    readable.append((item, reader.read(0, reader.num_samples)))
        except Exception as exc:  # unreadable input (AudioError names the reason), or a bug: this input only
            item.record = _failure(item.path, exc)
    frame_s = rec.bundle.features.frame_ms / 1000
    for (item, _), result in zip(readable, _each_or_all(rec.analyse_many, [wave for _, wave in readable])):
        if isinstance(result, Exception):
            item.record = _failure(item.path, result)
            continue
        feats, speech = result
        item.features = feats.numpy()
        item.speech = None if speech is None else speech.numpy()
        item.duration_s = len(feats) * frame_s
    _share_time(items, t0)
    return items


def acoustic_items(rec: Recognizer, items: list[BatchItem], raw_format: RawFormat | None = None) -> list[BatchItem]:
    """The acoustic model over every analysed item in one forward pass (features -> emission);
    a long item is read and recognised piece by piece here (its record set)."""
    t0 = time.perf_counter()
    ready = [item for item in items if item.features is not None]
    results = _each_or_all(rec.emissions, [torch.from_numpy(item.features) for item in ready])
    for item, result in zip(ready, results):
        if isinstance(result, Exception):
            item.record = _failure(item.path, result)
        else:
            item.emission = result.numpy()
        item.features = None  # not needed downstream: keep the row small
    for item in items:
        if item.long and item.record is None:
            try:
                with _open(rec, item.path, raw_format) as reader:
                    t = rec.transcribe_reader(reader)
                item.record = transcript_record(item.path, t.text, t.duration_s, t.words)
            except Exception as exc:
                item.record = _failure(item.path, exc)
    _share_time(items, t0)
    return items


def decode_items(rec: Recognizer, items: list[BatchItem]) -> list[dict]:
    """Each item's record: its emission searched (greedy or beam + LM) and its words gated by
    its voice activity, or the record an earlier stage set."""
    t0 = time.perf_counter()
    records = []
    for item in items:
        if item.record is None:
            try:
                speech = None if item.speech is None else torch.from_numpy(item.speech)
                text, words = rec.decode(torch.from_numpy(item.emission), speech)
                item.record = transcript_record(item.path, text, item.duration_s, words)
            except Exception as exc:  # one input that breaks the search must not lose the others
                item.record = _failure(item.path, exc)
        records.append(item.record)
    _share_time(items, t0)
    return records


def transcribe_batch(rec: Recognizer, paths: Sequence[str], raw_format: RawFormat | None = None) -> list[dict]:
    """The three stages in this process: one record per path, in order (unreadable inputs give error records)."""
    return decode_items(rec, acoustic_items(rec, analyse_paths(rec, paths, raw_format), raw_format))


# --------------------------------------------------------------------------- Ray Data operators
# Rows: {"paths": json list} -> analyse -> {"items": pickled [BatchItem]} -> acoustic -> the same
# -> decode -> one row per input {"path", "record" (json line), "actor_s"}.


def pack(items: list[BatchItem]) -> np.ndarray:
    """A batch's items as one row's value (an object array holding their pickle)."""
    return np.array([pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)], dtype=object)


def unpack(batch: dict[str, np.ndarray]) -> list[BatchItem]:
    """The items of every row of a batch of rows, in order."""
    return [item for blob in batch["items"] for item in pickle.loads(blob)]


_RECOGNIZERS: dict[bytes, Recognizer] = {}  # per worker process: the analysis tasks' recogniser, built once


def _recognizer(kwargs: dict) -> Recognizer:
    """A ``Recognizer`` for these keyword arguments, built once per process (Ray reuses a task's
    worker process for later tasks, so the model and the detector load once, not per batch)."""
    key = pickle.dumps(sorted(kwargs.items()))
    if key not in _RECOGNIZERS:
        _RECOGNIZERS.clear()
        _RECOGNIZERS[key] = Recognizer(**kwargs)
    return _RECOGNIZERS[key]


def analyse_rows(batch: dict[str, np.ndarray], recognizer_kwargs: dict, raw_format: RawFormat | None = None) -> dict[str, np.ndarray]:
    """Ray Data task: rows ``{"paths": json list}`` -> one row ``{"items": ...}`` (``analyse_paths``)."""
    paths = [str(p) for row in batch["paths"] for p in json.loads(row)]
    return {"items": pack(analyse_paths(_recognizer(recognizer_kwargs), paths, raw_format))}


class AcousticRows:
    """Ray Data actor (one per GPU share, or CPU actors): ``{"items"}`` -> the same with emissions."""

    def __init__(self, recognizer_kwargs: dict, raw_format: RawFormat | None = None) -> None:
        self.recognizer = Recognizer(**recognizer_kwargs)
        self.raw_format = raw_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"items": pack(acoustic_items(self.recognizer, unpack(batch), self.raw_format))}


class DecodeRows:
    """Ray Data actor (CPU): ``{"items"}`` -> one row per input ``{"path", "record", "actor_s"}``
    (``actor_s``: the seconds all stages spent on that input)."""

    def __init__(self, recognizer_kwargs: dict) -> None:
        self.recognizer = Recognizer(**recognizer_kwargs)
        _ = self.recognizer.decoder  # load the lexicon and LM now: a bad one fails the actor, not each input

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = unpack(batch)
        records = decode_items(self.recognizer, items)
        return {
            "path": np.array([item.path for item in items], dtype=object),
            "record": np.array([json.dumps(r) for r in records], dtype=object),
            "actor_s": np.array([item.stage_s for item in items], dtype=float),
        }
