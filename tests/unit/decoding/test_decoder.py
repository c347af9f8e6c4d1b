"""CTC decoding (workers.decoding.decoder) on hand-built log-probability emissions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import emissions

from workers.decoding.decoder import CtcDecoder, DecoderConfig, Hypothesis, WordTiming, greedy_decode
from workers.decoding.lm import build_arpa, vocabulary, write_lexicon, write_tokens
from workers.model.tokens import TOKEN_TO_ID, TOKENS

FRAME_MS = 30.0
BAT_CORPUS = ["the bat sat", "a bat sat on the mat", "the cat sat on the mat", "the bat ate"]
BET_CORPUS = [s.replace("bat", "bet") for s in BAT_CORPUS]
WORDS = vocabulary(BAT_CORPUS + BET_CORPUS)


def noisy(path: str, seed: int) -> torch.Tensor:
    """Emissions favouring ``path`` (one character per frame) with random competitors."""
    generator = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(len(path), len(TOKENS), generator=generator)
    logits[torch.arange(len(path)), [TOKEN_TO_ID[c] for c in path]] += 4.0
    return logits.log_softmax(dim=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoder")
    spelled = [" ".join(s.replace(" ", "|")) for s in BAT_CORPUS]  # character LM sentences
    return {
        "tokens": write_tokens(root / "tokens.txt"),
        "lexicon": write_lexicon(WORDS, root / "lexicon.txt"),
        "bat_lm": build_arpa(BAT_CORPUS, order=3, path=root / "bat.arpa"),
        "bet_lm": build_arpa(BET_CORPUS, order=3, path=root / "bet.arpa"),
        "char_lm": build_arpa(spelled, order=5, path=root / "char.arpa"),
    }


def beam(files: dict[str, Path], lm: str | None, lexicon: bool = True, **config: float) -> CtcDecoder:
    return CtcDecoder(
        DecoderConfig(kind="beam", **config),
        FRAME_MS,
        lexicon_path=files["lexicon"] if lexicon else None,
        lm_path=files[lm] if lm else None,
        tokens_path=files["tokens"],
    )


# --- greedy -------------------------------------------------------------------


def test_greedy_text_and_word_times() -> None:
    # frames:  0 1 2 3 4 5 6 7 8 9 10 11 12 13
    path = list("-hh-i||--yo-o-")
    hyp = greedy_decode(emissions(path), FRAME_MS)
    assert hyp.text == "hi yoo"
    assert [w.word for w in hyp.words] == ["hi", "yoo"]
    # "hi": h from frame 1, i ends at frame 4 -> [0.03, 0.15); "yoo": frames 9..12 -> [0.27, 0.39)
    assert [t for w in hyp.words for t in (w.start_s, w.end_s)] == pytest.approx([0.03, 0.15, 0.27, 0.39])
    assert hyp.score == pytest.approx(len(path) * math.log(1 - 1e-4), rel=1e-3)


def test_greedy_argmax_and_frame_duration() -> None:
    frames: list[str | dict[str, float]] = ["-", {"a": 0.4, "o": 0.3, "-": 0.3}, {"-": 0.6, "b": 0.4}, "b"]
    hyp = greedy_decode(emissions(frames), 10.0)
    assert hyp == Hypothesis("ab", [WordTiming("ab", 0.01, 0.04)], pytest.approx(hyp.score))
    assert hyp.score == pytest.approx(math.log(0.4) + math.log(0.6) + 2 * math.log(1 - 1e-4), rel=1e-3)


def test_greedy_decoder_streaming_equals_offline() -> None:
    em = noisy("-the||cat--sat|on-the|-mat--", seed=1)
    decoder = CtcDecoder(DecoderConfig(kind="greedy"), FRAME_MS)
    offline = decoder.decode(em)
    assert offline == greedy_decode(em, FRAME_MS)
    for size in (1, 4, 9):
        state = decoder.begin()
        partials = [decoder.step(state, chunk) for chunk in em.split(size)]
        assert decoder.end(state) == offline
        assert partials[-1] == offline
        assert offline.text.startswith(partials[len(partials) // 2].text.rsplit(" ", 1)[0])


# --- beam search ----------------------------------------------------------------

AMBIGUOUS = ["-", "t", "h", "e", "|", "b"]  # "the b?t sat": a/e is the acoustic doubt
TAIL = ["t", "|", "s", "a", "-", "t", "-"]


@pytest.mark.parametrize(("lm", "expected"), [("bat_lm", "the bat sat"), ("bet_lm", "the bet sat")])
def test_lm_resolves_equal_acoustic_evidence(files: dict[str, Path], lm: str, expected: str) -> None:
    em = emissions([*AMBIGUOUS, {"a": 0.5, "e": 0.5}, *TAIL])
    assert beam(files, lm).decode(em).text == expected


def test_lm_overrides_slightly_better_acoustics(files: dict[str, Path]) -> None:
    em = emissions([*AMBIGUOUS, {"a": 0.4, "e": 0.6}, *TAIL])
    assert beam(files, None).decode(em).text == "the bet sat"
    assert beam(files, "bet_lm").decode(em).text == "the bet sat"
    assert beam(files, "bat_lm").decode(em).text == "the bat sat"
    assert beam(files, "bat_lm", lm_weight=0.0).decode(em).text == "the bet sat"


def test_character_lm_without_lexicon(files: dict[str, Path]) -> None:
    em = emissions([*AMBIGUOUS, {"a": 0.4, "e": 0.6}, *TAIL])
    assert beam(files, None, lexicon=False).decode(em).text == "the bet sat"
    hyp = beam(files, "char_lm", lexicon=False).decode(em)
    assert hyp.text == "the bat sat"  # spaces kept: LM indices follow tokens.txt


def test_last_word_kept_without_trailing_separator(files: dict[str, Path]) -> None:
    em = emissions(list("-the|cat"))  # the model emits no "|" after the last word
    hyp = beam(files, None).decode(em)
    assert hyp.text == "the cat"
    assert hyp.score > -0.01  # no frame had to be spent on an unlikely separator


@pytest.mark.parametrize("lm", [None, "bat_lm"])
def test_final_words_are_lexicon_words_when_audio_stops_mid_word(files: dict[str, Path], lm: str | None) -> None:
    hyp = beam(files, lm).decode(emissions(list("-the|ca")))  # "ca" is no word
    assert hyp.words and all(w.word in WORDS for w in hyp.words)


def test_beam_word_times(files: dict[str, Path]) -> None:
    # frames: 0 1 2 3 4 5 6 7 8 9 10 11
    em = emissions(list("--the||-cat-"))
    words = beam(files, "bat_lm").decode(em).words
    assert [w.word for w in words] == ["the", "cat"]
    # start: first frame of the first letter; end: one frame after the last letter starts
    assert [t for w in words for t in (w.start_s, w.end_s)] == pytest.approx([0.06, 0.15, 0.24, 0.33])


SENTENCE = "--the||-cat--sat|-on|the--|mat---"


@pytest.mark.parametrize(("lm", "lexicon"), [("bat_lm", True), (None, True), (None, False), ("char_lm", False)])
@pytest.mark.parametrize("size", [1, 5, 13])
def test_beam_streaming_equals_offline(files: dict[str, Path], lm: str | None, lexicon: bool, size: int) -> None:
    decoder = beam(files, lm, lexicon=lexicon, beam_size=8)
    em = noisy(SENTENCE, seed=size)
    offline = decoder.decode(em)
    assert offline.text  # a real sentence came out
    state = decoder.begin()
    for chunk in em.split(size):
        decoder.step(state, chunk)
    assert decoder.end(state) == offline


def test_concurrent_streams_do_not_share_state(files: dict[str, Path]) -> None:
    decoder = beam(files, "bat_lm")
    ems = [noisy(SENTENCE, seed=7), noisy("-a-|bat||ate---", seed=8), noisy("|mat|on-the-cat|", seed=9)]
    offline = [decoder.decode(em) for em in ems]
    assert len({h.text for h in offline}) == 3
    states = [decoder.begin() for _ in ems]
    chunks = [list(em.split(4)) for em in ems]
    for i in range(max(len(c) for c in chunks)):  # interleave the streams chunk by chunk
        for state, stream_chunks in zip(states, chunks, strict=True):
            if i < len(stream_chunks):
                decoder.step(state, stream_chunks[i])
    assert [decoder.end(state) for state in states] == offline


def test_partial_hypothesis_grows(files: dict[str, Path]) -> None:
    decoder = beam(files, "bat_lm")
    state = decoder.begin()
    em = emissions(list("--the||-cat--sat-"))
    assert decoder.step(state, em[:6]).text == "the"
    assert decoder.step(state, em[6:10]).text == "the ca"  # unfinished word shown
    decoder.step(state, em[10:])
    assert decoder.end(state).text == "the cat sat"
    with pytest.raises(RuntimeError, match="ended"):
        decoder.step(state, em[:1])


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("kind", "viterbi"),
        ("beam_size", 0),
        ("beam_threshold", 0.0),
        ("lm_weight", -1.0),
        ("lm_weight", math.inf),
        ("word_score", math.nan),
        ("sil_score", -math.inf),
        ("unk_score", math.inf),
    ],
)
def test_config_errors_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"decoder\.{key}"):
        DecoderConfig(**{key: value})


def test_config_defaults_are_valid() -> None:
    config = DecoderConfig()
    assert config.kind == "beam" and config.beam_size >= 1
    assert DecoderConfig(unk_score=-math.inf).unk_score == -math.inf


def test_bad_inputs_rejected(files: dict[str, Path], tmp_path: Path) -> None:
    decoder = CtcDecoder(DecoderConfig(kind="greedy"), FRAME_MS)
    with pytest.raises(ValueError, match=r"\(frames, 29\).*\(4, 28\)"):
        decoder.decode(torch.zeros(4, 28))
    with pytest.raises(ValueError, match="frame_ms"):
        CtcDecoder(DecoderConfig(), 0.0)
    wrong = tmp_path / "tokens.txt"
    wrong.write_text("\n".join(reversed(TOKENS)))
    with pytest.raises(ValueError, match="tokens.txt"):
        CtcDecoder(DecoderConfig(), FRAME_MS, lexicon_path=files["lexicon"], tokens_path=wrong)


def test_extra_words_are_spelled_though_no_training_text_has_them(files: dict[str, Path]) -> None:
    """``decoder.extra_words`` (``--words FILE``): the bundle's lexicon plus those words; without
    them the search can only spell lexicon words, with them the new word comes out (the LM
    scores it as <unk>, its floor), and the lexicon's own words still decode."""
    from types import SimpleNamespace

    from workers.decoding.stage import build_decoder

    bundle = SimpleNamespace(features=SimpleNamespace(frame_ms=FRAME_MS), lexicon_path=files["lexicon"],
                             lm_path=files["bat_lm"], tokens_path=files["tokens"])
    spoken = emissions(list("the|-zebra-") + ["-"])
    assert "zebra" not in build_decoder(bundle, DecoderConfig(kind="beam")).decode(spoken).text
    extended = build_decoder(bundle, DecoderConfig(kind="beam", extra_words=("Zebra", "zebra")))
    assert extended.decode(spoken).text == "the zebra"
    assert extended.decode(emissions(list("the|bat|sat-"))).text == "the bat sat"
    with pytest.raises(ValueError, match="cannot spell"):
        DecoderConfig(extra_words=("z3bra",))
