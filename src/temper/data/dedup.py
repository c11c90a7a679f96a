"""Deduplication and decontamination of a corpus: which documents to drop, decided globally.

Three tools, each split into a per-document part that runs in worker processes and a global
part that sees every document at once (the caller, `temper prepare`, saves the per-document
arrays of each input unit to disk in between, so memory stays O(documents), never O(text)):

- exact: `exact_keys` hashes each document's normalised text to a uint64;
  `find_exact_duplicates` keeps the first document of each key.
- near: `MinHasher.signatures` gives each document a MinHash signature of its word shingles
  (Broder 1997, "On the resemblance and containment of documents") and `MinHasher.band_keys`
  its LSH band keys (Indyk & Motwani 1998; banding as in Leskovec et al., "Mining of Massive
  Datasets", ch. 3); `find_near_duplicates` pairs documents that share a band key, verifies
  each pair by its estimated Jaccard similarity, clusters them with union-find and keeps the
  lowest index of each cluster.
- decontamination: `NgramIndex` holds the hashed word 13-grams of evaluation sets (GPT-3,
  Brown et al. 2020, appendix C); `overlaps` counts a document's n-grams found in it.

Every hash is a fixed function of the text (no Python `hash()`, no per-process salt), so the
same document gets the same keys, signature and n-grams in any process, run or batch.

How the text becomes words, vectorised: a batch of documents is joined into one array of
code points; a table per code point applies NFKC and lowercasing, deletes punctuation, symbols,
control characters and combining marks, maps digits to 0 and all whitespace to a space; runs of
spaces and of digits collapse. Each word is hashed with a polynomial over its code points
through prefix sums (one pass, no Python loop per word), and a shingle's hash combines its
words' hashes. The MinHash itself is rensa's (Rust); see `MinHasher` for the benchmark that
chose it.

It does not read files, write the per-unit arrays, or decide which evaluation files to load:
that is `temper prepare`'s job (pipeline.py). It does not filter for quality (filters.py).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose normalised text (see `normalize`) was seen before; the first one is kept."""
    near: bool = False
    """MinHash LSH near-duplicate removal: of each cluster of similar documents the first is kept."""
    shingle_size: int = 5
    """Words per shingle, the unit of the Jaccard similarity (a shorter document is one shingle)."""
    num_perm: int = 128
    """MinHash signature length: the Jaccard estimate's standard error is about sqrt(J(1-J)/num_perm)."""
    bands: int = 16
    """LSH bands; num_perm must be divisible by it. More bands find pairs of lower similarity."""
    threshold: float = 0.8
    """Estimated Jaccard similarity at or above which a candidate pair is a near-duplicate."""
    seed: int = 1
    """Seed of the MinHash permutations; signatures made with different seeds cannot be compared."""

    def __post_init__(self) -> None:
        for name in ("shingle_size", "num_perm", "bands"):
            if getattr(self, name) < 1:
                raise ValueError(f"dedup.{name}={getattr(self, name)} must be at least 1")
        if self.num_perm % self.bands:
            raise ValueError(f"dedup.bands={self.bands}: dedup.num_perm={self.num_perm} must be divisible by it")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup.threshold={self.threshold} must be in (0, 1]")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"dedup.seed={self.seed} must be in [0, 2**64)")


# ---------------------------------------------------------------------------------------------
# Normalisation and word hashes
# ---------------------------------------------------------------------------------------------

