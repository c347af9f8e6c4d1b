"""The Ray streaming pipeline (pipeline.streaming) must give what the in-process
``StreamingRecognizer`` gives on the same audio and settings, for many concurrent streams."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import LOCAL_RAY_RESOURCES, NO_VAD

from pipeline.config import AppConfig, StreamingConfig
from pipeline.streaming import PipelineStats, StreamError, StreamingPipeline, acoustic_actor_count, acoustic_num_gpus
from workers.audio.reader import AudioError
from workers.decoding.decoder import DecoderConfig
from workers.features.mfcc import MfccExtractor
from workers.model.bundle import load_bundle
from workers.recognizer import StreamingRecognizer, frames_for_ms
from workers.stages import AcousticStage, RecognitionResult

RATE_HZ = 16000
STREAMING = StreamingConfig(
    chunk_ms=150.0,
    lookahead_ms=90.0,
    ingest_chunk_ms=100.0,
    endpoint_silence_ms=300.0,
    max_batch_wait_ms=20.0,
    max_inflight_chunks=4,
    acoustic_resources={"asr_acoustic": 1},  # custom resources place actors on chosen nodes
    decoder_resources={"asr_decoder": 1},
)
CONFIG = AppConfig(streaming=STREAMING, vad=NO_VAD)  # generated audio: see conftest.NO_VAD
NODE_RESOURCES = LOCAL_RAY_RESOURCES  # of the shared local Ray (conftest.local_ray)


@dataclass
class Pipe:
    pipeline: StreamingPipeline
    bundle: Path
    kind: str




@pytest.fixture(scope="module", params=["greedy", "beam"])
def pipe(request, local_ray, tiny_bundle, tiny_bundle_lm) -> Pipe:
    """One pipeline per decoder kind (beam with the lexicon + LM bundle), shared by the tests."""
    bundle = tiny_bundle if request.param == "greedy" else tiny_bundle_lm
    pipeline = StreamingPipeline(CONFIG, bundle, DecoderConfig(kind=request.param))
    yield Pipe(pipeline, bundle, request.param)
    pipeline.shutdown()


def make_audio(seed: int, seconds: float) -> np.ndarray:
    """(samples,) float32 at 16 kHz: noise plus a tone switched on and off, different per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE_HZ * seconds)) / RATE_HZ
    gate = np.sin(2 * np.pi * (0.6 + 0.25 * seed) * t) > 0.2
    tone = np.sin(2 * np.pi * (180 + 90 * seed) * t) * gate
    return (0.04 * rng.standard_normal(len(t)) + 0.3 * tone).astype(np.float32)


def random_pieces(audio: np.ndarray, rng: random.Random, max_samples: int = 4000) -> list[np.ndarray]:
    """Cut audio at random points (pieces of 1..max_samples samples)."""
    pieces, start = [], 0
    while start < len(audio):
        step = rng.randint(1, max_samples)
        pieces.append(audio[start : start + step])
        start += step
    return pieces


def reference(pipe: Pipe, pieces: list[np.ndarray], rate_hz: int = RATE_HZ) -> list[RecognitionResult]:
    """The in-process recogniser on the same pushes and settings."""
    rec = StreamingRecognizer(
        pipe.bundle,
        DecoderConfig(kind=pipe.kind),
        chunk_ms=STREAMING.chunk_ms,
        lookahead_ms=STREAMING.lookahead_ms,
        endpoint_silence_ms=STREAMING.endpoint_silence_ms,
        ingest_chunk_ms=STREAMING.ingest_chunk_ms,
        device="cpu",
        vad=CONFIG.vad,
    )
    results = [r for piece in pieces for r in rec.push(piece, rate_hz)]
    return results + rec.finish()


