"""Batch transcription under Ray Data: files, directories or manifests -> ``transcripts.jsonl``.

``asr transcribe INPUT --out OUTDIR`` where INPUT is an audio file, a directory (searched
recursively for ``workers.data.corpus.AUDIO_SUFFIXES``) or a ``.jsonl`` manifest. Inputs are
sorted by duration and cut into batches of at most ``--batch-size`` files whose padded audio
(files x the longest) is at most ``--batch-seconds`` (a longer file is alone). Each batch
goes through three Ray Data operators over the same stage code (``pipeline.batch.stages``):
read + resample + MFCC + voice activity as CPU tasks over all cores, the acoustic model in an
actor pool (a GPU share each when the cluster has GPUs) over the whole batch, and decoding in a
CPU actor pool. A file longer than ``vad.max_segment_s`` is read and recognised piece by piece,
so a worker's memory does not depend on file length. In-process (``--local``) the same three
stages run one after the other. A batch whose worker process dies (killed
for memory, crashed) is run again once, then split in halves, round after round, until the
input that fails is alone and gets an error record: the job always ends.

Output, one JSON line per input (sorted by path) in ``OUTDIR/transcripts.jsonl``::

    {"path": str, "text": str, "duration_s": float,
     "words": [{"word": str, "start_s": float, "end_s": float}], "error": null | "<reason>",
     "settings": {model, weights hash, decoder, latency, voice activity}}

``path`` is absolute; a file listed twice (e.g. in a manifest) gets one line. A bad input
never stops the run or disappears: it gets a line whose ``error`` says why. With
``--format txt|srt`` a file per input mirrors the input tree under OUTDIR, the audio
suffix replaced, or kept where two inputs share a stem (``a.wav.txt``, ``a.flac.txt``).
Reading inputs and writing these files: ``pipeline.batch.files``.

Resume: lines are appended to ``transcripts.jsonl.partial`` as batches finish, and
``transcripts.jsonl`` is rewritten atomically (temporary file + rename) at the end. A
rerun skips inputs that already have an error-free line (in either file) made with the
same settings unless ``--overwrite``; inputs that errored or were made with other settings
are redone.

Exit code of ``asr transcribe``: 0 when every input was transcribed, 1 when any input
errored (see its ``error``), 2 when the run could not start (input not found, bad
config, bad model bundle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from tqdm import tqdm

from pipeline.batch.files import (  # noqa: F401  (re-exported: the job's files are part of this module's API)
    FORMATS,
    PARTIAL_NAME,
    TRANSCRIPTS_NAME,
    InputFile,
    collect_inputs,
    discover_inputs,
    error_record,
    format_path,
    load_previous,
    read_records,
    render,
    to_srt,
    transcript_record,
    write_formats,
    write_text_atomic,
)
from pipeline.batch.stages import (
    AcousticRows,
    DecodeRows,
    acoustic_items,
    analyse_paths,
    analyse_rows,
    decode_items,
    transcribe_batch,  # noqa: F401  (re-exported: the stages in-process)
)
from pipeline.cluster import session as ray_session
from pipeline.cluster.session import configure_ray_data_output, connect_ray, ray_log_dir
from workers.audio.reader import RawFormat
from workers.audio.vad import VadConfig
from workers.decoding.decoder import DecoderConfig
from workers.model.bundle import load_bundle
from workers.recognizer import Recognizer

#: Default bound on a batch's padded audio (its files x the longest of them), seconds, and on its
#: files. Measured on the 2,374 s AN4 bench job on 2 cores, one thread, `--local` / Ray end to end
#: (2026-12-05): 16 files / 120 s: 11.1-11.7 / 17.4-17.6 s; 32 / 240 s: 10.1-10.4 / 14.0-14.8 s;
#: 64 / 480 s: 10.1-10.5 / 12.7-13.5 s; 128 / 960 s: 11.3 / 13.8 s. Fewer, larger batches pay Ray's
#: per-batch hand-offs fewer times and give a GPU more frames per call.
BATCH_SECONDS = 480.0
BATCH_FILES = 64
#: A batch task whose worker process dies (killed for memory, crashed) is run again at most
#: this many times by Ray Data; then the batch is split in halves and those are tried.
TASK_RETRIES = 1
#: Below this much audio to transcribe (seconds, summed over the inputs not done yet; from the
#: file headers) ``asr transcribe`` runs the recogniser in its own process instead of starting
#: a Ray: a local Ray's start-up (about 10 s here, see docs/usage.md) dwarfs the compute of a small job
#: (real-time factor about 0.03 in-process). ``--ray``/``--address`` force Ray, ``--local`` forbids it.
LOCAL_MAX_AUDIO_S = 300.0
BACKENDS = ("auto", "local", "ray")


def plan_batches(items: Sequence[InputFile], batch_seconds: float = BATCH_SECONDS, batch_size: int = BATCH_FILES) -> list[list[InputFile]]:
    """Inputs sorted by duration and cut into batches of at most ``batch_size`` files whose padded
    audio (files x the longest of them: what the acoustic model computes on) is at most
    ``batch_seconds``; a file longer than that is alone. Every input is in exactly one batch."""
    batches: list[list[InputFile]] = []
    for item in sorted(items, key=lambda i: (i.duration_s, i.path)):
        current = batches[-1] if batches else []
        if current and len(current) < batch_size and (len(current) + 1) * item.duration_s <= batch_seconds:
            current.append(item)
        else:
            batches.append([item])
    return batches


@dataclass(frozen=True)
class BatchJob:
    """What every stage of a job is built from: the recogniser's settings and how raw PCM is read.
    ``device``: where the acoustic stage runs (the analysis and decode stages run on the CPU)."""

    bundle_path: str | None
    decoder_config: DecoderConfig | None
    chunk_ms: float | None
    lookahead_ms: float
    device: str
    raw_format: RawFormat | None = None
    vad: VadConfig | None = None
    quantize: str = "none"
    decode_actors: int = 1

    def recognizer_kwargs(self, device: str) -> dict:
        """``Recognizer``'s keyword arguments for a stage on ``device``."""
        return {"bundle": self.bundle_path, "decoder_config": self.decoder_config, "chunk_ms": self.chunk_ms,
                "lookahead_ms": self.lookahead_ms, "device": device, "vad": self.vad, "quantize": self.quantize}


