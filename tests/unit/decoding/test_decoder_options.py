"""Per-stream decoder options: word confidences, n-best alternatives, phrase lists
(workers.decoding.decoder, workers.stages.DecoderStage / StreamOptions, workers.recognizer, the
decoder actor), mostly on real held-out AN4 speech through the shipped model."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import NO_VAD

from pipeline.config import load_config
from workers.data.corpus import read_an4
from workers.decoding.decoder import (
    CtcDecoder,
    DecoderConfig,
    Hypothesis,
    WordTiming,
    alternative_confidences,
    normalize_phrases,
    word_confidences,
)
from workers.model.bundle import DEFAULT_BUNDLE, Bundle, load_bundle
from workers.model.tokens import TOKEN_TO_ID, TOKENS
from workers.recognizer import Recognizer, StreamingRecognizer, build_decoder, phrase_decoder, phrase_decoder_factory
from workers.stages import PHRASE_DECODER_CACHE, DecoderStage, RecognitionResult, StreamOptions

FRAME_MS = 30.0
#: Held-out utterances: the first three are recognised exactly by the shipped model and the default
#: decoder; the others have a misrecognised letter ("s m i t h" -> "s m i g h", "j s p s z" ->
#: "j s p s v", "n e g l e y" -> "m e g l e y").
TEXTS = ("three two seven", "one five two one three", "yes", "s m i t h", "j s p s z nine six nine", "n e g l e y")
#: The misrecognised utterance the phrase-list tests correct.
SPELLED = "j s p s z nine six nine"

needs_model = pytest.mark.skipif(not (DEFAULT_BUNDLE / "weights.pt").is_file(), reason="no shipped model")


# --- hand-made emissions ----------------------------------------------------------


def _posteriors(frames: list[dict[str, float]]) -> torch.Tensor:
    """(frames, 29) log-probs: the given token probabilities, the rest spread evenly."""
    probs = torch.zeros(len(frames), len(TOKENS))
    for t, spec in enumerate(frames):
        for token, p in spec.items():
            probs[t, TOKEN_TO_ID[token]] = p
        probs[t][probs[t] == 0] = (1 - sum(spec.values())) / (len(TOKENS) - len(spec))
    return probs.log()


def _word(word: str, first: int, last: int) -> WordTiming:
    """A word over frames first..last inclusive (end_s one frame after the last)."""
    return WordTiming(word, first * FRAME_MS / 1000, (last + 1) * FRAME_MS / 1000)


def test_word_confidences_known_answers() -> None:
    blank = {"-": 0.95}
    em = _posteriors([blank, blank, {"a": 0.9}, blank, blank, {"b": 0.9}, {"c": 0.4}, blank, blank, {"d": 0.7}, blank, blank])
    # one letter at 0.9 -> 0.9; two letters at 0.9 and 0.4 -> their geometric mean 0.6
    assert word_confidences(em, [_word("a", 2, 2)], FRAME_MS) == pytest.approx([0.9], abs=1e-5)
    assert word_confidences(em, [_word("bc", 5, 6)], FRAME_MS) == pytest.approx([0.6], abs=1e-5)
    # the span is widened by one frame each side, not more: "d" peaks at frame 9
    assert word_confidences(em, [_word("d", 10, 10)], FRAME_MS) == pytest.approx([0.7], abs=1e-5)
    assert word_confidences(em, [_word("d", 11, 11)], FRAME_MS)[0] < 0.01
    # times count from offset_s before frame 0; a word beyond the emissions gets 0
    shifted = WordTiming("a", 1.0 + 2 * FRAME_MS / 1000, 1.0 + 3 * FRAME_MS / 1000)
    assert word_confidences(em, [shifted, _word("a", 80, 81)], FRAME_MS, offset_s=1.0) == pytest.approx([0.9, 0.0], abs=1e-5)
    # spans clip to the emissions; a repeated letter counts once per occurrence
    assert word_confidences(em, [_word("ad", 0, 30)], FRAME_MS) == pytest.approx([math.sqrt(0.9 * 0.7)], abs=1e-5)
    assert word_confidences(em, [_word("aab", 2, 5)], FRAME_MS) == pytest.approx([0.9], abs=1e-5)
    assert word_confidences(em, [], FRAME_MS) == []


def test_alternative_confidences_are_a_softmax() -> None:
    confs = alternative_confidences([-1.0, -1.0 - math.log(3), -math.inf])
    assert confs == pytest.approx([0.75, 0.25, 0.0])
    assert alternative_confidences([-math.inf, -math.inf]) == [0.5, 0.5]
    assert alternative_confidences([-5000.0]) == [1.0]


def test_normalize_phrases() -> None:
    assert normalize_phrases(["  One  TWO ", "three", "[unk]", "one two", "it's [unk] yes"]) == ("one two", "three", "it's yes")
    with pytest.raises(ValueError, match=r"'nine9'.*\['9'\]"):
        normalize_phrases(["one", "nine9"])
    with pytest.raises(ValueError, match=r"'caf\xe9'.*\['\xe9'\]"):
        normalize_phrases(["café"])
    with pytest.raises(ValueError, match=r"'a-b'.*\['-'\]"):
        normalize_phrases(["a-b"])
    with pytest.raises(ValueError, match="no words"):
        normalize_phrases(["[unk]", "  "])
    with pytest.raises(ValueError, match="no words"):
        normalize_phrases([])
    with pytest.raises(ValueError, match="string"):
        normalize_phrases("one two")


def test_stream_options_validate_and_normalise() -> None:
    assert StreamOptions() == StreamOptions(0, ())
    assert StreamOptions(phrase_list=["Yes", "[unk]", "no  go"]).phrase_list == ("yes", "no go")  # type: ignore[arg-type]
    assert StreamOptions(max_alternatives=10).max_alternatives == 10
    for bad in (-1, 11, True, 2.0):
        with pytest.raises(ValueError, match="max_alternatives"):
            StreamOptions(max_alternatives=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'x1'"):
        StreamOptions(phrase_list=("x1",))
    with pytest.raises(ValueError, match="string"):
        StreamOptions(phrase_list="yes no")  # type: ignore[arg-type]


def _frames(tokens: str) -> torch.Tensor:
    """Peaky (frames, 29) log-probs, one character per frame ("-" blank, "|" separator)."""
    out = torch.full((len(tokens), len(TOKENS)), -12.0)
    out[torch.arange(len(tokens)), torch.tensor([TOKEN_TO_ID[c] for c in tokens])] = 0.0
    return out.log_softmax(-1)


def test_options_are_taken_per_utterance_and_forgotten_on_drop() -> None:
    stage = DecoderStage(CtcDecoder(DecoderConfig(kind="greedy"), FRAME_MS), endpoint_silence_ms=10 * FRAME_MS)
    two = StreamOptions(max_alternatives=2)
    speech = _frames("-ab-" + "-" * 12 + "-cd-" + "-" * 12)
    # the options given at the first push hold for the utterances after the endpoint, too
    results = stage.push("s", speech[:8], options=two) + stage.push("s", speech[8:])
    finals = [r for r in results if r.is_final]
    assert [r.text for r in finals] == ["ab", "cd"]
    assert all(len(r.alternatives) == 1 and r.alternatives[0].text == r.text for r in finals)  # greedy: one
    # confidences come from each utterance's own frames (word times relative to its start)
    assert finals[1].start_s > 0 and all(w.conf is not None and w.conf > 0.99 for r in finals for w in r.words)
    assert all(not r.alternatives and all(w.conf is None for w in r.words) for r in results if not r.is_final)
    assert stage.stream_count == 1 and stage._options == {"s": two}
    # a stream without options, beside it, gets none
    other = stage.push("t", speech, is_last=True)
    assert [r.text for r in other if r.is_final] == ["ab", "cd"] and not any(r.alternatives for r in other)
    assert stage.stream_count == 1
    stage.drop("s")
    assert stage.stream_count == 0 and not stage._options
    assert not any(r.alternatives for r in stage.push("s", speech, is_last=True))
    # a phrase list needs a phrase_decoder; options must be StreamOptions
    with pytest.raises(ValueError, match="phrase_decoder"):
        stage.push("u", speech, options=StreamOptions(phrase_list=("ab",)))
    with pytest.raises(TypeError, match="StreamOptions"):
        stage.push("u", speech, options={"max_alternatives": 2})  # type: ignore[arg-type]
    assert stage.stream_count == 0 and not stage._options


def test_phrase_decoders_are_cached_lru() -> None:
    built: list[tuple[str, ...]] = []

    def factory(phrases: tuple[str, ...]) -> CtcDecoder:
        built.append(phrases)
        return CtcDecoder(DecoderConfig(kind="greedy"), FRAME_MS)

    stage = DecoderStage(CtcDecoder(DecoderConfig(kind="greedy"), FRAME_MS), phrase_decoder=factory)
    em = _frames("-ab-")
    for stream in ("a", "b"):
        stage.push(stream, em, is_last=True, options=StreamOptions(phrase_list=("Yes", "no")))
    assert built == [("yes", "no")]  # one decoder for the same list
    for i in range(PHRASE_DECODER_CACHE):
        stage.push(f"s{i}", em, is_last=True, options=StreamOptions(phrase_list=("w" + "a" * i,)))
    assert len(stage._phrase_decoders) == PHRASE_DECODER_CACHE and ("yes", "no") not in stage._phrase_decoders
    stage.push("c", em, is_last=True, options=StreamOptions(phrase_list=("yes no",)))
    assert built[-1] == ("yes no",) and len(stage._phrase_decoders) == PHRASE_DECODER_CACHE
    assert stage.stream_count == 0


class _NBestDecoder:
    """Stand-in whose final n-best is scripted: "a b" (score 0), "a c" (-1), "a" (-1.5);
    "b" and "c" lie after 1 s."""

    frame_ms = FRAME_MS

    def begin(self) -> list:
        return []

    def step(self, state: list, emissions: torch.Tensor) -> Hypothesis:
        return Hypothesis("", [], 0.0)

    def end(self, state: list) -> Hypothesis:
        return self.end_nbest(state, 1)[0]

    def end_nbest(self, state: list, n: int) -> list[Hypothesis]:
        a, b, c = WordTiming("a", 0.1, 0.3), WordTiming("b", 1.5, 1.7), WordTiming("c", 1.5, 1.8)
        return [Hypothesis("a b", [a, b], 0.0), Hypothesis("a c", [a, c], -1.0), Hypothesis("a", [a], -1.5)][:n]


def test_alternatives_that_gating_makes_equal_are_merged() -> None:
    em = _frames("-" * 70)
    flags = torch.arange(70) * 0.032 < 0.5  # speech only in the first half second
    ungated = DecoderStage(_NBestDecoder()).push("s", em, is_last=True, options=StreamOptions(max_alternatives=3))[0]  # type: ignore[arg-type]
    scores = [0.0, -1.0, -1.5]
    assert [a.text for a in ungated.alternatives] == ["a b", "a c", "a"]
    assert [a.confidence for a in ungated.alternatives] == pytest.approx(alternative_confidences(scores))
    stage = DecoderStage(_NBestDecoder(), vad_pad_ms=0.0)  # type: ignore[arg-type]
    gated = stage.push("s", em, is_last=True, speech=flags, options=StreamOptions(max_alternatives=3))[0]
    assert [a.text for a in gated.alternatives] == ["a"] and gated.alternatives[0].confidence == pytest.approx(1.0)
    assert gated.text == "a" and [w.word for w in gated.words] == ["a"]


# --- real speech -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    if not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("no shipped model")
    return load_bundle()


@pytest.fixture(scope="module")
def speech(bundle: Bundle, an4_root: Path) -> dict[str, torch.Tensor]:
    """Log-probs of one held-out utterance per text in TEXTS (whole-utterance BiLSTM)."""
    speakers = set(load_config().data.an4_dev_speakers)
    utts = {}
    for u in read_an4(an4_root).utterances:
        if u.speaker in speakers and u.text in TEXTS:
            utts.setdefault(u.text, u)
    assert set(utts) == set(TEXTS)
    rec = Recognizer(bundle, vad=NO_VAD)
    return {text: rec.acoustic.offline([rec.features(u.audio)])[0] for text, u in utts.items()}


@pytest.fixture(scope="module")
def stage(bundle: Bundle) -> DecoderStage:
    config = DecoderConfig()
    return DecoderStage(build_decoder(bundle, config), phrase_decoder=phrase_decoder_factory(bundle, config))


def _decode(stage: DecoderStage, em: torch.Tensor, options: StreamOptions | None = None, stream: str = "s") -> list[RecognitionResult]:
    results = []
    for chunk in em.split(10):
        results += stage.push(stream, chunk, options=options)
    return results + stage.push(stream, em[:0], is_last=True)


def _final(results: list[RecognitionResult]) -> RecognitionResult:
    finals = [r for r in results if r.is_final]
    assert len(finals) == 1
    return finals[0]


@needs_model
def test_word_confidences_on_real_speech(stage: DecoderStage, speech: dict[str, torch.Tensor]) -> None:
    right, wrong = [], []
    for text, em in speech.items():
        result = _final(_decode(stage, em))
        assert result.words and all(w.conf is not None and 0.0 <= w.conf <= 1.0 for w in result.words)
        if text in TEXTS[:3]:  # recognised exactly: confident
            assert result.text == text
            assert sum(w.conf for w in result.words) / len(result.words) > 0.5  # type: ignore[misc]
        spoken = text.split()
        if len(spoken) == len(result.words):
            for said, word in zip(spoken, result.words, strict=True):
                (right if said == word.word else wrong).append(word.conf)
    # misrecognised words ("g" for "t", "v" for "z", "m" for "n") are on average less certain
    assert len(wrong) >= 3 and len(right) >= 10
    assert sum(wrong) / len(wrong) < sum(right) / len(right) - 0.1, (right, wrong)  # with the model shipped on 2026-12-05: about 0.47 against 0.9


@needs_model
def test_garbage_emissions_get_low_confidence(stage: DecoderStage, speech: dict[str, torch.Tensor]) -> None:
    clean = speech[TEXTS[0]]
    clean_confs = [w.conf for w in _final(_decode(stage, clean)).words]
    uniform = torch.full_like(clean, -math.log(len(TOKENS)))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    for garbage in (uniform, noise):
        words = _final(_decode(stage, garbage)).words
        assert words  # the LM search still spells something ...
        confs = [w.conf for w in words]
        assert max(confs) < min(clean_confs) and sum(confs) / len(confs) < 0.3  # type: ignore[type-var,arg-type] # ... with little confidence


@needs_model
def test_gating_keeps_confidences(bundle: Bundle, speech: dict[str, torch.Tensor]) -> None:
    em = speech["one five two one three"]
    config = DecoderConfig()
    plain = _final(DecoderStage(build_decoder(bundle, config)).push("s", em, is_last=True))
    gated_stage = DecoderStage(build_decoder(bundle, config), vad_pad_ms=0.0)
    cut = plain.words[2].start_s  # speech flags only before the third word
    flags = torch.arange(int(len(em) * FRAME_MS / 32) + 1) * 0.032 < cut - 0.05
    gated = _final(gated_stage.push("s", em, is_last=True, speech=flags))
    assert 0 < len(gated.words) < len(plain.words)
    assert [(w.word, w.conf) for w in gated.words] == [(w.word, w.conf) for w in plain.words[: len(gated.words)]]
    assert all(w.conf is not None for w in gated.words)


@needs_model
def test_nbest_alternatives_on_real_speech(stage: DecoderStage, speech: dict[str, torch.Tensor]) -> None:
    em = speech[SPELLED]
    plain = _final(_decode(stage, em))
    assert not plain.alternatives
    results = _decode(stage, em, StreamOptions(max_alternatives=3))
    assert all(not r.alternatives for r in results if not r.is_final)
    result = _final(results)
    alts = result.alternatives
    assert 2 <= len(alts) <= 3 and len({a.text for a in alts}) == len(alts)
    assert alts[0].text == result.text == plain.text and alts[0].words == result.words
    assert [a.confidence for a in alts] == sorted((a.confidence for a in alts), reverse=True)
    assert all(0.0 <= a.confidence <= 1.0 for a in alts) and sum(a.confidence for a in alts) == pytest.approx(1.0)
    assert all(w.conf is not None and 0 <= w.conf <= 1 for a in alts for w in a.words)
    assert result.words == plain.words  # asking for alternatives changes nothing else
    # the decoder's n-best: best first (what end() gives), distinct texts, at most n
    decoder = stage.decoder
    state = decoder.begin()
    decoder.step(state, em)
    nbest = decoder.end_nbest(state, 5)
    state = decoder.begin()
    decoder.step(state, em)
    assert nbest[0] == decoder.end(state)
    assert len(nbest) == 5 and len({h.text for h in nbest}) == 5
    assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)
    assert [a.text for a in alts] == [h.text for h in nbest[: len(alts)]]


@needs_model
def test_phrase_list_restricts_words(stage: DecoderStage, speech: dict[str, torch.Tensor]) -> None:
    em = speech[SPELLED]
    assert _final(_decode(stage, em)).text != SPELLED  # misrecognised without the list
    listed = StreamOptions(max_alternatives=2, phrase_list=("J S", "p s z", "nine six nine", "one two", "[unk]"))
    result = _final(_decode(stage, em, listed, stream="listed"))
    assert result.text == SPELLED
    vocabulary = {w for p in listed.phrase_list for w in p.split()}
    assert all(w.word in vocabulary for a in result.alternatives for w in a.words)
    # a list without the spoken words: only its words come out
    for text in ("three two seven", "one five two one three"):
        words = _final(_decode(stage, speech[text], StreamOptions(phrase_list=("yes", "no", "go")))).words
        assert {w.word for w in words} <= {"yes", "no", "go"}
    assert _final(_decode(stage, speech["yes"], StreamOptions(phrase_list=("yes", "no", "go")))).text == "yes"
    assert stage.stream_count == 0


@needs_model
def test_interleaved_streams_keep_their_own_options(stage: DecoderStage, speech: dict[str, torch.Tensor]) -> None:
    em = speech[SPELLED]
    plain = _final(_decode(stage, em)).text
    listed = StreamOptions(phrase_list=("j", "s", "p", "z", "nine", "six"))
    results: dict[str, list[RecognitionResult]] = {"plain": [], "listed": []}
    for chunk in em.split(7):
        results["plain"] += stage.push("plain", chunk)
        results["listed"] += stage.push("listed", chunk, options=listed if not results["listed"] else None)
        assert stage.stream_count == 2
    for stream in results:
        results[stream] += stage.push(stream, em[:0], is_last=True)
    assert _final(results["plain"]).text == plain
    assert _final(results["listed"]).text == SPELLED
    assert stage.stream_count == 0 and not stage._options


@needs_model
def test_phrase_decoder_lexicon_file_is_gone(bundle: Bundle, speech: dict[str, torch.Tensor], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    decoder = phrase_decoder(bundle, DecoderConfig(kind="greedy", beam_size=8), ["three two", "seven"])
    assert list(tmp_path.iterdir()) == []  # the lexicon was loaded and deleted
    assert decoder.config.kind == "beam" and decoder.config.beam_size == 8
    assert decoder.decode(speech["three two seven"]).text == "three two seven"
    with pytest.raises(ValueError, match="'se7en'"):
        phrase_decoder(bundle, DecoderConfig(), ["se7en"])


@needs_model
def test_streaming_recognizer_options(bundle: Bundle, an4_root: Path) -> None:
    import numpy as np

    from workers.audio.reader import load_audio

    speakers = set(load_config().data.an4_dev_speakers)
    utt = next(u for u in read_an4(an4_root).utterances if u.speaker in speakers and u.text == SPELLED)
    wave = load_audio(utt.audio).numpy().astype(np.float32)
    options = StreamOptions(max_alternatives=2, phrase_list=("j s p s z", "nine six nine"))
    rec = StreamingRecognizer(bundle, options=options)  # voice activity gating on
    for start in range(0, len(wave), 3200):
        rec.push(wave[start : start + 3200])
    finals = [r for r in rec.finish() if r.is_final]
    assert [r.text for r in finals] == [SPELLED]
    assert len(finals[0].alternatives) == 2 and all(w.conf is not None for w in finals[0].words)


@needs_model
def test_decoder_actor_builds_phrase_decoders_after_init(speech: dict[str, torch.Tensor]) -> None:
    from pipeline.streaming.actors import DecoderActor
    from pipeline.streaming.items import StageItem
    from pipeline.streaming.placement import read_bundle_files

    actor = DecoderActor(read_bundle_files(DEFAULT_BUNDLE), DecoderConfig(), 0.0, NO_VAD)  # bundle dir removed by now
    em = speech[SPELLED].numpy()
    options = StreamOptions(max_alternatives=2, phrase_list=(SPELLED,))
    items = [StageItem("listed", 0, False, em, options=options), StageItem("plain", 0, False, em)]
    items += [StageItem("listed", 1, True, em[:0]), StageItem("plain", 1, True, em[:0])]
    out = actor.push_many(0, items)
    assert all(i.error is None for i in out), [i.error for i in out]
    finals = {i.stream_id: r for i in out for r in i.data if r.is_final}
    assert finals["listed"].text == SPELLED and len(finals["listed"].alternatives) >= 1
    assert finals["plain"].text != SPELLED and not finals["plain"].alternatives
    assert actor.stage.stream_count == 0
    # unfit options fail that stream only
    bad = actor.push_many(0, [StageItem("bad", 0, False, em, options={"phrase_list": ["x"]})])
    assert "TypeError" in (bad[0].error or "") and actor.stage.stream_count == 0