_SPACE, _ZERO, _DELETE = 0x20, 0x30, 0
_MULTI = 0x110000  # beyond Unicode: this code point becomes several characters
# Code points handled in one vectorised pass; also the period of the position-power tables.
# 1M code points keep the pass's temporaries near 50 MB and in a warm allocator.
_SEGMENT = 1 << 20
# Base of the polynomial word hash: any odd 64-bit number is invertible mod 2**64, which the
# prefix-sum trick needs; this one is the golden-ratio constant (splitmix64).
_BASE = 0x9E3779B97F4A7C15


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), elementwise on uint64: every output bit
    depends on every input bit, which the polynomial and linear combinations below lack."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _constants(n: int, salt: int) -> np.ndarray:
    """n odd uint64 multipliers, a fixed function of (n, salt): the same in every process."""
    x = (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(_BASE) + np.uint64(salt)
    return _splitmix(x) | np.uint64(1)


def _fold(ch: str) -> str:
    """What one character becomes: see `normalize`."""
    out = []
    for x in unicodedata.normalize("NFKC", ch).lower():
        cat = unicodedata.category(x)
        if x.isspace():
            out.append(" ")
        # P*, S*: punctuation and symbols; C*: control, format (zero-width joiner, soft hyphen),
        # surrogates, private use, unassigned; Mn: combining marks, i.e. the diacritics that
        # datatrove's simplify_text strips after NFD.
        elif cat[0] in "PSC" or cat == "Mn":
            continue
        elif cat == "Nd":
            out.append("0")
        elif cat[0] == "L" and unicodedata.decomposition(x):
            base = "".join(y for y in unicodedata.normalize("NFD", x) if unicodedata.category(y) != "Mn")
            out.append(base if len(base) == 1 else x)  # é -> e
        else:
            out.append(x)
    folded = "".join(out)
    return "σ" if folded == "ς" else folded  # str.lower() picks the final sigma by context


@functools.cache
def _char_table() -> tuple[np.ndarray, dict[int, str]]:
    """(table, expansions): what each code point becomes (`_fold`) as one code point, _DELETE, or
    _MULTI with its several characters in `expansions` (about 900 of them: "ﬁ", "½", "ǆ"...).
    Built once per process (about 0.3 s) from this Python's unicodedata."""
    table = np.arange(0x110000, dtype=np.uint32)
    table[0xF0000:] = _DELETE  # planes 15-16: private use
    expansions = {}
    for cp in (*range(0x30000), *range(0xE0000, 0xE1000)):  # planes 3-13 hold letters or nothing
        ch = chr(cp)
        if unicodedata.category(ch) == "Lo" and not unicodedata.decomposition(ch):
            continue  # CJK ideographs, kana, Hangul syllables, ...: themselves, and most of the loop
        folded = _fold(ch)
        if len(folded) == 1:
            table[cp] = ord(folded)
        elif folded:
            table[cp] = _MULTI
            expansions[cp] = folded
        else:
            table[cp] = _DELETE
    return table, expansions


@functools.cache
def _power_tables() -> tuple[np.ndarray, np.ndarray]:
    """_BASE**i and _BASE**-i mod 2**64 for i < _SEGMENT (8 MB each, once per process)."""
    inv = pow(_BASE, -1, 1 << 64)
    pw = np.empty(_SEGMENT, np.uint64)
    ipw = np.empty(_SEGMENT, np.uint64)
    pw[0] = ipw[0] = 1
    pw[1:] = _BASE
    ipw[1:] = inv
    np.cumprod(pw, out=pw)  # uint64 products wrap: exactly mod 2**64
    np.cumprod(ipw, out=ipw)
    return pw, ipw


def _groups(texts: Iterable[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The texts, in order, in groups of at most _SEGMENT code points (a longer text alone):
    (c, starts, ends) per group, c the normalised code points of " " + t0 + " " + t1 + ... + " "
    (uint32; single spaces, digit runs as one 0), starts/ends where each text's characters are
    in it. A text's slice has no leading space and at most one trailing one. Within a multi-text
    group every position stays below _SEGMENT, which `_word_hashes` relies on."""
    group: list[str] = []
    size = 1
    for text in texts:
        if group and size + len(text) + 1 > _SEGMENT:
            yield from _map_group(group)
            group, size = [], 1
        group.append(text)
        size += len(text) + 1
    if group:
        yield from _map_group(group)


def _map_group(group: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    table, expansions = _char_table()
    big = " " + " ".join(group) + " "
    # surrogatepass: a lone surrogate (from a JSON escape) is deleted by the table, not an error.
    cp = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), np.uint32)
    c = table[cp]
    seps = np.zeros(len(group) + 1, np.int64)  # the joining spaces, which are always kept
    np.cumsum(np.fromiter((len(t) + 1 for t in group), np.int64, len(group)), out=seps[1:])
    multi = np.flatnonzero(c == _MULTI)
    if len(multi):  # rare: expand those texts with str.translate, then map the group again
        for i in np.unique(np.searchsorted(seps, multi) - 1).tolist():
            group[i] = group[i].translate(expansions)
        if len(group) > 1 and sum(len(t) + 1 for t in group) + 1 > _SEGMENT:
            half = len(group) // 2
            yield from _map_group(group[:half])
            yield from _map_group(group[half:])
        else:
            yield from _map_group(group)  # expansions are final: no _MULTI left
        return
    # Removed characters are few (punctuation, repeated spaces): positions are mapped through
    # their sorted list, cheaper than a prefix count over every character.
    gone = np.flatnonzero(c == _DELETE)
    seps -= np.searchsorted(gone, seps)
    c = np.delete(c, gone) if len(gone) else c
    # datatrove collapses digit runs after removing punctuation ("1,000" -> "0"); whitespace is
    # collapsed last here so that a removed " - " leaves a single space.
    sp = c == _SPACE
    dg = c == _ZERO
    gone = np.flatnonzero((sp[1:] & sp[:-1]) | (dg[1:] & dg[:-1])) + 1
    starts = seps[:-1] + 1
    starts -= np.searchsorted(gone, starts)
    ends = seps[1:] - np.searchsorted(gone, seps[1:])
    if len(gone):
        c = np.delete(c, gone)
    yield c, starts, ends


def normalize_many(texts: Iterable[str]) -> list[str]:
    """`normalize` of each text, vectorised over the batch (much faster than one call per text)."""
    out: list[str] = []
    for c, starts, ends in _groups(texts):
        s = c.tobytes().decode("utf-32-le")
        out += [s[a:b].rstrip(" ") for a, b in zip(starts.tolist(), ends.tolist())]
    return out


def normalize(text: str) -> str:
    """The text that exact dedup compares, and whose words MinHash and n-grams use.

    datatrove's `simplify_text` (the normaliser of its exact and MinHash dedup): lowercase,
    punctuation removed, diacritics stripped, each run of digits -> "0", whitespace collapsed to
    one space and stripped; with two changes: Unicode NFKC (full-width letters, ligatures and
    other compatibility forms become plain letters: "ﬁ" -> "fi"), and "punctuation" is every
    Unicode punctuation, symbol and control character (categories P*, S*, C*) rather than
    datatrove's list of common ones. Removed characters join their neighbours ("don't" -> "dont").
    All of it is done per code point, by a table, which is what makes it fast: NFKC's composition
    of sequences is skipped (it only joins a letter with the marks that are stripped anyway, and
    decomposed Hangul jamo), and a final sigma is folded to σ ("ΟΔΟΣ" and "οδος" agree).
    """
    return normalize_many([text])[0]


def exact_keys(texts: Sequence[str]) -> np.ndarray:
    """(N,) uint64: an 8-byte BLAKE2b of each normalised text (utf-8), the same in every process."""
    keys = np.empty(len(texts), np.uint64)
    for i, s in enumerate(normalize_many(texts)):
        keys[i] = int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")
    return keys


def _word_hashes(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, offsets): a uint64 per word of every normalised text, in order, and where each
    text's words begin (len(texts) + 1 offsets)."""
    pw, ipw = _power_tables()
    hashes, counts = [], []
    for c, starts, ends in _groups(texts):
        n = len(c)
        sp = c == _SPACE
        w_start = np.flatnonzero(~sp[1:] & sp[:-1]) + 1  # c[0] is a space: no word starts at 0
        w_end = np.flatnonzero(~sp[:-1] & sp[1:]) + 1  # c[-1] is a space: every word ends
        # hash(word) = sum_j c[s + j] * B**j mod 2**64 = (P[e] - P[s]) * B**-s with prefix sums
        # P[i] = sum_{k<i} c[k] * B**k: one vectorised pass for all words (Karp & Rabin 1987).
        if n <= _SEGMENT:
            weighted = c * pw[:n]
            inv = ipw[w_start]
        else:  # one text longer than _SEGMENT: positions wrap, a word across a wrap hashes
            pos = np.arange(n) & (_SEGMENT - 1)  # differently but still only by this text
            weighted = c * pw[pos]
            inv = ipw[w_start & (_SEGMENT - 1)]
        prefix = np.zeros(n + 1, np.uint64)
        np.cumsum(weighted, out=prefix[1:])
        hashes.append(_splitmix((prefix[w_end] - prefix[w_start]) * inv))
        counts.append(np.diff(np.searchsorted(w_start, np.append(starts, ends[-1]))))
    offsets = np.zeros(sum(len(x) for x in counts) + 1, np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=offsets[1:])
    return (np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)), offsets


def _gram_hashes(words: np.ndarray, offsets: np.ndarray, n: int, salt: int,
                 short: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of n consecutive words inside each text -> (hashes, offsets per text).
    short=True: a text of 1..n-1 words gets one gram of all its words (MinHash shingles);
    short=False: it gets none (decontamination n-grams)."""
    mult = _constants(n, salt)
    count = np.diff(offsets)
    num = np.maximum(count - n + 1, 0)
    partial = np.zeros(len(count), np.uint64)
    is_short = (count > 0) & (count < n) if short else np.zeros(len(count), bool)
    num[is_short] = 1
    # acc[i] = sum_j words[i + j] * mult[j]: a linear hash of the gram starting at word i (only
    # starts whose gram stays inside its text are used); mixed below, so order matters and
    # repeated words do not cancel.
    acc = words * mult[0]
    for j in range(1, n):
        done = is_short & (count == j)
        partial[done] = acc[offsets[:-1][done]]
        if j < len(acc):
            acc[: len(acc) - j] += words[j:] * mult[j]
    gram_offsets = np.zeros(len(count) + 1, np.int64)
    np.cumsum(num, out=gram_offsets[1:])
    first = np.repeat(offsets[:-1] - gram_offsets[:-1], num)
    grams = acc[np.arange(gram_offsets[-1]) + first] if len(first) else np.zeros(0, np.uint64)
    grams[gram_offsets[:-1][is_short]] = partial[is_short]
    return _splitmix(grams), gram_offsets


# ---------------------------------------------------------------------------------------------
# MinHash
# ---------------------------------------------------------------------------------------------

_EMPTY_SLOT = np.uint32(0xFFFFFFFF)  # every slot of a document without a word


def _rensa() -> ModuleType:
    try:
        import rensa
    except ImportError as e:  # an extra: exact dedup and decontamination work without it
        raise ImportError("near-duplicate removal (dedup.near) needs rensa: pip install 'temper[data]'") from e
    return rensa


class MinHasher:
    """MinHash signatures of word shingles (rensa's R-MinHash over shingle hashes made here).

    Why rensa (MIT, Rust, maintained; the `data` extra) over a MinHash of our own: measured side
    by side by benchmarks/data_throughput.py --docs 0 --steps (one core, 17,556 WikiText-2
    paragraphs, 10.5 MB, num_perm=128, 5-word shingles, the same shingle hashes, a shared
    machine: ranges over runs): rensa 0.31-0.39 s (0.03 s of sketching, the rest copying its
    Python-list output into numpy), a numpy MinHash ((a*x + b) >> 32 as a (num_perm, shingles)
    array, min-reduced per document) 1.5-1.8 s. The whole of `signatures` took 0.52-0.60 s:
    15-20x faster than datasketch on the same shingles (9-10.5 s) and 2.5-3.4x faster than rensa
    fed shingle strings as its README does; on the 629 whole articles (10.7 MB, --split article)
    0.33-0.37 s, 11-14x datasketch, 2.8-4x rensa with strings. rensa's signature is a fixed
    function of (token hashes, num_perm, seed): equal across processes (tests/data/test_dedup.py).
    Its full-set R-MinHash (Fast Similarity Sketching, Dahlgaard, Knudsen & Thorup 2017) is used,
    not its "rho" sketch, which samples token positions and so depends on order and length.
    Its batch calls run on a Rayon pool of one thread per core: worker processes that already
    fill the cores set RAYON_NUM_THREADS=1 before their first call.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        rensa = _rensa()
        self.cfg = cfg
        self.rows = cfg.num_perm // cfg.bands
        # Signatures are valid only between equal algorithms: callers that cache them on disk
        # compare this string (rensa's sketch and this Python's Unicode tables are in it).
        self.algorithm = (f"temper-minhash-1;rensa-r-minhash-{rensa.RMinHash.ALGORITHM_VERSION};"
                          f"unicode-{unicodedata.unidata_version};k={cfg.shingle_size};"
                          f"perm={cfg.num_perm};seed={cfg.seed}")

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(N, num_perm) uint32, a fixed function of each text, cfg.shingle_size, num_perm, seed."""
        words, offsets = _word_hashes(texts)
        shingles, rows = _gram_hashes(words, offsets, self.cfg.shingle_size, salt=1, short=True)
        n = len(offsets) - 1
        if n == 0:
            return np.zeros((0, self.cfg.num_perm), np.uint32)
        matrix = _rensa().RMinHash.digest_matrix_from_flat_token_hashes(
            shingles, rows.astype(np.uint64), self.cfg.num_perm, self.cfg.seed)
        # rensa hands its matrix back only as Python lists, a copy that costs several times its
        # MinHash. Each new list counts towards the garbage collector's next pass, which walks
        # every live object of the caller (a worker holding its documents): paused, since lists
        # of ints make no cycles.
        paused = gc.isenabled()
        gc.disable()
        try:
            flat = itertools.chain.from_iterable(matrix.to_rows())
            sig = np.fromiter(flat, np.uint32, n * self.cfg.num_perm).reshape(n, self.cfg.num_perm)
        finally:
            if paused:
                gc.enable()
        sig[rows[1:] == rows[:-1]] = _EMPTY_SLOT
        return sig

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(N, bands) uint64: a hash of each band's rows of each signature."""
        sig = np.asarray(signatures)
        if sig.ndim != 2 or sig.shape[1] != self.cfg.num_perm:
            raise ValueError(f"signatures of shape {sig.shape}: expected (N, {self.cfg.num_perm})")
        mult = _constants(self.rows, salt=2)
        keys = np.zeros((len(sig), self.cfg.bands), np.uint64)
        for j in range(self.rows):  # a column at a time: no (N, num_perm) uint64 temporary
            keys += sig[:, j::self.rows] * mult[j]
        return _splitmix(keys)


# ---------------------------------------------------------------------------------------------
# Global decisions
# ---------------------------------------------------------------------------------------------

def find_exact_duplicates(keys: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(removed, pairs): removed (N,) bool marks every document whose key an earlier (lower-index)
    one has; pairs lists (duplicate, kept) for each, kept being the first with that key."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")  # stable: equal keys stay in index order
    ks = keys[order]
    first = np.ones(len(ks), bool)
    first[1:] = ks[1:] != ks[:-1]
    run_head = order[np.maximum.accumulate(np.where(first, np.arange(len(ks)), 0))]
    removed = np.zeros(len(keys), bool)
    removed[order[~first]] = True
    pairs = list(zip(order[~first].tolist(), run_head[~first].tolist()))
    return removed, sorted(pairs)


# Each document in an LSH bucket is compared with at most this many documents before it there.
# A bucket of m documents holds m(m-1)/2 pairs, and boilerplate (cookie notices, licence
# headers) puts 10^5-10^6 documents in one: all pairs would be 10^11 comparisons. Comparing with
# the neighbours suffices for what such buckets hold, copies of one text: each copy links to the
# one before it, union-find joins the chain, and the other bands give more chances. Buckets up
# to _NEIGHBOURS + 1 documents, nearly all of them, are still compared pair by pair.
_NEIGHBOURS = 32
_CHUNK_PAIRS = 1 << 14  # pairs verified per gather: 2 * 16K * num_perm * 4 bytes = 16 MB


def _estimate(signatures: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair (a[i], b[i]): the fraction of equal signature slots."""
    out = np.empty(len(a), np.float64)
    for s in range(0, len(a), _CHUNK_PAIRS):
        sa = np.asarray(signatures[a[s:s + _CHUNK_PAIRS]])
        sb = np.asarray(signatures[b[s:s + _CHUNK_PAIRS]])
        out[s:s + _CHUNK_PAIRS] = (sa == sb).mean(axis=1)
    return out


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the clusters of each pair (a[i], b[i]). `parent` is kept flat (every document points
    at its cluster's root, the cluster's lowest index), so a root is one lookup. Vectorised
    union-find: the clusters that the pairs touch are joined by min-label propagation with
    pointer jumping (Shiloach & Vishkin 1982) on their roots alone, O(pairs * log), then every
    document is pointed at its new root in one O(N) gather. A Python loop of finds and links
    would take a second per million pairs; following parent links one level per numpy pass
    would take O(chain length) passes."""
    ra, rb = parent[a], parent[b]
    diff = ra != rb
    if not diff.any():
        return
    roots, local = np.unique(np.concatenate([ra[diff], rb[diff]]), return_inverse=True)
    ea, eb = np.split(local.ravel(), 2)
    label = np.arange(len(roots))  # roots are sorted: the lowest label is the lowest index
    while True:
        new = label.copy()
        low = np.minimum(label[ea], label[eb])
        np.minimum.at(new, ea, low)
        np.minimum.at(new, eb, low)
        new = new[new]  # a label is a root whose own label is no larger: jump to it
        if np.array_equal(new, label):
            break
        label = new
    remap = np.arange(len(parent))
    remap[roots] = roots[label]
    parent[:] = remap[parent]


def find_near_duplicates(band_keys: np.ndarray, signatures: np.ndarray, threshold: float,
                         skip: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """(removed, pairs) from the LSH band keys and signatures of all N documents.

    Candidates are documents with the same key in any band; a candidate pair is a duplicate if its
    estimated Jaccard (fraction of equal signature slots) is >= threshold; duplicates are
    clustered transitively and each cluster keeps its lowest index. `band_keys` and `signatures`
    may be np.memmaps: the keys are read one band (column) at a time, the signatures only for
    candidate pairs (anything that an int array indexes to (k, num_perm) rows will do).
    `skip` (N,) bool: documents already removed (e.g. exact duplicates), which take no part.
    pairs: (duplicate, kept, estimated Jaccard between the two) for every removed document; in a
    chain (a~b, b~c) the estimate between c and the kept a can be below the threshold.
    Memory: O(N * bands) for the keys, O(N) besides; one band at a time is sorted.
    """
    if band_keys.ndim != 2:
        raise ValueError(f"band_keys of shape {band_keys.shape}: expected (N, bands)")
    n = len(band_keys)
    if len(signatures) != n:
        raise ValueError(f"{len(signatures)} signatures for {n} band keys")
    active = np.arange(n) if skip is None else np.flatnonzero(~np.asarray(skip, bool))
    parent = np.arange(n)
    for band in range(band_keys.shape[1]):
        keys = np.asarray(band_keys[:, band])[active]
        order = np.argsort(keys, kind="stable")  # within a bucket, documents in index order
        ks = keys[order]
        same = ks[1:] == ks[:-1]
        if not same.any():
            continue
        # only documents in a bucket of two or more: usually a small fraction of the corpus
        in_bucket = np.zeros(len(ks), bool)
        in_bucket[1:] |= same
        in_bucket[:-1] |= same
        ks, ids = ks[in_bucket], active[order[in_bucket]]
        for d in range(1, min(_NEIGHBOURS, len(ks) - 1) + 1):
            pair = np.flatnonzero(ks[d:] == ks[:-d])
            if not len(pair):
                break
            a, b = ids[pair], ids[pair + d]
            todo = parent[a] != parent[b]  # already in one cluster: no need to verify
            a, b = a[todo], b[todo]
            ok = _estimate(signatures, a, b) >= threshold
            _union(parent, a[ok], b[ok])
    dup = np.flatnonzero(parent != np.arange(n))
    removed = np.zeros(n, bool)
    removed[dup] = True
    kept = parent[dup]
    jac = _estimate(signatures, dup, kept)
    return removed, list(zip(dup.tolist(), kept.tolist(), jac.tolist()))


# ---------------------------------------------------------------------------------------------
# Decontamination
# ---------------------------------------------------------------------------------------------

_BATCH_CHARS = 1 << 22


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class NgramIndex:
    """The hashed word n-grams of evaluation texts (e.g. GSM8K test questions), normalised as
    `normalize` does. GPT-3 (Brown et al. 2020, appendix C) dropped training documents sharing a
    13-gram with a benchmark. Texts shorter than n words give no n-gram (`short` counts them):
    a short text would flag every document that happens to contain it."""

    def __init__(self, grams: np.ndarray, n: int, short: int = 0) -> None:
        self.grams = np.unique(np.asarray(grams, np.uint64))  # sorted, for searchsorted
        self.n = n
        self.short = short

    @classmethod
    def from_texts(cls, texts: Iterable[str], n: int = 13) -> NgramIndex:
        """Index every word n-gram of the texts (streamed in batches of about 4M characters)."""
        if n < 1:
            raise ValueError(f"n={n} must be at least 1")
        parts, short = [], 0
        for batch in _batches(texts):
            words, offsets = _word_hashes(batch)
            grams, _ = _gram_hashes(words, offsets, n, salt=3, short=False)
            short += int(np.count_nonzero(np.diff(offsets) < n))
            parts.append(grams)
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.uint64), n, short)

    def __len__(self) -> int:
        return len(self.grams)

    def overlaps(self, text: str) -> int:
        """How many of this text's n-grams (counted with repeats) are in the index; 0: clean."""
        return int(self.overlaps_many([text])[0])

    def overlaps_many(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) int64: `overlaps` of each text, in one vectorised pass."""
        words, offsets = _word_hashes(texts)
        grams, gram_offsets = _gram_hashes(words, offsets, self.n, salt=3, short=False)
        if not len(self.grams) or not len(grams):
            return np.zeros(len(texts), np.int64)
        at = np.minimum(np.searchsorted(self.grams, grams), len(self.grams) - 1)
        found = np.zeros(len(grams) + 1, np.int64)
        np.cumsum(self.grams[at] == grams, out=found[1:])
        return found[gram_offsets[1:]] - found[gram_offsets[:-1]]
