"""The batch job's inputs and outputs on disk: discovering inputs, their output names, the
JSON-lines records and the per-input ``.txt`` / ``.srt`` files (``pipeline.batch.job`` runs the job)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from workers.audio.reader import RAW_SUFFIXES
from workers.data.corpus import AUDIO_SUFFIXES, read_manifest
from workers.decoding.decoder import WordTiming

TRANSCRIPTS_NAME = "transcripts.jsonl"
PARTIAL_NAME = "transcripts.jsonl.partial"  # lines of finished batches of a run in progress
FORMATS = ("txt", "srt", "json")  # json: the record, as its line in transcripts.jsonl
SRT_MAX_WORDS = 10  # words per subtitle cue
RAW_BYTES_PER_SECOND = 2 * 16000  # duration estimate for headerless PCM (16-bit, 16 kHz)


@dataclass(frozen=True)
class InputFile:
    """One audio input: absolute path, path relative to its source root (for mirrored
    outputs), and a duration estimate in seconds from the header (0 when unknown), used
    only to group similar lengths into a batch."""

    path: str
    rel: str
    duration_s: float
    out_rel: str = ""  # where its .txt/.srt go under OUT, without the format suffix (set by collect_inputs)


# --------------------------------------------------------------------------- inputs


def probe_duration_s(path: Path) -> float:
    """Duration in seconds from the file header (size for raw PCM); 0.0 when unreadable."""
    try:
        if path.suffix.lower() in RAW_SUFFIXES:
            return path.stat().st_size / RAW_BYTES_PER_SECOND
        return float(sf.info(str(path)).duration)
    except (OSError, RuntimeError, sf.LibsndfileError):
        return 0.0


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, or, outside it, the absolute path without its anchor."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.relative_to(path.anchor).as_posix()


def discover_inputs(source: str | Path) -> list[InputFile]:
    """Expand one INPUT: an audio file, a directory (recursive) or a ``.jsonl`` manifest.

    Raises ``FileNotFoundError`` when ``source`` does not exist and ``ValueError`` for a
    bad manifest line (naming file and line).
    """
    source = Path(source).absolute()
    if source.is_dir():
        # broken symbolic links included: they must get an error record, not vanish
        files = sorted(p for p in source.rglob("*") if (p.is_file() or p.is_symlink()) and p.suffix.lower() in AUDIO_SUFFIXES)
        return [InputFile(str(p), _relative(p, source), probe_duration_s(p)) for p in files]
    if source.is_file() and source.suffix.lower() == ".jsonl":
        out = []
        for utt in read_manifest(source):
            p = Path(utt.audio).absolute()
            out.append(InputFile(str(p), _relative(p, source.parent), utt.duration_s or probe_duration_s(p)))
        return out
    if source.is_file():
        return [InputFile(str(source), source.name, probe_duration_s(source))]
    raise FileNotFoundError(f"{source}: no such file, directory or manifest")


def collect_inputs(sources: str | Path | Iterable[str | Path]) -> list[InputFile]:
    """Expand every source; an audio file listed twice is kept once (the first time).

    Output names drop the audio suffix (``a.wav`` -> ``a.txt``) unless two inputs would then
    share one (``a.flac`` and ``a.mp3``): those keep it (``a.flac.txt``, ``a.mp3.txt``).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    seen: dict[str, InputFile] = {}
    for source in sources:
        for item in discover_inputs(source):
            seen.setdefault(item.path, item)
    stems = Counter(str(Path(item.rel).with_suffix("")) for item in seen.values())
    out = []
    for item in seen.values():
        stem = str(Path(item.rel).with_suffix(""))
        out.append(dataclasses.replace(item, out_rel=stem if stems[stem] == 1 else item.rel))
    return out


# --------------------------------------------------------------------------- records


def transcript_record(path: str, text: str, duration_s: float, words: Sequence[WordTiming]) -> dict:
    """An output line for a transcribed input (times in seconds)."""
    return {
        "path": path,
        "text": text,
        "duration_s": round(duration_s, 4),
        "words": [{"word": w.word, "start_s": round(w.start_s, 4), "end_s": round(w.end_s, 4)} for w in words],
        "error": None,
    }


def error_record(path: str, reason: str) -> dict:
    """An output line for an input that could not be transcribed."""
    return {"path": path, "text": "", "duration_s": 0.0, "words": [], "error": reason}



# --------------------------------------------------------------------------- files


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_records(path: Path) -> Iterator[dict]:
    """Records of a JSONL file; an unparsable line (a crash mid-write) is ignored."""
    if not path.is_file():
        return
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "path" in row:
                yield row


def load_previous(out_dir: Path) -> dict[str, dict]:
    """Records of earlier runs by path: the final file, then the partial file of an interrupted run."""
    rows: dict[str, dict] = {}
    for name in (TRANSCRIPTS_NAME, PARTIAL_NAME):
        for row in read_records(out_dir / name):
            rows[row["path"]] = row
    return rows


def _srt_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def to_srt(record: dict) -> str:
    """SubRip cues of at most ``SRT_MAX_WORDS`` words each, timed by the word timings."""
    words = record["words"]
    cues = []
    for n, start in enumerate(range(0, len(words), SRT_MAX_WORDS), 1):
        group = words[start : start + SRT_MAX_WORDS]
        text = " ".join(w["word"] for w in group)
        cues.append(f"{n}\n{_srt_time(group[0]['start_s'])} --> {_srt_time(group[-1]['end_s'])}\n{text}\n")
    return "\n".join(cues)


def format_path(out_dir: Path, out_rel: str, fmt: str) -> Path:
    """Where the ``fmt`` file of an input goes: ``InputFile.out_rel`` under OUTDIR plus ``.fmt``."""
    return out_dir / f"{out_rel}.{fmt}"


def render(record: dict, fmt: str) -> str:
    """An input's ``fmt`` file: its text and a newline (txt), SubRip cues (srt) or its record as one JSON line (json)."""
    if fmt == "json":
        return json.dumps(record) + "\n"
    return record["text"] + "\n" if fmt == "txt" else to_srt(record)


def write_formats(out_dir: Path, out_rel: str, record: dict, formats: Sequence[str], only_missing: bool = False) -> None:
    """Write the requested per-input files (nothing for an errored input)."""
    if record["error"] is not None:
        return
    for fmt in formats:
        target = format_path(out_dir, out_rel, fmt)
        if only_missing and target.exists():
            continue
        write_text_atomic(target, render(record, fmt))