def run_interleaved(pipeline: StreamingPipeline, streams: dict[str, tuple[list[np.ndarray], int]], seed: int = 0) -> dict[str, list[RecognitionResult]]:
    """Push every stream's pieces in a random interleaving (each stream's own order kept),
    then close the streams in random order."""
    rng = random.Random(seed)
    ids = {name: pipeline.open_stream() for name in streams}
    schedule = [name for name, (pieces, _) in streams.items() for _ in pieces]
    rng.shuffle(schedule)
    next_piece = dict.fromkeys(streams, 0)
    results: dict[str, list[RecognitionResult]] = {name: [] for name in streams}
    for name in schedule:
        pieces, rate = streams[name]
        results[name] += pipeline.push(ids[name], pieces[next_piece[name]], rate)
        next_piece[name] += 1
    for name in rng.sample(list(streams), len(streams)):
        results[name] += pipeline.close(ids[name])
    for name, stream_results in results.items():
        assert {r.stream_id for r in stream_results} <= {ids[name]}
    return results


def finals(results: list[RecognitionResult]) -> list[tuple[str, float, float, list[tuple[str, float, float]]]]:
    return [(r.text, round(r.start_s, 4), round(r.end_s, 4), [(w.word, round(w.start_s, 4), round(w.end_s, 4)) for w in r.words]) for r in results if r.is_final]


def last_partial(results: list[RecognitionResult]) -> str | None:
    partials = [r.text for r in results if not r.is_final]
    return partials[-1] if partials else None


def assert_in_order(results: list[RecognitionResult]) -> None:
    """Results of one stream come back in time order and end with a final."""
    ends = [r.end_s for r in results]
    assert ends == sorted(ends)
    assert results and results[-1].is_final


def test_concurrent_streams_match_in_process(pipe: Pipe) -> None:
    rng = random.Random(1)
    streams = {f"s{i}": (random_pieces(make_audio(i, 1.5 + 0.3 * i), rng), RATE_HZ) for i in range(6)}
    stereo_8k = (make_audio(7, 2.0)[::2, None] * np.array([[20000, 12000]])).astype(np.int16)  # (samples, 2) int16
    streams["int16-stereo-8k"] = (random_pieces(stereo_8k, rng, 2000), 8000)

    got = run_interleaved(pipe.pipeline, streams)

    for name, (pieces, rate) in streams.items():
        want = reference(pipe, pieces, rate)
        assert_in_order(got[name])
        assert finals(got[name]) == finals(want), name
        assert last_partial(got[name]) == last_partial(want), name
    assert len({str(finals(r)) for r in got.values()}) > 1  # different audio, different results
    assert pipe.pipeline.acoustic_stats()["max_streams_per_round"] > 1  # streams were batched together
    assert pipe.pipeline.stats.max_pushes_per_chain > 1  # ... and their pushes shared chains of actor calls


def fault_in_features(pipeline: StreamingPipeline, stream_key: str | None) -> None:
    """Make the feature actor's stage raise on ``stream_key``'s pushes (None: stop)."""

    def _fail_pushes_of(actor, stream_key: str | None) -> None:
        """Runs inside the FeatureActor (``__ray_call__``; defined here so that Ray ships it by
        value): its stage raises on ``stream_key``'s pushes (None: stop)."""
        stage = actor.stage
        original = getattr(stage, "_original_push", stage.push)
        original_many = getattr(stage, "_original_push_many", stage.push_many)
        stage._original_push, stage._original_push_many = original, original_many

        def push(stream_id, wave):
            if stream_id == stream_key:
                raise RuntimeError("injected fault")
            return original(stream_id, wave)

        def push_many(pushes, last=None):
            if any(stream_id == stream_key for stream_id, _ in pushes):
                raise RuntimeError("injected fault")
            return original_many(pushes, last)

        stage.push = push if stream_key is not None else original
        stage.push_many = push_many if stream_key is not None else original_many

    ray.get(pipeline.actors["features"].__ray_call__.remote(_fail_pushes_of, stream_key))


