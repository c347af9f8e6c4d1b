"""The beam search on flashlight-text directly (workers.decoding.ctc_search, through workers.decoding.decoder)
gives what torchaudio's ``ctc_decoder`` wrapper gave: the same texts, word timings and scores,
bit for bit, on real log-probs of the shipped model (the reference is built here, with torch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import held_out_files
from torchaudio.models.decoder import ctc_decoder

from workers.audio.reader import load_audio
from workers.decoding.decoder import CtcDecoder, DecoderConfig, Hypothesis, _words_from_path, greedy_decode
from workers.decoding.lm import build_arpa
from workers.features.mfcc import MfccExtractor
from workers.model.bundle import DEFAULT_BUNDLE, load_bundle
from workers.model.tokens import SEPARATOR_ID, TOKENS

CONFIG = DecoderConfig(kind="beam", beam_size=16)
NBEST = 5


@pytest.fixture(scope="module")
def setup(an4_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shipped bundle's files, a character LM, and log-probs (frames, 29) of real utterances."""
    if not (DEFAULT_BUNDLE / "weights.pt").is_file():
        pytest.skip("no shipped model")
    bundle = load_bundle()
    extractor = MfccExtractor(bundle.features, bundle.normalizer)
    log_probs = []
    with torch.no_grad():
        for path in held_out_files(an4_root)[:5]:
            feats = extractor(load_audio(path))
            log_probs.append(bundle.model(feats[None], torch.tensor([len(feats)]))[0])
    words = [line.split()[0] for line in bundle.lexicon_path.read_text().splitlines() if line.strip()]
    spelled = [" ".join("|".join(words[i : i + 3])) for i in range(0, len(words), 3)]  # character LM sentences
    char_lm = build_arpa(spelled, order=4, path=tmp_path_factory.mktemp("char_lm") / "char.arpa")
    return {"bundle": bundle, "log_probs": log_probs, "char_lm": char_lm}


def files(setup: dict, kind: str) -> dict[str, Path | None]:
    b = setup["bundle"]
    return {
        "lexicon+lm": {"lexicon_path": b.lexicon_path, "lm_path": b.lm_path},
        "lexicon": {"lexicon_path": b.lexicon_path, "lm_path": None},
        "lexicon-free": {"lexicon_path": None, "lm_path": None},
        "lexicon-free+char-lm": {"lexicon_path": None, "lm_path": setup["char_lm"]},
    }[kind] | {"tokens_path": b.tokens_path}


def as_tuple(h: Hypothesis) -> tuple:
    return h.text, h.score, [(w.word, w.start_s, w.end_s) for w in h.words]


class TorchaudioReference:
    """What ``workers.decoding.decoder`` did through torchaudio's wrapper (per stream: ``ctc_decoder``'s
    ``CTCDecoder``, ``decode_step`` on CPU tensors, a separator frame before the end of a
    lexicon search, ``_to_hypo`` for the tokens and their timesteps)."""

    def __init__(self, lexicon_path: Path | None, lm_path: Path | None, tokens_path: Path, frame_ms: float) -> None:
        c = CONFIG
        self.lexicon, self.frame_ms = lexicon_path, frame_ms
        self.search = ctc_decoder(
            lexicon=str(lexicon_path) if lexicon_path else None, tokens=str(tokens_path), lm=str(lm_path) if lm_path else None,
            lm_dict=str(tokens_path) if lm_path and not lexicon_path else None, nbest=c.beam_size, beam_size=c.beam_size,
            beam_threshold=c.beam_threshold, lm_weight=c.lm_weight, word_score=c.word_score, unk_score=c.unk_score,
            sil_score=c.sil_score, blank_token=TOKENS[0], sil_token="|", unk_word="<unk>",
        )
        self.search.decode_begin()

    def step(self, log_probs: torch.Tensor) -> Hypothesis:
        self.search.decode_step(log_probs.contiguous())
        return self.hypotheses(final=False)[0]

    def end(self) -> list[Hypothesis]:
        if self.lexicon:
            separator = torch.full((1, len(TOKENS)), -1.0e4)
            separator[0, SEPARATOR_ID] = 0.0
            self.search.decode_step(separator)
        self.search.decode_end()
        return self.hypotheses(final=True)

    def hypotheses(self, final: bool) -> list[Hypothesis]:
        """The raw results converted by torchaudio: all, best first, or (a partial) the best only."""
        results = self.search.decoder.get_all_final_hypothesis()
        chosen = sorted(results, key=lambda r: -r.score) if final else [max(results, key=lambda r: r.score)]
        out = []
        for hyp in self.search._to_hypo(chosen):
            pairs = [(t, f) for t, f in zip(hyp.tokens.tolist(), (hyp.timesteps - 1).tolist()) if f >= 0]
            starts = [f for _, f in pairs]
            words = _words_from_path([t for t, _ in pairs], starts, starts, self.frame_ms)
            if self.lexicon and final:  # the lexicon search's own word list says the same (partials end in prefixes)
                assert [w.word for w in words] == hyp.words
            out.append(Hypothesis(" ".join(w.word for w in words), words, float(hyp.score)))
        return out


@pytest.mark.parametrize("kind", ["lexicon+lm", "lexicon", "lexicon-free", "lexicon-free+char-lm"])
def test_beam_search_equals_torchaudios_wrapper(setup: dict, kind: str) -> None:
    """Partials after each 10-frame chunk, the final best and the n best distinct texts."""
    paths = files(setup, kind)
    frame_ms = setup["bundle"].features.frame_ms
    decoder = CtcDecoder(CONFIG, frame_ms, **paths)
    texts = set()
    for log_probs in setup["log_probs"]:
        reference = TorchaudioReference(paths["lexicon_path"], paths["lm_path"], paths["tokens_path"], frame_ms)
        state = decoder.begin()
        for chunk in log_probs.split(10):
            assert as_tuple(decoder.step(state, chunk.numpy())) == as_tuple(reference.step(chunk))
        want = reference.end()
        distinct: dict[str, Hypothesis] = {}
        for hyp in want:
            distinct.setdefault(hyp.text, hyp)
        got = decoder.end_nbest(state, NBEST)
        assert [as_tuple(h) for h in got] == [as_tuple(h) for h in list(distinct.values())[:NBEST]]
        assert as_tuple(decoder.decode(log_probs)) == as_tuple(want[0])  # offline, from a torch tensor
        texts.add(got[0].text)
        assert len(got) > 1  # real alternatives were compared
    assert len(texts) == len(setup["log_probs"]) and all(texts)  # different utterances, real words


def test_greedy_takes_tensors_and_arrays_alike(setup: dict) -> None:
    frame_ms = setup["bundle"].features.frame_ms
    for log_probs in setup["log_probs"]:
        hyp = greedy_decode(log_probs, frame_ms)
        assert as_tuple(greedy_decode(log_probs.numpy(), frame_ms)) == as_tuple(hyp)
        assert as_tuple(greedy_decode(log_probs.double().requires_grad_(), frame_ms)) == as_tuple(hyp)
        best = log_probs.max(dim=1)
        assert hyp.score == math.fsum(best.values.tolist()) and [t for t in best.indices.tolist() if t] != []
