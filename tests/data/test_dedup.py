"""Dedup and decontamination: planted near-duplicates at known Jaccard similarities, exact
duplicates under normalisation, clusters, determinism across processes, GSM8K decontamination."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from temper.data.dedup import (
    DedupConfig,
    MinHasher,
    NgramIndex,
    exact_keys,
    find_exact_duplicates,
    find_near_duplicates,
    normalize,
    normalize_many,
)

CFG = DedupConfig(near=True)  # shingle 5, 128 permutations, 16 bands, threshold 0.8


def shingle_set(text: str, k: int = 5) -> set:
    words = normalize(text).split()
    return {tuple(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def words(rng, n=50_000):
    """Random 8-letter words (letters only: normalisation maps digits to 0)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(w) for w in letters[rng.integers(0, 26, (n, 8))]]


def planted(rng, vocab, n_words, replaced, tag):
    """A base document of random words and a variant with `replaced` words, at least 6 apart,
    swapped for new ones: each swap changes 5 shingles, so J = (S - 5m) / (S + 5m)."""
    base = list(rng.choice(vocab, n_words))
    variant = list(base)
    for p in rng.choice(np.arange(2, n_words - 2, 6), replaced, replace=False):
        variant[p] = f"new{tag}{p}".translate(str.maketrans("0123456789", "abcdefghij"))
    return " ".join(base), " ".join(variant)


def near(texts, cfg=CFG, skip=None):
    hasher = MinHasher(cfg)
    sig = hasher.signatures(texts)
    return find_near_duplicates(hasher.band_keys(sig), sig, cfg.threshold, skip)


def test_normalize():
    assert normalize("Hello,  World!! It's 1,000 dollars -- or 3.14 ") == "hello world its 0 dollars or 0"
    assert normalize("ＦＵＬＬ width ﬁne Café\u200b naïve\tA\nB") == "full width fine cafe naive a b"
    assert normalize("") == normalize(" ... !! ") == ""
    assert normalize("x\ud800y") == "xy"  # a lone surrogate (from a JSON escape) is no error
    texts = ["A b", "", "  C,d  ", "1 2 3"]
    assert normalize_many(texts) == [normalize(t) for t in texts] == ["a b", "", "cd", "0 0 0"]
    # per code point: NFKC (ligatures, fractions, digraphs expand), lower, diacritics stripped
    assert normalize("ΟΔΟΣ οδος İstanbul ½ ǅemal ﬀ") == "οδοσ οδοσ istanbul 0 dzemal ff"


def test_character_table_expansions_are_final():
    """A character that folds to several (ﬁ -> fi) is expanded before the table maps the text
    again: each character of an expansion must map to itself."""
    from temper.data.dedup import _char_table

    table, expansions = _char_table()
    assert 500 < len(expansions) < 5000
    assert all(table[ord(y)] == ord(y) for folded in expansions.values() for y in folded)