def test_one_failing_stream_does_not_fail_the_others_in_its_chains(pipe: Pipe) -> None:
    """A stage error on one stream (here: the feature stage raises on its audio) fails that
    stream only, although its pushes travel in the same actor calls as the others'. Such an
    error is the stream's own, not a crash: it is not replayed."""
    pipeline = pipe.pipeline
    rng = random.Random(6)
    good_pieces = random_pieces(make_audio(4, 2.0), rng)
    good, bad = pipeline.open_stream(), pipeline.open_stream()
    pipeline.push(bad, make_audio(2, 0.3), RATE_HZ)
    pipeline.close(pipeline.open_stream())  # (a third stream, finished, to check nothing leaks)
    pipeline.push(bad, np.zeros(0, np.float32), RATE_HZ)
    fault_in_features(pipeline, bad)  # a fault in the stage, for this stream
    results = []
    try:
        for i, piece in enumerate(good_pieces):
            results += pipeline.push(good, piece, RATE_HZ)  # queued with the bad stream's push: one chain
            if i == len(good_pieces) // 2:
                with pytest.raises(StreamError, match="RuntimeError: injected fault"):
                    pipeline.push(bad, make_audio(3, 0.1), RATE_HZ)
                    pipeline.close(bad)
    finally:
        fault_in_features(pipeline, None)
    results += pipeline.close(good)
    with pytest.raises(KeyError):
        pipeline.inflight(bad)
    assert finals(results) == finals(reference(pipe, good_pieces))


def test_an_event_loop_pushes_and_awaits_without_a_thread(pipe: Pipe) -> None:
    """What ``asr serve`` does per frame on its event loop: push when ``push_is_quick``, await
    ``completion``, take ``results_now``; the results are those of the blocking calls. A
    failed push stops ``results_now`` (it is left for a blocking call to deal with) and makes
    pushing not quick until then."""
    import asyncio

    pipeline = pipe.pipeline
    pieces = random_pieces(make_audio(7, 2.0), random.Random(8))

    async def stream() -> list[RecognitionResult]:
        sid, results = pipeline.open_stream(), []
        for piece in pieces:
            assert pipeline.push_is_quick(sid) == (pipeline.inflight(sid) < STREAMING.max_inflight_chunks)
            results += pipeline.push(sid, piece, RATE_HZ)
            await asyncio.wait_for(asyncio.wrap_future(pipeline.completion(sid)), 60)
            assert pipeline.completion(sid).done()  # every push is back ...
            results += pipeline.results_now(sid)
            assert pipeline.inflight(sid) == 0  # ... and was collected
        return results + pipeline.close(sid)

    assert finals(asyncio.run(stream())) == finals(reference(pipe, pieces))
    bad = pipeline.open_stream()
    pipeline.push(bad, make_audio(2, 0.3), RATE_HZ)
    pipeline.results(bad, wait=True)
    fault_in_features(pipeline, bad)
    try:
        pipeline.push(bad, make_audio(3, 0.3), RATE_HZ)
        pipeline.completion(bad).result(timeout=60)
        assert pipeline.results_now(bad) == [] and pipeline.inflight(bad) == 1  # the failed push is left ...
        assert not pipeline.push_is_quick(bad)
        with pytest.raises(StreamError, match="injected fault"):  # ... for the blocking call, which drops the stream
            pipeline.results(bad)
    finally:
        fault_in_features(pipeline, None)
    assert not pipeline.push_is_quick(bad)  # (no longer open)


def test_same_audio_gives_same_result_alone_or_among_others(pipe: Pipe) -> None:
    rng = random.Random(2)
    audio = random_pieces(make_audio(3, 2.0), rng)
    alone = run_interleaved(pipe.pipeline, {"a": (audio, RATE_HZ)})["a"]
    others = {f"o{i}": (random_pieces(make_audio(10 + i, 2.5), rng), RATE_HZ) for i in range(5)}
    mixed = run_interleaved(pipe.pipeline, {"a": (audio, RATE_HZ), **others}, seed=3)["a"]
    assert finals(mixed) == finals(alone)
    assert last_partial(mixed) == last_partial(alone)