def run_in_process(batches: Sequence[Sequence[str]], job: BatchJob, *_: Any) -> Iterator[tuple[str, dict, float]]:
    """``run_dataset`` without Ray: the same three stages (one ``Recognizer``) called in this
    process on each batch of paths in turn; yields (path, record, actor_s) as ``run_dataset`` does."""
    with _native_stderr_silenced(not ray_session.VERBOSE):  # flashlight's LM banner, as Ray keeps it in its logs
        rec = Recognizer(**job.recognizer_kwargs(job.device))
        _ = rec.decoder  # the lexicon and LM load here (under the silenced stderr), not in the first batch
    for paths in batches:
        items = acoustic_items(rec, analyse_paths(rec, paths, job.raw_format), job.raw_format)
        for item, record in zip(items, decode_items(rec, items)):
            yield item.path, json.loads(json.dumps(record)), item.stage_s


@contextlib.contextmanager
def _native_stderr_silenced(silence: bool = True) -> Iterator[None]:
    """File descriptor 2 (what C++ code such as flashlight's LM loader prints to) to /dev/null
    while the block runs, when ``silence``; Python's exceptions are untouched."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def choose_backend(backend: str, audio_s: float, address: str | None = None, concurrency: int = 1) -> str:
    """Where a job runs: ``"in-process"`` or ``"ray"``.

    ``backend``: ``"local"`` (in-process, always; an ``address`` with it is an error),
    ``"ray"`` (always), or ``"auto"``: Ray when given an address (or RAY_ADDRESS), when Ray is
    already initialised in this process, when ``concurrency`` asks for several actors or when
    ``audio_s`` (the audio to transcribe, seconds) is at least ``LOCAL_MAX_AUDIO_S``; else in-process."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "local":
        if address:
            raise ValueError("--local runs without Ray; it cannot be combined with --address")
        return "in-process"
    if backend == "ray" or address or os.environ.get("RAY_ADDRESS") or ray.is_initialized() or concurrency > 1:
        return "ray"
    return "in-process" if audio_s < LOCAL_MAX_AUDIO_S else "ray"


