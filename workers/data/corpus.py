"""Corpus readers that all produce one manifest format.

A manifest is JSONL, one utterance per line:
``{"id": str, "audio": path, "duration_s": float, "text": str, "speaker": str}``.
``text`` is normalised to the model's characters (``workers.model.tokens.normalize_text``).

One rule for every layout (``Corpus.add``): an utterance whose audio file is missing, empty
(0 bytes or no samples) or unreadable, whose transcript is empty, or whose transcript has
characters outside the alphabet is skipped, and so is a transcript with no audio or audio
with no transcript. Each skip is kept in ``Corpus.skipped`` with its source and reason, and
counted by reason (``Corpus.skip_counts``); nothing is dropped silently and nothing raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from workers.audio.reader import RAW_SUFFIXES
from workers.model.tokens import TextNormalizationError, normalize_text

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".raw", ".pcm", ".mp3")
FSDD_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_AN4_LINE = re.compile(r"^(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*$")


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str
    duration_s: float
    text: str
    speaker: str


# The reasons an utterance is skipped (the first words of every skip's reason, what is counted).
MISSING_AUDIO = "audio file missing"
EMPTY_AUDIO = "audio file empty"
UNREADABLE_AUDIO = "audio not readable"
EMPTY_TRANSCRIPT = "empty transcript"
BAD_CHARACTERS = "characters outside the alphabet"
NO_TRANSCRIPT = "audio without transcript"
NO_AUDIO = "transcript without audio"
BAD_LINE = "unusable line"
SKIP_REASONS = (MISSING_AUDIO, EMPTY_AUDIO, UNREADABLE_AUDIO, EMPTY_TRANSCRIPT, BAD_CHARACTERS, NO_TRANSCRIPT, NO_AUDIO, BAD_LINE)


@dataclass
class Corpus:
    """Utterances read from a corpus, and the lines that could not be used, with reasons."""

    utterances: list[Utterance] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason); reason starts with a SKIP_REASONS entry

    def skip(self, source: str | Path, reason: str, detail: str = "") -> None:
        self.skipped.append((str(source), f"{reason} ({detail})" if detail else reason))

    def skip_counts(self) -> dict[str, int]:
        """Skipped lines per reason (``SKIP_REASONS``), only the reasons that occurred."""
        counts = {reason: sum(1 for _, r in self.skipped if r.startswith(reason)) for reason in SKIP_REASONS}
        return {reason: n for reason, n in counts.items() if n}

    def add(self, uid: str, audio: Path, text: str, speaker: str, duration_s: float | None = None, source: str | None = None) -> None:
        """Add the utterance, or skip it by the one rule (module docstring). ``duration_s``: known
        (a manifest's), else read from the file's header; ``source``: what a skip names (default the audio path)."""
        source = source or str(audio)
        try:
            clean = normalize_text(text)
        except TextNormalizationError as exc:
            self.skip(source, BAD_CHARACTERS, str(exc))
            return
        if not clean:
            self.skip(source, EMPTY_TRANSCRIPT)
            return
        if not audio.is_file():
            self.skip(source, MISSING_AUDIO, str(audio))
            return
        if audio.stat().st_size == 0:
            self.skip(source, EMPTY_AUDIO, f"{audio}: 0 bytes")
            return
        try:
            probed = _duration_s(audio)
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            self.skip(source, UNREADABLE_AUDIO, f"{audio}: {exc}")
            return
        if probed <= 0:
            self.skip(source, EMPTY_AUDIO, f"{audio}: no samples")
            return
        self.utterances.append(Utterance(uid, str(audio), round(duration_s or probed, 4), clean, speaker))


def _duration_s(path: Path) -> float:
    if path.suffix.lower() in RAW_SUFFIXES:
        return path.stat().st_size / 2 / 16000.0  # AN4 raw: 16-bit 16 kHz mono
    return sf.info(str(path)).duration


def read_an4(root: str | Path, partition: str = "train") -> Corpus:
    """CMU AN4 (``etc/an4_<partition>.transcription`` + ``.fileids``, raw big-endian PCM under ``wav/``)."""
    root = Path(root)
    corpus = Corpus()
    lines = (root / "etc" / f"an4_{partition}.transcription").read_text().splitlines()
    fileids = (root / "etc" / f"an4_{partition}.fileids").read_text().split()
    if len(lines) != len(fileids):
        raise ValueError(f"{root}: {len(lines)} transcripts but {len(fileids)} file ids")
    for line, fileid in zip(lines, fileids):
        match = _AN4_LINE.match(line.strip())
        audio = root / "wav" / f"{fileid}.raw"
        if not match or Path(fileid).name != match.group(2):
            corpus.skip(audio, BAD_LINE, f"transcript line does not match file id: {line!r}")
            continue
        corpus.add(match.group(2), audio, match.group(1), Path(fileid).parent.name)
    return corpus


def read_fsdd(root: str | Path) -> Corpus:
    """Free Spoken Digit Dataset: ``recordings/<digit>_<speaker>_<take>.wav``."""
    root = Path(root)
    rec = root / "recordings" if (root / "recordings").is_dir() else root
    corpus = Corpus()
    for audio in sorted(rec.glob("*.wav")):
        parts = audio.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) > 9:
            corpus.skip(audio, NO_TRANSCRIPT, "file name is not <digit>_<speaker>_<take>.wav")
            continue
        corpus.add(audio.stem, audio, FSDD_DIGITS[int(parts[0])], parts[1])
    return corpus


def read_librispeech(root: str | Path) -> Corpus:
    """LibriSpeech layout: ``<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` beside FLAC files."""
    corpus = Corpus()
    listed: set[Path] = set()
    for trans in sorted(Path(root).rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{uid}.flac"
            listed.add(audio)
            corpus.add(uid, audio, text, uid.split("-")[0])
    for audio in sorted(set(Path(root).rglob("*.flac")) - listed):
        corpus.skip(audio, NO_TRANSCRIPT, "in no .trans.txt")
    return corpus


def read_folder(root: str | Path) -> Corpus:
    """A folder of audio files, each with a ``.txt`` transcript of the same stem beside it."""
    root = Path(root)
    corpus = Corpus()
    audio_files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    for audio in audio_files:
        txt = audio.with_suffix(".txt")
        if not txt.is_file():
            corpus.skip(audio, NO_TRANSCRIPT, "no .txt of the same name beside it")
            continue
        corpus.add(str(audio.relative_to(root)), audio, txt.read_text(), audio.parent.name)
    stems = {a.with_suffix("") for a in audio_files}
    for txt in sorted(root.rglob("*.txt")):
        if txt.with_suffix("") not in stems:
            corpus.skip(txt, NO_AUDIO, "no audio file of the same name beside it")
    return corpus


KALDI_FILES = ("wav.scp", "text")


def is_kaldi_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in KALDI_FILES)


def _kaldi_table(path: Path) -> dict[str, tuple[str, int]]:
    """``<key> <value...>`` lines -> key -> (value, line number); ValueError naming file and line
    for a line with no value or a key seen twice."""
    table: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if key in table:
            raise ValueError(f"{path}:{n}: utterance {key!r} listed twice (first at line {table[key][1]})")
        table[key] = (value.strip(), n)
    return table


def read_kaldi(root: str | Path) -> Corpus:
    """Kaldi data directories (the layout Kaldi, ESPnet, icefall and lhotse exchange): ``root``
    itself, or each sub-directory of it that holds ``wav.scp`` and ``text`` (``train/``,
    ``test/``, ...). ``utt2spk`` gives the speakers (without it each utterance is its own).
    ``wav.scp`` paths are absolute, or relative to the data directory or to the directory
    above it (the corpus root, as speechocean762 has them); a piped command (``... |``) or a
    line with no path is a ``ValueError`` naming the file and line. An utterance with a
    transcript but no audio line, or whose audio file is missing, is skipped with the reason;
    so is one with audio but no transcript."""
    root = Path(root)
    dirs = [root] if is_kaldi_dir(root) else sorted(d for d in root.iterdir() if d.is_dir() and is_kaldi_dir(d))
    if not dirs:
        raise FileNotFoundError(f"{root}: no Kaldi data directory (wav.scp and text) here or in its sub-directories")
    corpus = Corpus()
    for data_dir in dirs:
        wavs, texts = _kaldi_table(data_dir / "wav.scp"), _kaldi_table(data_dir / "text")
        spk = _kaldi_table(data_dir / "utt2spk") if (data_dir / "utt2spk").is_file() else {}
        for uid, (text, _) in texts.items():
            if uid not in wavs:
                corpus.skip(f"{data_dir / 'text'}:{texts[uid][1]}", NO_AUDIO, f"utterance {uid!r} has no line in wav.scp")
                continue
            value, n = wavs[uid]
            if not value or value.endswith("|"):
                raise ValueError(f"{data_dir / 'wav.scp'}:{n}: expected '<utterance> <audio path>', got "
                                 f"{'a piped command (not supported: convert the audio to files)' if value else 'no path'}")
            audio = next((c for c in (Path(value), data_dir / value, data_dir.parent / value) if c.is_file()), None)
            if audio is None:
                corpus.skip(f"{data_dir / 'wav.scp'}:{n}", MISSING_AUDIO, f"{value}: not found (absolute, or under "
                                                                            f"{data_dir} or {data_dir.parent})")
                continue
            corpus.add(uid, audio, text, spk[uid][0] if uid in spk else uid, source=f"{data_dir / 'wav.scp'}:{n}")
        for uid, (_, n) in wavs.items():
            if uid not in texts:
                corpus.skip(f"{data_dir / 'wav.scp'}:{n}", NO_TRANSCRIPT, f"utterance {uid!r} has no line in text")
    return corpus


def read_corpus(root: str | Path) -> Corpus:
    """Detect the layout of ``root`` (AN4, FSDD, LibriSpeech, Kaldi data directories, folder, or a
    .jsonl manifest)."""
    root = Path(root)
    if root.is_file() and root.suffix == ".jsonl":
        return read_manifest_checked(root)
    if root.is_dir() and (is_kaldi_dir(root) or any(d.is_dir() and is_kaldi_dir(d) for d in root.iterdir())):
        return read_kaldi(root)
    if (root / "etc").is_dir() and any((root / "etc").glob("an4_*.transcription")):
        return read_an4(root)
    if (root / "recordings").is_dir() or (root.is_dir() and any(re.fullmatch(r"\d_[^_]+_\d+\.wav", p.name) for p in root.glob("*.wav"))):
        return read_fsdd(root)
    if root.is_dir() and any(root.rglob("*.trans.txt")):
        return read_librispeech(root)
    if root.is_dir():
        return read_folder(root)
    raise FileNotFoundError(f"{root}: not a corpus directory or .jsonl manifest")


def split_by_speaker(utterances: Iterable[Utterance], held_out: Iterable[str]) -> tuple[list[Utterance], list[Utterance]]:
    """(train, dev): dev holds every utterance of the held-out speakers, train none of them."""
    held = set(held_out)
    utts = list(utterances)
    return [u for u in utts if u.speaker not in held], [u for u in utts if u.speaker in held]


def write_manifest(utterances: Iterable[Utterance], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for u in utterances:
            f.write(json.dumps({**asdict(u), "audio": str(Path(u.audio).resolve())}) + "\n")
    tmp.replace(path)
    return path


def read_manifest_checked(path: str | Path) -> Corpus:
    """A user's ``.jsonl`` manifest read by the one rule: a line that is not a JSON object with
    ``audio``, or whose utterance fails ``Corpus.add``'s checks, is skipped with ``path:line``."""
    path = Path(path)
    corpus = Corpus()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            source = f"{path}:{n}"
            try:
                row = json.loads(line)
                audio = Path(row["audio"])
                duration = float(row["duration_s"]) if "duration_s" in row else None
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                corpus.skip(source, BAD_LINE, f"not a JSON object with an \"audio\" path: {exc}")
                continue
            audio = audio if audio.is_absolute() else path.parent / audio
            corpus.add(str(row.get("id", audio.stem)), audio, str(row.get("text", "")), str(row.get("speaker", "")),
                       duration_s=duration, source=source)
    return corpus


def read_manifest(path: str | Path) -> Iterator[Utterance]:
    base = Path(path).parent
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                audio = Path(row["audio"])
                yield Utterance(
                    id=str(row.get("id", audio.stem)),
                    audio=str(audio if audio.is_absolute() else base / audio),
                    duration_s=float(row.get("duration_s", 0.0)),
                    text=normalize_text(row.get("text", "")),
                    speaker=str(row.get("speaker", "")),
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: bad manifest line ({exc})") from exc