def test_backpressure_bounds_inflight_chunks(pipe: Pipe) -> None:
    pipeline = pipe.pipeline
    pipeline.stats = PipelineStats()
    limit = STREAMING.max_inflight_chunks
    sid = pipeline.open_stream()
    results = []
    for piece in np.array_split(make_audio(5, 12.0), 24):  # 12 s pushed far faster than real time
        results += pipeline.push(sid, piece, RATE_HZ)
        assert pipeline.inflight(sid) <= limit
    results += pipeline.close(sid)
    assert pipeline.stats.max_inflight == limit  # the producer got ahead ...
    assert pipeline.stats.blocked_pushes > 0  # ... and was held back
    assert_in_order(results)


def test_last_push_can_be_followed_to_completion(pipe: Pipe) -> None:
    """``last_push`` / ``completed`` (what ``asr bench`` times pushes with): each push's item
    comes back with the results that push and close hand out, and its stage timestamps."""
    pipeline = pipe.pipeline
    sid = pipeline.open_stream()
    with pytest.raises(ValueError):
        pipeline.last_push(sid)
    handles, results = [], []
    for piece in np.array_split(make_audio(6, 3.0), 6):
        results += pipeline.push(sid, piece, RATE_HZ)
        handles.append(pipeline.last_push(sid))
    assert [h.seq for h in handles] == list(range(6)) and all(h.stream_id == sid for h in handles)
    waiting = list(handles)
    while waiting:
        done = pipeline.completed(waiting, timeout_s=0.05)
        waiting = [h for h in waiting if h not in done]
    items = [h.item() for h in handles]
    assert all(i is not None and i.error is None and len(i.stage_times) == 8 for i in items)
    results += pipeline.close(sid)
    assert [r for i in items for r in i.data] == results[: sum(len(i.data) for i in items)]


def test_bad_input_and_unknown_streams(pipe: Pipe) -> None:
    pipeline = pipe.pipeline
    sid = pipeline.open_stream()
    with pytest.raises(AudioError):
        pipeline.push(sid, np.array([0.0, np.nan], dtype=np.float32), RATE_HZ)
    pipeline.push(sid, make_audio(1, 0.5), RATE_HZ)  # the stream is still usable
    assert pipeline.close(sid)[-1].is_final
    with pytest.raises(KeyError):
        pipeline.push(sid, make_audio(1, 0.1), RATE_HZ)
    with pytest.raises(ValueError):
        pipeline.open_stream(pipeline.open_stream("dup"))


def test_acoustic_actor_batches_and_reorders_exactly(pipe: Pipe) -> None:
    """Log-probs of interleaved streams, with calls arriving out of order, equal the
    in-process single-stream ``AcousticStage`` (a sensitive check of per-stream state)."""
    bundle = load_bundle(pipe.bundle)
    frame_ms = bundle.features.frame_ms
    chunk, right = frames_for_ms(STREAMING.chunk_ms, frame_ms), frames_for_ms(STREAMING.lookahead_ms, frame_ms)
    extractor = MfccExtractor(bundle.features, bundle.normalizer)
    features = {f"direct-{i}": extractor(torch.from_numpy(make_audio(i, 2.0 + 0.4 * i))) for i in range(3)}
    pieces = {sid: list(f.split(7)) for sid, f in features.items()}  # (<=7 frames, feature_dim) each
    calls = [(sid, seq) for sid, p in pieces.items() for seq in range(len(p))]
    random.Random(4).shuffle(calls)  # later chunks of a stream often arrive before earlier ones
    acoustic = pipe.pipeline.actors["acoustic"]
    refs = {(sid, seq): acoustic.process.remote(sid, seq, pieces[sid][seq], seq == len(pieces[sid]) - 1) for sid, seq in calls}
    for sid, feats in features.items():
        got = torch.cat([ray.get(refs[(sid, seq)])[0] for seq in range(len(pieces[sid]))])
        (want,) = AcousticStage(bundle.model, chunk, right).process([(sid, feats, True)])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_actor_placement_options(pipe: Pipe) -> None:
    """The acoustic and decoder actors hold their configured custom resources; with no GPU
    in the cluster the auto setting (-1) asks for none, an explicit one is passed through."""
    available = ray.available_resources()
    assert available.get("asr_acoustic", 0) == NODE_RESOURCES["asr_acoustic"] - 2  # acoustic_actors=0: two without a GPU
    assert "acoustic-2" in pipe.pipeline.actors
    assert available.get("asr_decoder", 0) == NODE_RESOURCES["asr_decoder"] - STREAMING.decoder_actors
    assert STREAMING.decoder_actors == 2 and "decoder-2" in pipe.pipeline.actors
    assert "GPU" not in ray.cluster_resources()
    assert acoustic_num_gpus(STREAMING) == 0
    assert acoustic_num_gpus(StreamingConfig(acoustic_num_gpus=0.5)) == 0.5
    assert acoustic_actor_count(STREAMING, num_gpus=0) == 2 and acoustic_actor_count(STREAMING, num_gpus=1) == 1
    assert acoustic_actor_count(StreamingConfig(acoustic_actors=3), num_gpus=1) == 3


