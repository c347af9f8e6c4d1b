"""`asr train`: build the speaker-disjoint split, train, export a bundle with lexicon and LM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import AppConfig
from workers.data.corpus import Utterance, read_an4, read_fsdd, read_kaldi, split_by_speaker, write_manifest


class DataError(ValueError):
    """``--train`` / ``--dev`` data that cannot be used (unreadable, empty, speakers shared)."""


def read_sources(sources: list[str], log=print, strict: bool = False) -> list[Utterance]:
    """The utterances of every source (anything ``asr eval`` reads: a corpus root of a known
    layout, a folder of audio + ``.txt``, a ``.jsonl`` manifest). Skipped lines (the rule of
    ``workers.data.corpus``) are logged one by one and counted by reason; with ``strict`` any
    skip is a ``DataError``."""
    from workers.data.corpus import read_corpus

    utts: list[Utterance] = []
    for source in sources:
        try:
            corpus = read_corpus(source)
        except (OSError, ValueError) as exc:
            raise DataError(f"{source}: {exc}") from None
        for path, reason in corpus.skipped:
            log(f"skipped {path}: {reason}")
        if corpus.skipped:
            counts = ", ".join(f"{n} {reason}" for reason, n in corpus.skip_counts().items())
            log(f"{source}: skipped {len(corpus.skipped)} ({counts})")
            if strict:
                first, why = corpus.skipped[0]
                raise DataError(f"{source}: {len(corpus.skipped)} unusable ({counts}); first: {first}: {why} "
                                "(without --strict they are skipped and counted)")
        if not corpus.utterances:
            raise DataError(f"{source}: no utterances with transcripts")
        log(f"{source}: {len(corpus.utterances)} utterances, {sum(u.duration_s for u in corpus.utterances) / 3600:.2f} h")
        utts += corpus.utterances
    return utts


def check_speaker_disjoint(train: list[Utterance], dev: list[Utterance]) -> None:
    """Raise ``DataError`` naming the speakers found in both (utterances without a speaker
    label are not compared: their speakers are unknown)."""
    shared = sorted({u.speaker for u in train if u.speaker} & {u.speaker for u in dev if u.speaker})
    if shared:
        listed = ", ".join(shared[:10]) + (f" and {len(shared) - 10} more" if len(shared) > 10 else "")
        raise DataError(f"train and dev share {len(shared)} speaker(s): {listed}; accuracy must be measured on speakers "
                        "never trained on (choose a dev set of other speakers)")


def build_split(config: AppConfig, log=print, train_sources: list[str] | None = None,
                dev_sources: list[str] | None = None, strict: bool = False) -> tuple[list[Utterance], list[Utterance], list[Utterance]]:
    """-> (train, dev, extra_dev). Dev speakers never appear in train.

    ``dev`` picks the exported epoch; ``extra_dev`` is held out and recorded but not used for
    picking. With ``train_sources`` (``asr train --train DATA ... [--dev DATA ...]``) the data are
    those: (train, dev, []); ``data.max_*_utterances`` still apply; ``strict``: any unusable line
    in them is a ``DataError`` (``asr train --strict``). Otherwise the corpora of
    ``config.data``: dev is AN4's held-out speakers plus speechocean762's, extra_dev FSDD's."""
    train, dev_sets = _split_sources(config, log, train_sources, dev_sources, strict)
    data = config.data
    if data.max_train_utterances:
        train = train[:: max(1, len(train) // data.max_train_utterances)][: data.max_train_utterances]
    if data.max_dev_utterances:
        dev_sets = {name: utts[: data.max_dev_utterances] for name, utts in dev_sets.items()}
    return train, dev_sets.get("an4", []) + dev_sets.get("speechocean", []), dev_sets.get("fsdd", [])


def _split_sources(config: AppConfig, log, train_sources: list[str] | None,
                   dev_sources: list[str] | None, strict: bool = False) -> tuple[list[Utterance], dict[str, list[Utterance]]]:
    data = config.data
    if train_sources:
        train, dev = read_sources(train_sources, log, strict), read_sources(dev_sources or [], log, strict)
        check_speaker_disjoint(train, dev)
        if not dev:
            log("no --dev data: the exported epoch is the one with the lowest training loss (nothing held out is measured)")
        return train, {"an4": dev}

    def split(reader, root: str, dev_speakers: tuple[str, ...]) -> tuple[list[Utterance], list[Utterance]]:
        corpus = reader(root)
        for source, reason in corpus.skipped:
            log(f"skipped {source}: {reason}")
        return split_by_speaker(corpus.utterances, dev_speakers)

    corpora = [("an4", data.use_an4, read_an4, data.an4_root, data.an4_dev_speakers),
               ("fsdd", data.use_fsdd, read_fsdd, data.fsdd_root, data.fsdd_dev_speakers),
               ("speechocean", data.use_speechocean, read_kaldi, data.speechocean_root, data.speechocean_dev_speakers)]
    train: list[Utterance] = []
    dev_sets: dict[str, list[Utterance]] = {}
    for name, used, reader, root, dev_speakers in corpora:
        if used:
            corpus_train, dev_sets[name] = split(reader, root, dev_speakers)
            train += corpus_train
    return train, dev_sets


def data_info(train: list[Utterance], dev: list[Utterance]) -> dict:
    """What a bundle records about its data: who it was trained on, who was held out."""
    return {
        "train_speakers": sorted({u.speaker for u in train}),
        "dev_speakers": sorted({u.speaker for u in dev}),
        "train_utterances": len(train),
        "train_audio_h": round(sum(u.duration_s for u in train) / 3600, 3),
    }


def language_model_files(run_dir: Path, texts: list[str], order: int = 3, dictionary: str = "",
                         dictionary_max_words: int = 0) -> dict:
    """Lexicon and ARPA LM estimated from the training transcripts (cached in the run dir, per order
    and dictionary); with ``dictionary="cmudict"`` both also hold the CMU dictionary's words (its
    ``dictionary_max_words`` most frequent, 0: all), which the LM predicts at its unigram floor."""
    from workers.decoding.lm import build_arpa, vocabulary, write_lexicon

    suffix = f"_{dictionary}" if dictionary else ""
    suffix += f"{dictionary_max_words}" if dictionary and dictionary_max_words else ""
    lexicon, arpa = run_dir / f"lexicon{suffix}.txt", run_dir / f"lm_{order}gram{suffix}.arpa"
    if not (lexicon.is_file() and arpa.is_file()):
        extra: list[str] = []
        if dictionary == "cmudict":
            from workers.decoding.english import dictionary_words

            extra = dictionary_words(dictionary_max_words)
        write_lexicon(set(vocabulary(texts)) | set(extra), lexicon)
        build_arpa(texts, order=order, path=arpa, vocabulary=extra)
    return {"lexicon_path": lexicon, "lm_path": arpa}


def run_training(config: AppConfig, run_dir: str | Path, resume: bool = False, export_dir: str | Path | None = None,
                 max_steps_per_epoch: int | None = None, show_progress: bool = True, log=print,
                 train_sources: list[str] | None = None, dev_sources: list[str] | None = None, strict: bool = False):
    from workers.training.trainer import Trainer

    run_dir = Path(run_dir)
    train, dev, extra_dev = build_split(config, log, train_sources, dev_sources, strict)
    write_manifest(train, run_dir / "train.jsonl")
    write_manifest(dev, run_dir / "dev.jsonl")
    write_manifest(extra_dev, run_dir / "dev_extra.jsonl")
    texts = [u.text for u in train]
    trainer = Trainer(run_dir, train, dev, config.features, config.model, config.train, log)

    def extras(_run_dir: Path) -> dict:
        try:
            return language_model_files(run_dir, texts, config.data.lm_order, config.data.dictionary,
                                        config.data.dictionary_max_words)
        except Exception as exc:  # the acoustic model is still worth exporting without an LM
            log(f"warning: no LM/lexicon in the bundle ({type(exc).__name__}: {exc})")
            return {}

    info = data_info(train, dev + extra_dev)
    progress = trainer.run(resume, Path(export_dir) if export_dir else None, max_steps_per_epoch, show_progress, extras, info)
    (run_dir / "history.json").write_text(json.dumps(progress.history, indent=1))
    if progress.averaged:
        (run_dir / "averaged.json").write_text(json.dumps(progress.averaged, indent=1))
    return progress


def run_training_distributed(config: AppConfig, run_dir: str | Path, workers: int, resume: bool = False,
                             export_dir: str | Path | None = None, max_steps_per_epoch: int | None = None, log=print,
                             use_gpu: bool | None = None, pid_dir: str | Path | None = None,
                             train_sources: list[str] | None = None, dev_sources: list[str] | None = None) -> Path:
    """`asr train --workers N`: the same split, manifests, LM and bundle info as ``run_training``, trained on Ray Train."""
    from pipeline.training.distributed import train_distributed

    run_dir = Path(run_dir)
    train, dev, extra_dev = build_split(config, log, train_sources, dev_sources)
    write_manifest(train, run_dir / "train.jsonl")
    write_manifest(dev, run_dir / "dev.jsonl")
    write_manifest(extra_dev, run_dir / "dev_extra.jsonl")
    try:
        lm_files = language_model_files(run_dir, [u.text for u in train], config.data.lm_order, config.data.dictionary,
                                        config.data.dictionary_max_words)
    except Exception as exc:  # the acoustic model is still worth exporting without an LM
        log(f"warning: no LM/lexicon in the bundle ({type(exc).__name__}: {exc})")
        lm_files = None
    return train_distributed(train, config.features, config.model, config.train, workers,
                             export_dir or run_dir / "bundle", use_gpu=use_gpu, storage_path=run_dir / "ray_train",
                             dev=dev, resume=resume, lm_files=lm_files, bundle_info=data_info(train, dev + extra_dev),
                             max_steps_per_epoch=max_steps_per_epoch, cache_dir=run_dir.parent / "feature_cache",
                             pid_dir=pid_dir, log=log)


def run_training_cli(args, config: AppConfig) -> int:
    """`asr train`: in-process or, with ``--workers N``, data-parallel on Ray Train (both resumable)."""
    train_sources, dev_sources = getattr(args, "train", None), getattr(args, "dev", None)
    if dev_sources and not train_sources:
        print("error: --dev needs --train (without --train the AN4 + FSDD split of the config is used)", file=sys.stderr)
        return 2
    if args.workers > 0 and config.train.augment_prob > 0 and config.train.data_feed != "ray_data":
        print(f"error: train.augment_prob={config.train.augment_prob:g} (waveform augmentation) with --workers needs the "
              f"ray_data feed (train.data_feed={config.train.data_feed}); add --set train.data_feed=ray_data or "
              "--set train.augment_prob=0", file=sys.stderr)
        return 2
    try:
        if args.workers > 0:
            build_split(config, lambda _: None, train_sources, dev_sources, args.strict)  # bad data fails here, before Ray starts
        return _run_training(args, config, train_sources, dev_sources)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run_training(args, config: AppConfig, train_sources: list[str] | None, dev_sources: list[str] | None) -> int:
    if args.workers > 0:
        path = run_training_distributed(config, args.run_dir, args.workers, resume=args.resume, export_dir=args.export,
                                        max_steps_per_epoch=args.max_steps_per_epoch, train_sources=train_sources,
                                        dev_sources=dev_sources, use_gpu=True if getattr(args, "use_gpu", False) else None)
        print(f"exported {path}")
        return 0
    progress = run_training(config, args.run_dir, resume=args.resume, export_dir=args.export,
                            max_steps_per_epoch=args.max_steps_per_epoch, train_sources=train_sources, dev_sources=dev_sources,
                            strict=args.strict)
    if progress.history and "dev_wer_greedy_streaming" in progress.history[-1]:
        print(f"done: {progress.epoch} epochs, best dev WER (greedy, streaming) {progress.best_wer:.4f}")
    else:
        print(f"done: {progress.epoch} epochs, no dev data: exported the epoch with the lowest training loss ({progress.best_wer:.4f})")
    return 0


def finalize_bundle(run_dir: str | Path, out_dir: str | Path, lm_order: int | None = None, dictionary: str | None = None,
                    bundle_dir: str | Path | None = None, dictionary_max_words: int | None = None) -> Path:
    """Re-export ``RUN_DIR/bundle`` (or ``bundle_dir``) to ``out_dir`` with the lexicon, LM and speaker
    lists of the run.

    ``lm_order``, ``dictionary`` and ``dictionary_max_words`` default to ``data.lm_order`` /
    ``data.dictionary`` / ``data.dictionary_max_words`` of ``configs/default.yaml``.
    """
    from workers.data.corpus import read_manifest
    from workers.model.bundle import load_bundle, save_bundle

    run_dir = Path(run_dir)
    train = list(read_manifest(run_dir / "train.jsonl"))
    # dev.jsonl / dev_extra.jsonl; runs from before 2026-12-05 named them dev_an4.jsonl / dev_fsdd.jsonl
    names = ("dev.jsonl", "dev_extra.jsonl", "dev_an4.jsonl", "dev_fsdd.jsonl")
    dev = [u for name in names if (run_dir / name).is_file() for u in read_manifest(run_dir / name)]
    bundle = load_bundle(bundle_dir or run_dir / "bundle")
    if lm_order is None or dictionary is None or dictionary_max_words is None:
        from pipeline.config import load_config

        data = load_config().data
        lm_order = data.lm_order if lm_order is None else lm_order
        dictionary = data.dictionary if dictionary is None else dictionary
        dictionary_max_words = data.dictionary_max_words if dictionary_max_words is None else dictionary_max_words
    files = language_model_files(run_dir, [u.text for u in train], lm_order, dictionary, dictionary_max_words)
    info = {**bundle.info, **data_info(train, dev)}
    return save_bundle(out_dir, bundle.model, bundle.features, bundle.normalizer, info=info, **files)