def test_planted_near_duplicates_known_answer():
    """Variants at true Jaccard 0.96, 0.94, 0.90 of their base are removed (threshold 0.8);
    at 0.60, 0.56, 0.50 they are kept. 500-word bases: S = 496 shingles."""
    rng = np.random.default_rng(0)
    vocab = words(rng)
    levels = {2: 0.96, 3: 0.94, 5: 0.90, 25: 0.60, 28: 0.56, 33: 0.50}  # words swapped: J
    texts, true_j = [], []
    for i, replaced in enumerate(list(levels) * 4):
        base, variant = planted(rng, vocab, 500, replaced, i)
        true_j.append(jaccard(base, variant))
        assert abs(true_j[-1] - levels[replaced]) < 0.005  # the construction gives what it says
        texts += [base, variant]
    removed, pairs = near(texts)
    assert removed[0::2].sum() == 0  # every base (the lower index) is kept
    assert removed[1::2].tolist() == [j >= 0.8 for j in true_j]
    assert len(pairs) == 12
    for dup, kept, est in pairs:
        assert kept == dup - 1 and abs(est - true_j[kept // 2]) < 0.08


def test_exact_duplicates_under_normalisation_keep_the_first():
    texts = ["The cat sat.", "Another text", "the  CAT sat", "THE CAT, SAT!!", "the cat sat on", "another text."]
    removed, pairs = find_exact_duplicates(exact_keys(texts))
    assert removed.tolist() == [False, False, True, True, False, True]
    assert pairs == [(2, 0), (3, 0), (5, 1)]
    keys = exact_keys(texts)
    assert keys.dtype == np.uint64 and keys[0] == keys[2] != keys[4]


def test_near_clusters_keep_the_lowest_index():
    rng = np.random.default_rng(1)
    vocab = words(rng)
    base, v1 = planted(rng, vocab, 300, 2, "a")  # v1 ~ base, J 0.94
    swapped = v1.split()
    swapped[151] = "another"  # v2 ~ v1 (one more swap), ~ base (J ~0.9)
    v2 = " ".join(swapped)
    other = " ".join(rng.choice(vocab, 300))
    removed, pairs = near([other, v2, base, other + " x", v1])
    assert removed.tolist() == [False, False, True, True, True]
    assert {(d, k) for d, k, _ in pairs} == {(2, 1), (3, 0), (4, 1)}


def _synthetic(groups, n_perm=8, bands=4):
    """Signatures where documents of a group share rows of their own pattern; band keys equal
    within a group (all in one bucket)."""
    n = sum(len(g) for g, _ in groups)
    sig = np.arange(n * n_perm, dtype=np.uint32).reshape(n, n_perm)  # all different
    keys = np.arange(n * bands, dtype=np.uint64).reshape(n, bands)
    for gid, (members, rows) in enumerate(groups):
        for m, r in zip(members, rows):
            sig[m] = r
            keys[m, 0] = 10_000 + gid
    return sig, keys


def test_chain_is_one_cluster_and_big_buckets_are_capped():
    # 0 ~ 1 (6/8 equal), 1 ~ 2 (6/8), 0 vs 2 only 4/8: one cluster by transitivity, 0 kept
    a = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    b = np.array([1, 2, 3, 4, 5, 6, 70, 80])
    c = np.array([1, 2, 3, 4, 50, 60, 70, 80])
    sig, keys = _synthetic([([0, 1, 2], [a, b, c])])
    removed, pairs = find_near_duplicates(keys, sig, 0.75)
    assert removed.tolist() == [False, True, True]
    assert pairs == [(1, 0, 0.75), (2, 0, 0.5)]  # the chain's end is only 0.5 like the kept one
    # 300 copies in one bucket (more than any neighbour window): all but the first removed
    n = 300
    sig = np.tile(np.arange(16, dtype=np.uint32), (n, 1))
    keys = np.zeros((n, 4), np.uint64)
    removed, pairs = find_near_duplicates(keys, sig, 0.8)
    assert removed.sum() == n - 1 and not removed[0] and {k for _, k, _ in pairs} == {0}


def test_skip_takes_no_part():
    text = "the quick brown fox jumps over the lazy dog again and again"
    other = "a completely different sentence about something else entirely here"
    removed, _ = near([text, other, text, text], skip=np.array([True, False, False, False]))
    assert removed.tolist() == [False, False, False, True]  # 2 is kept: 0 is out of the game


def test_signatures_short_and_empty_documents():
    hasher = MinHasher(CFG)
    sig = hasher.signatures(["", "!!! 123"[:3], "two words", "Two, words!", "two other", "a b c d e f"])
    assert sig.shape == (6, 128) and sig.dtype == np.uint32
    assert (sig[0] == sig[1]).all() and (sig[0] == 0xFFFFFFFF).all()  # empty: a fixed signature
    assert (sig[2] == sig[3]).all() and (sig[2] != sig[0]).any()  # shorter than a shingle: one shingle
    assert (sig[2] != sig[4]).mean() > 0.9
    assert hasher.signatures([]).shape == (0, 128)
    assert (pickle.loads(pickle.dumps(hasher)).signatures(["two words"]) == sig[2]).all()  # to workers
    assert hasher.band_keys(sig).shape == (6, 16)


def test_a_text_longer_than_a_segment():
    """Texts are processed in groups of about 1M code points; a longer text goes alone and its
    signature does not depend on its neighbours."""
    rng = np.random.default_rng(3)
    long = " ".join(rng.choice(words(rng, 2000), 250_000))  # ~2.25M characters
    hasher = MinHasher(CFG)
    alone = hasher.signatures([long])
    batch = hasher.signatures(["first text here", long, long + " and a tail", "last"])
    assert (batch[1] == alone[0]).all()
    assert (batch[0] == hasher.signatures(["first text here"])[0]).all()
    assert (batch[1] == batch[2]).mean() > 0.95


def test_signatures_from_memmap(tmp_path):
    rng = np.random.default_rng(2)
    vocab = words(rng)
    texts = []
    for i in range(5):
        texts += planted(rng, vocab, 200, 1, i)
    hasher = MinHasher(CFG)
    sig = hasher.signatures(texts)
    np.save(tmp_path / "sig.npy", sig)
    mm = np.load(tmp_path / "sig.npy", mmap_mode="r")
    keys = hasher.band_keys(sig)
    in_memory = find_near_duplicates(keys, sig, 0.8)
    from_disk = find_near_duplicates(keys, mm, 0.8)
    assert from_disk[0].tolist() == in_memory[0].tolist() == [False, True] * 5
    assert from_disk[1] == in_memory[1]


DETERMINISM = textwrap.dedent("""
    import json, sys
    import numpy as np
    from temper.data.dedup import DedupConfig, MinHasher, NgramIndex, exact_keys
    texts = json.loads(sys.argv[1])
    h = MinHasher(DedupConfig(num_perm=64, bands=8, seed=7))
    sig = h.signatures(texts)
    grams = NgramIndex.from_texts(texts, n=3).grams
    np.savez(sys.argv[2], sig=sig, bands=h.band_keys(sig), exact=exact_keys(texts), grams=grams)
""")


def test_same_hashes_in_another_process(tmp_path):
    texts = ["Senjō no Valkyria 3 : Chronicles ( 戦場のヴァルキュリア3 )", "", "two words",
             "The game began development in 2010, carrying over a large portion of the work " * 3]
    out = tmp_path / "other.npz"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", DETERMINISM, json.dumps(texts), str(out)], env=env,
                   check=True, timeout=120)
    other = np.load(out)
    h = MinHasher(DedupConfig(num_perm=64, bands=8, seed=7))
    sig = h.signatures(texts)
    assert (other["sig"] == sig).all()
    assert (other["bands"] == h.band_keys(sig)).all()
    assert (other["exact"] == exact_keys(texts)).all()
    assert (other["grams"] == NgramIndex.from_texts(texts, n=3).grams).all()
    # and the same in this process whatever the batch around a text
    assert (h.signatures(texts[2:3]) == sig[2:3]).all()
    assert (MinHasher(DedupConfig(num_perm=64, bands=8, seed=8)).signatures(texts[3:]) != sig[3:]).mean() > 0.9


def test_ngram_index_finds_a_planted_gsm8k_question(shared_data):
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line)["question"] for line in lines]
    index = NgramIndex.from_texts(questions)
    assert index.n == 13 and len(index) > 30 * len(questions)
    q = questions[42]
    clean = ("The tower building of the little rock arsenal is a building located in macarthur park "
             "in downtown little rock arkansas and was part of the city's first military installation")
    leaked = f"{clean}. Worked example -- {q.upper()}  Answer below. {clean}"
    assert index.overlaps(clean) == 0
    assert index.overlaps(leaked) == len(normalize(q).split()) - 12  # every 13-gram of q
    assert index.overlaps_many([clean, leaked, ""]).tolist() == [0, index.overlaps(leaked), 0]


@pytest.mark.parametrize("kwargs, key", [
    ({"bands": 7}, "dedup.bands=7"),
    ({"num_perm": 0}, "dedup.num_perm=0"),
    ({"shingle_size": 0}, "dedup.shingle_size=0"),
    ({"threshold": 0.0}, "dedup.threshold=0.0"),
    ({"threshold": 1.5}, "dedup.threshold=1.5"),
    ({"seed": -1}, "dedup.seed=-1"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DedupConfig(**kwargs)