def test_crashed_decoders_are_replayed_and_restart_for_new_streams(pipe: Pipe) -> None:
    """Both decoder actors crash mid-stream: the stream is replayed on the restarted ones and
    ends as if nothing happened (tests/test_stream_recovery.py kills every kind on real speech)."""
    if pipe.kind != "greedy":
        pytest.skip("restarts do not depend on the decoder kind; run once (greedy) to save a restart")
    pipeline = pipe.pipeline
    audio = make_audio(1, 3.0)
    pieces = [audio[i : i + 1600] for i in range(0, len(audio), 1600)]
    sid = pipeline.open_stream()
    got = [r for p in pieces[:10] for r in pipeline.push(sid, p, RATE_HZ)]
    for name in ("decoder", "decoder-2"):  # the stream decodes on one of them
        ray.kill(pipeline.actors[name], no_restart=False)  # a crash: Ray restarts it (max_restarts)
    got += [r for p in pieces[10:] for r in pipeline.push(sid, p, RATE_HZ)] + pipeline.close(sid)
    assert finals(got) == finals(reference(pipe, pieces))
    assert pipeline.stats.recoveries >= 1
    pieces = random_pieces(make_audio(2, 1.5), random.Random(5))
    got = run_interleaved(pipeline, {"after": (pieces, RATE_HZ)})["after"]
    assert finals(got) == finals(reference(pipe, pieces))


@pytest.mark.parametrize("bad", [{"max_inflight_chunks": 0}, {"decoder_actors": 0}, {"acoustic_actors": -1}, {"chunk_ms": 0},
                                 {"chunk_ms": -300}, {"lookahead_ms": -150}, {"endpoint_silence_ms": -5}, {"ingest_chunk_ms": 0},
                                 {"max_batch_streams": 0}, {"acoustic_num_gpus": -2}, {"lookahead_ms": float("nan")},
                                 {"chunk_ms": float("inf")}])
def test_bad_streaming_settings_fail_when_the_config_is_built(bad: dict) -> None:
    """Before any actor or Ray starts: the config cannot even be made, and from YAML or --set
    it is a one-line ConfigError naming the key."""
    from pipeline.config import ConfigError, load_config

    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        StreamingConfig(**bad)
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"streaming.{key}={bad[key]}"])


def test_bad_latency_on_the_command_line_is_exit_2(capsys) -> None:
    from pipeline.cli import main

    assert main(["stream", "--file", "nowhere.wav", "--lookahead-ms", "-150"]) == 2
    err = capsys.readouterr().err
    assert "lookahead_ms must be >= 0" in err and "Traceback" not in err