# --------------------------------------------------------------------------- Ray


def acoustic_num_gpus(concurrency: int = 1) -> float:
    """GPUs per batch actor: with a GPU in the cluster, the actors share it (each holds
    ``1 / concurrency``, at most 1, so an actor pool larger than the GPU count still starts);
    0 without one. Loading and features run on the actors' CPUs, the model on the GPU."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return 0.0 if gpus <= 0 else min(1.0, gpus / max(1, concurrency))


#: Logical CPUs that an analysis task, a decode actor and an acoustic actor ask of Ray (each
#: runs one thread): below one, so that on a small machine the actor pools leave room for the
#: analysis tasks. With an acoustic actor at one CPU, on 2 CPUs a job whose acoustic actor was
#: killed, run after another job in the same Ray, hung in the crash test here; at 0.5 it passes.
ANALYSE_TASK_CPUS = 0.25
DECODE_ACTOR_CPUS = 0.25
ACOUSTIC_ACTOR_CPUS = 0.5


def analysis_tasks() -> int:
    """Analysis tasks at once: one per CPU of the cluster but one (the acoustic and decode actors'),
    at least one. Each task's worker process loads torch and the detector once and is reused; more
    tasks than cores only start more of those processes (on 2 cores, without this bound the AN4
    bench job's first row came after 24 s, with it after 5.7 s)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)


def run_dataset(
    batches: Sequence[Sequence[str]], job: BatchJob, concurrency: int, num_gpus: float, task_retries: int = TASK_RETRIES
) -> Iterator[tuple[str, dict, float]]:
    """Run the three stages over ``batches`` of paths as a Ray Data pipeline (one row per batch):
    analysis as tasks over all CPUs, the acoustic model in a pool of ``concurrency`` actors
    (``num_gpus`` each), decoding in a pool of ``job.decode_actors`` CPU actors; yield (path,
    record, actor_s) for the paths of every batch that finished.

    A batch whose worker process died ``1 + task_retries`` times in any stage yields nothing
    and the run goes on: Ray Data runs a task at most ``1 + task_retries`` times (its default
    is forever), replaces a dead actor every time (``max_restarts=-1``; with a bound, a pool of
    one actor that reached it dropped every later batch in a trial here), gives an actor one
    batch at a time (so a death fails no other batch) and, with ``max_errored_blocks=-1``,
    leaves a failed batch out instead of failing the run. The caller sees which paths did not
    come back (``_transcribe_todo`` splits their batches)."""
    for row in build_dataset(batches, job, concurrency, num_gpus, task_retries).iter_rows():
        yield str(row["path"]), json.loads(row["record"]), float(row["actor_s"])


def build_dataset(batches: Sequence[Sequence[str]], job: BatchJob, concurrency: int, num_gpus: float,
                  task_retries: int = TASK_RETRIES) -> ray.data.Dataset:
    """The Ray Data pipeline of ``run_dataset``, not yet run. The operators differ in their
    resources and retry options, so Ray Data does not fuse them into one (tested)."""
    configure_ray_data_output()
    ds = ray.data.from_items([{"paths": json.dumps(list(b))} for b in batches], override_num_blocks=max(1, len(batches)))
    ds.context.max_errored_blocks = -1  # this dataset's own copy of the context
    cpu_kwargs = job.recognizer_kwargs("cpu")
    one_at_a_time = {"batch_size": 1, "batch_format": "numpy", "max_restarts": -1, "max_task_retries": task_retries}
    with warnings.catch_warnings():  # Ray 2.60 takes actor options only as these (deprecated) keyword arguments
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ds.map_batches(analyse_rows, fn_kwargs={"recognizer_kwargs": cpu_kwargs, "raw_format": job.raw_format},
                            batch_size=1, batch_format="numpy", num_cpus=ANALYSE_TASK_CPUS, max_retries=task_retries,
                            concurrency=analysis_tasks())
        ds = ds.map_batches(AcousticRows, fn_constructor_kwargs={"recognizer_kwargs": job.recognizer_kwargs(job.device),
                                                                 "raw_format": job.raw_format},
                            compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1),
                            num_gpus=num_gpus, num_cpus=ACOUSTIC_ACTOR_CPUS, **one_at_a_time)
        ds = ds.map_batches(DecodeRows, fn_constructor_kwargs={"recognizer_kwargs": cpu_kwargs},
                            compute=ray.data.ActorPoolStrategy(size=job.decode_actors, max_tasks_in_flight_per_actor=1),
                            num_cpus=DECODE_ACTOR_CPUS, **one_at_a_time)
    return ds


# --------------------------------------------------------------------------- the job


def _finish(out_dir: Path, rows: dict[str, dict]) -> None:
    """Rewrite transcripts.jsonl atomically (sorted by path) and drop the partial file."""
    lines = "".join(json.dumps(rows[p]) + "\n" for p in sorted(rows))
    write_text_atomic(out_dir / TRANSCRIPTS_NAME, lines)
    (out_dir / PARTIAL_NAME).unlink(missing_ok=True)


@dataclass
class _RunStats:
    transcribed: int = 0
    audio_s: float = 0.0  # audio transcribed, seconds
    compute_s: float = 0.0  # driver wall seconds from starting the dataset to its last row
    first_row_s: float = 0.0  # from starting the dataset to its first row: mostly actor start-up
    actor_s: float = 0.0  # seconds spent inside the UDF, summed over actors
    failed_batches: int = 0  # batch tasks that did not come back (worker died every try): split or given up


def run_settings(bundle_path: str | None, decoder_config: DecoderConfig | None, chunk_ms: float | None, lookahead_ms: float,
                 vad: VadConfig | None, quantize: str = "none") -> dict:
    """What decides a transcript: the model (its directory and a hash of its weights), the
    decoder, the latency and the voice activity settings, and int8 quantisation when on (not
    written when off, so records made before the setting existed still count as done).
    Stored in every record; a rerun with other settings redoes the inputs instead of keeping
    transcripts made differently."""
    from workers.model.bundle import DEFAULT_BUNDLE

    bundle = Path(bundle_path) if bundle_path else DEFAULT_BUNDLE
    digest = hashlib.sha256((bundle / "weights.pt").read_bytes()).hexdigest()[:16]
    settings = {"model": str(bundle.absolute()), "weights_sha256": digest,
                "decoder": dataclasses.asdict(decoder_config or DecoderConfig()),
                "chunk_ms": chunk_ms, "lookahead_ms": lookahead_ms if chunk_ms is not None else 0.0,
                "vad": dataclasses.asdict(vad or VadConfig())}
    if quantize != "none":
        settings["quantize"] = quantize
    return json.loads(json.dumps(settings))  # as it reads back from the JSONL file (tuples become lists)


def _transcribe_todo(
    todo: list[InputFile],
    out_dir: Path,
    rows: dict[str, dict],
    formats: Sequence[str],
    job: BatchJob,
    batch_size: int,
    concurrency: int,
    num_gpus: float,
    settings: dict | None = None,
    batch_seconds: float = BATCH_SECONDS,
    task_retries: int = TASK_RETRIES,
    progress: bool = True,
    runner: Any = None,
) -> _RunStats:
    """Run the dataset; each record (with ``settings``) goes to the partial file (flushed), ``rows`` and its format files.
    ``progress``: a progress bar on stderr when it is a terminal. ``runner``: ``run_dataset``
    (the default: Ray Data) or ``run_in_process``.

    Batches that did not come back (their worker died every time it tried them) are split in
    halves and run again, round after round, until the input that fails is alone; it then gets
    an error record. Every input in ``todo`` ends with exactly one record.
    """
    stats = _RunStats()
    rels = {item.path: item.out_rel for item in todo}
    attempts = dict.fromkeys(rels, 0)  # runs of a batch holding this input that never came back
    t0 = time.perf_counter()

    def record(path: str, rec: dict, actor_s: float = 0.0) -> None:
        bar.update()
        rec["settings"] = settings
        partial.write(json.dumps(rec) + "\n")
        partial.flush()
        rows[path] = rec
        write_formats(out_dir, rels[path], rec, formats)
        stats.actor_s += actor_s
        if not stats.first_row_s:
            stats.first_row_s = time.perf_counter() - t0
        if rec["error"] is None:
            stats.transcribed += 1
            stats.audio_s += rec["duration_s"]

    bar = tqdm(total=len(todo), unit="file", desc="transcribing", file=sys.stderr, disable=None if progress else True)
    with bar, (out_dir / PARTIAL_NAME).open("a") as partial:
        pending = [[item.path for item in batch] for batch in plan_batches(todo, batch_seconds, batch_size)]
        while pending:
            done: set[str] = set()
            for path, rec, actor_s in (runner or run_dataset)(pending, job, concurrency, num_gpus, task_retries):
                if path in rels and path not in done:
                    done.add(path)
                    record(path, rec, actor_s)
            failed = [[p for p in batch if p not in done] for batch in pending]
            failed = [batch for batch in failed if batch]
            stats.failed_batches += len(failed)
            pending = []
            for batch in failed:
                for path in batch:
                    attempts[path] += 1 + task_retries
                if len(batch) == 1:
                    reason = (f"worker process died in each of {attempts[batch[0]]} attempts to transcribe this input "
                              "(killed for using too much memory, or crashed)")
                    record(batch[0], error_record(batch[0], reason))
                else:
                    half = (len(batch) + 1) // 2
                    pending += [batch[:half], batch[half:]]
    stats.compute_s = time.perf_counter() - t0
    return stats


def _check_options(formats: Sequence[str], batch_size: int, concurrency: int, chunk_ms: float | None = None,
                   lookahead_ms: float = 0.0, batch_seconds: float = BATCH_SECONDS, task_retries: int = TASK_RETRIES) -> None:
    """Every option checked before Ray starts (a bad one is the user's error: exit 2, one line)."""
    if not 0 < batch_seconds < math.inf:
        raise ValueError(f"--batch-seconds must be > 0, got {batch_seconds}")
    if task_retries < 0:
        raise ValueError(f"task_retries must be >= 0, got {task_retries}")
    if chunk_ms is not None and not 0 < chunk_ms < math.inf:
        raise ValueError(f"--chunk-ms must be > 0, got {chunk_ms}")
    if not 0 <= lookahead_ms < math.inf:
        raise ValueError(f"--lookahead-ms must be >= 0, got {lookahead_ms}")
    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown output format(s) {sorted(unknown)}; choose from {FORMATS}")


def transcribe_inputs(
    inputs: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    bundle_path: str | Path | None = None,
    decoder_config: DecoderConfig | None = None,
    chunk_ms: float | None = None,
    lookahead_ms: float = 0,
    overwrite: bool = False,
    formats: Sequence[str] = (),
    batch_size: int = BATCH_FILES,
    concurrency: int = 1,
    raw_format: RawFormat | None = None,
    address: str | None = None,
    vad: VadConfig | None = None,
    batch_seconds: float = BATCH_SECONDS,
    task_retries: int = TASK_RETRIES,
    progress: bool = True,
    backend: str = "auto",
    quantize: str = "none",
) -> dict:
    """Transcribe every input not done yet into ``out_dir``; returns the run summary.

    ``inputs``: files, directories or manifests. ``chunk_ms=None`` runs whole utterances;
    otherwise latency-controlled chunks with ``lookahead_ms`` of right context.
    ``raw_format``: how headerless ``.raw``/``.pcm`` files are read (default 16 kHz 16-bit
    big-endian). ``address``: Ray cluster to connect to when Ray is not initialised yet.
    ``vad``: voice activity gating of the words (default on). ``batch_size`` files at most per
    batch, whose padded audio (files x the longest) is at most ``batch_seconds``; a batch whose
    worker process dies ``1 + task_retries`` times is split until the failing input is alone,
    which gets an error record. ``progress``: a progress bar on stderr when it is a terminal.
    ``backend``: ``"auto"`` (in-process below ``LOCAL_MAX_AUDIO_S`` of audio to do, else Ray;
    see ``choose_backend``), ``"local"`` or ``"ray"``. Both run the same UDF on the same batches:
    the records, files and resume are the same.

    Summary keys: ``files`` (inputs), ``transcribed`` (this run, without error),
    ``skipped`` (done earlier), ``errors`` (inputs whose line has an error),
    ``audio_s``/``audio_hours`` (audio transcribed this run), ``wall_s`` (the whole call),
    ``ran`` (``"in-process"``, ``"ray"``, or ``"nothing"`` when every input was done earlier),
    ``compute_s`` (Ray Data stage or in-process run: starting the dataset to its last row, actor start-up
    included), ``first_row_s`` (starting the dataset to its first row: actor start-up, model
    loading and the first batch), ``actor_s`` (seconds inside the actors' ``__call__``, summed), ``rtf``
    (compute_s / audio_s; 0 when nothing ran), ``out`` (the transcripts file), ``ray_logs``
    (the log directory of the local Ray this process started, else None).
    """
    t0 = time.perf_counter()
    _check_options(formats, batch_size, concurrency, chunk_ms, lookahead_ms, batch_seconds, task_retries)
    choose_backend(backend, 0.0, address, concurrency)  # a bad combination is the user's error, before any work
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    items = collect_inputs(inputs)
    if overwrite:
        (out_dir / PARTIAL_NAME).unlink(missing_ok=True)
    rows = load_previous(out_dir)
    bundle = None if bundle_path is None else str(Path(bundle_path).absolute())
    load_bundle(bundle)  # fail here, with the bundle's own message, not inside an actor
    settings = run_settings(bundle, decoder_config, chunk_ms, lookahead_ms, vad, quantize)

    def is_done(path: str) -> bool:  # transcribed without error, with these settings
        row = rows.get(path)
        return row is not None and row["error"] is None and row.get("settings") == settings

    done = set() if overwrite else {i.path for i in items if is_done(i.path)}
    redone = sum(1 for i in items if i.path not in done and rows.get(i.path, {}).get("error", "x") is None)
    for item in items:
        if item.path in done:
            write_formats(out_dir, item.out_rel, rows[item.path], formats, only_missing=True)
    todo = [item for item in items if item.path not in done]
    stats = _RunStats()
    ran = choose_backend(backend, sum(item.duration_s for item in todo), address, concurrency) if todo else "nothing"
    if todo:
        if ran == "ray":
            connect_ray(address)
            num_gpus = acoustic_num_gpus(concurrency)
            device = "cuda" if num_gpus else "cpu"
        else:
            num_gpus = 0.0
            device = "cuda" if torch.cuda.is_available() else "cpu"
        job = BatchJob(bundle, decoder_config, chunk_ms, lookahead_ms, device, raw_format, vad, quantize)
        stats = _transcribe_todo(todo, out_dir, rows, formats, job, batch_size, concurrency, num_gpus, settings,
                                 batch_seconds, task_retries, progress, run_dataset if ran == "ray" else run_in_process)
    _finish(out_dir, rows)
    missing = [item.path for item in items if item.path not in rows]
    if missing:  # cannot happen unless Ray dropped rows; never report success then
        raise RuntimeError(f"{len(missing)} inputs got no output line, e.g. {missing[0]}")
    return {
        "files": len(items),
        "transcribed": stats.transcribed,
        "skipped": len(done),
        "redone_new_settings": redone,  # transcribed before with other settings (model, decoder, latency, VAD)
        "errors": sum(1 for item in items if rows[item.path]["error"] is not None),
        "ran": ran,
        "audio_s": round(stats.audio_s, 3),
        "audio_hours": round(stats.audio_s / 3600, 6),
        "wall_s": round(time.perf_counter() - t0, 3),
        "compute_s": round(stats.compute_s, 3),
        "first_row_s": round(stats.first_row_s, 3),
        "actor_s": round(stats.actor_s, 3),
        "failed_batches": stats.failed_batches,
        "rtf": round(stats.compute_s / stats.audio_s, 4) if stats.audio_s else 0.0,
        "out": str(out_dir / TRANSCRIPTS_NAME),
        "ray_logs": ray_log_dir(),
    }