def test_voice_activity_gating_through_the_actors(local_ray) -> None:
    """With the detector on (the default), the feature actor's speech flags reach the decoder
    actors: real speech between stretches of faint noise gives exactly the in-process words,
    and a stream of faint noise only gives none. Shipped model, so there are real words.
    The ingest and decoder actors never import torch or torchaudio."""

    def torch_modules(actor: object) -> dict[str, bool]:
        """Runs inside a stage actor (``__ray_call__``; defined here so that Ray ships it by
        value): whether its process has imported torch and torchaudio."""
        import sys

        return {name: name in sys.modules for name in ("torch", "torchaudio")}

    from workers.audio.reader import load_audio
    from workers.data.augment import colored_noise
    from workers.model.bundle import DEFAULT_BUNDLE

    an4 = Path(__file__).resolve().parents[3] / "shared" / "data" / "an4" / "wav" / "an4_clstk"
    files = sorted((an4 / "mcfl").glob("*.raw"))[:2] + sorted((an4 / "ftal").glob("*.raw"))[:1]
    if not files or not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("needs AN4 and the shipped model")
    gen = torch.Generator().manual_seed(0)
    faint = (colored_noise(16000 * 3, 0.0, gen) * 1e-3).numpy()
    speech = np.concatenate([np.concatenate([faint[:16000], load_audio(f).numpy()]) for f in files] + [faint])
    config = AppConfig(streaming=StreamingConfig(chunk_ms=300, lookahead_ms=150, endpoint_silence_ms=600))
    assert config.vad.enabled
    rng = random.Random(4)
    streams = {"speech": (random_pieces(speech, rng), RATE_HZ), "noise": (random_pieces(faint, rng), RATE_HZ)}
    with StreamingPipeline(config, None, DecoderConfig(kind="beam")) as pipeline:
        got = run_interleaved(pipeline, streams)
        names = list(pipeline.actors)
        loaded = dict(zip(names, ray.get([pipeline.actors[n].__ray_call__.remote(torch_modules) for n in names], timeout=60)))
    # After real work, the ingest and decoder actors still run without torch (the memory it
    # costs); the feature and acoustic actors hold it, which shows that the probe sees it.
    torch_free = {name for name in loaded if name.startswith(("ingest", "decoder"))}
    assert torch_free == {"ingest", "decoder", "decoder-2"}
    for name, modules in loaded.items():
        assert modules == ({"torch": False, "torchaudio": False} if name in torch_free else {"torch": True, "torchaudio": True}), name
    for name, (pieces, _) in streams.items():
        rec = StreamingRecognizer(None, DecoderConfig(kind="beam"), 300, 150, 600, device="cpu")
        want = [r for p in pieces for r in rec.push(p, RATE_HZ)] + rec.finish()
        assert finals(got[name]) == finals(want), name
    spoken = [w for r in got["speech"] if r.is_final for w in r.words]
    assert len(spoken) >= 4
    assert all(r.text == "" and not r.words for r in got["noise"])


def test_the_stream_driver_does_not_import_torch_and_names_a_bundle_whose_weights_do_not_load(local_ray, tiny_bundle, tmp_path) -> None:
    """The stream drivers (`asr stream`, `asr serve`, the Vosk client) check the bundle without torch
    (``check_bundle``) and leave the weights to the actors: a fresh interpreter that imports them has
    no torch; weights that do not load stop the pipeline's start with the bundle's own error, naming
    the file as the user gave it (not the actors' unpacked copy)."""
    import shutil
    import subprocess
    import sys

    from workers.model.bundle_config import BundleError

    modules = "pipeline.streaming.session, pipeline.streaming.cli, pipeline.serve.cli, pipeline.serve.app, pipeline.serve.client, pipeline.bench.stream_memory"
    probe = f"import sys, {modules}; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[2], timeout=120).returncode == 0
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    (bad / "weights.pt").write_bytes(b"not a torch zip")
    with pytest.raises(BundleError, match=f"{bad / 'weights.pt'}: cannot be loaded"):
        StreamingPipeline(AppConfig(), bad)
