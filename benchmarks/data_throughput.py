"""Data-stage throughput: temper's corpus tools against their peers on the same documents.

Sections (one `bench_*` function each, each printing a markdown table):
- stages: MB/s of every stage of `temper prepare` (Gopher/C4 quality rules + fastText language
  ID, exact + MinHash dedup, tokenize with a given 8k BPE, shard) at each `--workers` count,
  run as the CLI in its own process and read from its report.json; and the tokenize stage
  against plain `tokenizers` batch encoding (`Tokenizer.encode_batch`, its Rust thread pool on
  every core) of the same text in the same run.
- minhash: temper's MinHash signatures (`MinHasher`, rensa inside) and LSH dedup against
  `datasketch` (MinHash with the same num_perm and shingles, `update_batch`; MinHashLSH with the
  same bands x rows, query + insert, candidates verified by estimated Jaccard as temper does),
  and against rensa used as its README shows (token sets of shingle strings). Every side starts
  from the raw text and uses temper's batch normalisation (a peer's user has to normalise and
  shingle too). `--steps` adds the MinHash step alone on the same shingle hashes: rensa (what
  temper uses) and a numpy MinHash (the do-it-yourself alternative), the choice recorded in
  data/dedup.py.

Documents: WikiText-2 train (../shared/data/wikitext-2/train.txt.gz): one per paragraph (each
non-blank line that is not a ` = Heading = `, ~600 bytes) or, with `--split article`, one per
article (~17 KB). A shared machine drifts from run to run, so the implementations alternate
`--repeats` times and the table reports medians; the last column is each row's time over
temper's. Everything runs on one core (RAYON_NUM_THREADS=1: rensa's thread pool would otherwise
take every core, while datasketch uses one).

    python benchmarks/data_throughput.py                  # 5,000 paragraphs, 3 repeats
    python benchmarks/data_throughput.py --docs 0 --steps  # all 17,556 paragraphs
    python benchmarks/data_throughput.py --docs 0 --split article
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from temper.data import dedup

SHARED_DATA = Path(os.environ.get("TEMPER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_DATA = SHARED_DATA / "wikitext-2" / "train.txt.gz"


def load_documents(path: Path, split: str = "paragraph", limit: int = 0) -> list[str]:
    """WikiText-2 as documents, in file order: paragraphs (each non-blank line that is not a
    ` = Heading = `) or articles (the lines from one ` = Title = ` to the next)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    if split == "paragraph":
        docs = [d for d in lines if d and not _is_heading(d)]
    else:
        docs, cur = [], []
        for line in lines:
            if _is_heading(line) and not line.startswith("= = "):  # a title, not a section heading
                if cur:
                    docs.append("\n".join(cur))
                cur = []
            if line:
                cur.append(line)
        if cur:
            docs.append("\n".join(cur))
    return docs[:limit] if limit else docs


def _is_heading(line: str) -> bool:
    return line.startswith("= ") and line.endswith(" =")


def _timed(repeats: int, fns: dict) -> dict:
    """{name: (median seconds, last result)} of each function, the functions alternating."""
    times: dict = {k: [] for k in fns}
    results: dict = {}
    for r in range(repeats):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in names:
            t0 = time.perf_counter()
            results[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), results[k]) for k, v in times.items()}


# ------------------------------------------------------------------------------------ minhash

def temper_lsh(texts: Sequence[str], cfg: dedup.DedupConfig) -> int:
    """Signatures -> band keys -> near-duplicate decision; the number of documents removed."""
    hasher = dedup.MinHasher(cfg)
    sig = hasher.signatures(texts)
    removed, _ = dedup.find_near_duplicates(hasher.band_keys(sig), sig, cfg.threshold)
    return int(removed.sum())


def datasketch_signatures(texts: Sequence[str], cfg: dedup.DedupConfig) -> list:
    """datasketch's MinHash of the same word shingles (as utf-8 strings, which it hashes itself)."""
    from datasketch import MinHash

    out = []
    k = cfg.shingle_size
    for norm in dedup.normalize_many(texts):
        words = norm.split()
        shingles = [" ".join(words[i:i + k]).encode() for i in range(max(1, len(words) - k + 1))] if words else []
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch(shingles)
        out.append(m)
    return out


def rensa_signatures(texts: Sequence[str], cfg: dedup.DedupConfig) -> np.ndarray:
    """rensa used directly, as its README shows: token sets of shingle strings, which it hashes."""
    import rensa

    k = cfg.shingle_size
    sets = []
    for norm in dedup.normalize_many(texts):
        words = norm.split()
        sets.append([" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))] if words else [])
    m = rensa.RMinHash.digest_matrix_from_token_sets(sets, cfg.num_perm, cfg.seed)
    return np.array(m.to_rows(), np.uint32)


def datasketch_lsh(texts: Sequence[str], cfg: dedup.DedupConfig) -> int:
    """datasketch MinHash + MinHashLSH (query, then insert, per document); a candidate counts
    when its estimated Jaccard reaches the threshold, as in temper. Documents removed."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.num_perm // cfg.bands))
    kept: dict[int, object] = {}
    removed = 0
    for i, m in enumerate(datasketch_signatures(texts, cfg)):
        if any(m.jaccard(kept[j]) >= cfg.threshold for j in lsh.query(m)):
            removed += 1
            continue
        lsh.insert(i, m)
        kept[i] = m
    return removed


def numpy_minhash(shingles: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """The do-it-yourself alternative to rensa: classic MinHash (Broder 1997) with num_perm
    universal hashes (a*x + b) >> 32 of each shingle hash, min-reduced per document."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    out = np.full((len(offsets) - 1, num_perm), 0xFFFFFFFF, np.uint32)
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    block = 1 << 14
    values = np.empty((num_perm, len(shingles)), np.uint32)
    for s in range(0, len(shingles), block):
        x = shingles[s:s + block]
        values[:, s:s + block] = (a[:, None] * x[None, :] + b[:, None]) >> np.uint64(32)
    if len(nonempty):
        out[nonempty] = np.minimum.reduceat(values, offsets[nonempty], axis=1).T
    return out


def bench_minhash(texts: Sequence[str], cfg: dedup.DedupConfig, repeats: int = 3,
                  steps: bool = False) -> list[dict]:
    """Rows of the table for the MinHash section."""
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    hasher = dedup.MinHasher(cfg)
    hasher.signatures(texts[:10])  # build the per-process tables outside the timing

    res = _timed(repeats, {
        ("signatures", "temper"): lambda: hasher.signatures(texts),
        ("signatures", "rensa, shingle strings"): lambda: rensa_signatures(texts, cfg),
        ("signatures", "datasketch"): lambda: datasketch_signatures(texts, cfg),
        ("signatures + LSH", "temper"): lambda: temper_lsh(texts, cfg),
        ("signatures + LSH", "datasketch"): lambda: datasketch_lsh(texts, cfg),
    })
    rows = []
    for (what, impl), (sec, out) in res.items():
        rows.append({"section": "minhash", "what": what, "impl": impl, "seconds": sec,
                     "docs/s": len(texts) / sec, "MB/s": mb / sec,
                     "removed": out if isinstance(out, int) else "",
                     "x temper": sec / res[(what, "temper")][0]})
    if steps:  # the shingle hashes that temper feeds rensa, from its private helpers
        words, offsets = dedup._word_hashes(texts)
        shingles, rows_off = dedup._gram_hashes(words, offsets, cfg.shingle_size, salt=1, short=True)
        import rensa

        def rensa_step() -> np.ndarray:
            m = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
                shingles, rows_off.astype(np.uint64), cfg.num_perm, cfg.seed)
            return np.array(m.to_rows(), np.uint32)

        step = _timed(repeats, {
            ("MinHash step only", "rensa"): rensa_step,
            ("MinHash step only", "numpy"): lambda: numpy_minhash(shingles, rows_off, cfg.num_perm, cfg.seed),
        })
        base = step[("MinHash step only", "rensa")][0]
        for (_, impl), (sec, _) in step.items():
            rows.append({"section": "minhash", "what": "MinHash step only", "impl": impl, "seconds": sec,
                         "docs/s": len(texts) / sec, "MB/s": mb / sec, "removed": "",
                         "x temper": sec / base})
    return rows


_PLAIN_TOKENIZE = """
import json, sys, time
from tokenizers import Tokenizer
texts = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
tok = Tokenizer.from_file(sys.argv[2])
t = time.perf_counter()
tok.encode_batch(texts, add_special_tokens=False)
print(time.perf_counter() - t)
"""


def bench_stages(texts: Sequence[str], workers: Sequence[int], repeats: int, part_bytes: int) -> list[dict]:
    """(stage, workers, MB/s) rows from `temper prepare` runs, plus the plain tokenizers row."""
    tmp = Path(tempfile.mkdtemp(prefix="temper-bench-"))
    try:
        corpus = tmp / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
        prepare = [sys.executable, "-m", "temper", "prepare", "--input", str(corpus), "--progress=false"]
        subprocess.run(prepare + ["--out", str(tmp / "tok"), "--tokenizer.vocab_size=8192", "--dedup.exact=false"],
                       check=True, capture_output=True, env=env)
        tokenizer = tmp / "tok" / "tokenizer.json"
        full = ["--filters.quality=true", "--filters.languages=[en]", "--dedup.near=true", "--tokenizer.kind=file",
                f"--tokenizer.path={tokenizer}", f"--part_bytes={part_bytes}"]
        rates: dict[tuple[str, int], list[float]] = {}
        for r in range(repeats):
            for w in workers if r % 2 == 0 else list(reversed(workers)):
                out = tmp / f"w{w}"
                subprocess.run(prepare + full + ["--out", str(out), f"--workers={w}"], check=True, capture_output=True,
                               env=env)
                report = json.loads((out / "report.json").read_text())
                for stage in ("filter", "dedup", "tokenize"):
                    st = report["stages"][stage]
                    rates.setdefault((stage, w), []).append(st["bytes_in"] / 1e6 / max(st["seconds"], 1e-3))
                total = report["stages"]["filter"]["bytes_in"] / 1e6 / report["seconds"]["total"]
                rates.setdefault(("whole prepare", w), []).append(total)
                shutil.rmtree(out)
            plain = subprocess.run([sys.executable, "-c", _PLAIN_TOKENIZE, str(corpus), str(tokenizer)], check=True,
                                   capture_output=True, text=True, env=env)
            mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
            rates.setdefault(("plain tokenizers encode_batch", 0), []).append(mb / float(plain.stdout.strip()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    plain_rate = statistics.median(rates[("plain tokenizers encode_batch", 0)])
    for (stage, w), values in rates.items():
        rate = statistics.median(values)
        base = statistics.median(rates[(stage, workers[0])]) if w else rate
        rows.append({"stage": stage, "workers": w or "all threads", "MB/s": rate,
                     "scaling": rate / base, "vs plain": rate / plain_rate if stage.startswith(("tokenize", "plain")) else None})
    return rows


def print_stage_table(rows: list[dict], header: str) -> None:
    print(header)
    print()
    print("| stage | workers | MB/s | vs workers=" + str(rows[0]["workers"]) + " | vs plain tokenizers |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        vs = f"{r['vs plain']:.2f}x" if r["vs plain"] is not None else ""
        print(f"| {r['stage']} | {r['workers']} | {r['MB/s']:.2f} | {r['scaling']:.2f}x | {vs} |")
    print()


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print()
    print("| section | what | impl | seconds | docs/s | MB/s | removed | time / temper's |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['section']} | {r['what']} | {r['impl']} | {r['seconds']:.3f} | {r['docs/s']:,.0f} | "
              f"{r['MB/s']:.2f} | {r['removed']} | {r['x temper']:.1f}x |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WikiText-2 train.txt.gz")
    ap.add_argument("--split", choices=("paragraph", "article"), default="paragraph",
                    help="one document per paragraph (17,556, ~600 B) or per article (600, ~17 KB)")
    ap.add_argument("--docs", type=int, default=5000, help="documents to use (0: all)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs; the median is reported")
    ap.add_argument("--steps", action="store_true", help="also time the MinHash step alone: rensa vs numpy")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--bands", type=int, default=16)
    ap.add_argument("--shingle-size", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--sections", nargs="+", choices=("stages", "minhash"), default=["stages", "minhash"])
    ap.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="worker counts of the stages section")
    ap.add_argument("--part-bytes", type=int, default=1 << 20,
                    help="prepare's part_bytes in the stages section (the corpus is one file)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before rensa's first call starts its pool
    if not args.data.exists():
        print(f"no data at {args.data}: pass --data", file=sys.stderr)
        return 1
    texts = load_documents(args.data, args.split, args.docs)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    if "stages" in args.sections:  # first: it runs in child processes with every core
        rows = bench_stages(texts, args.workers, args.repeats, args.part_bytes)
        print_stage_table(rows, f"`temper prepare` stages on {len(texts):,} WikiText-2 {args.split}s ({mb:.1f} MB) "
                                f"in one JSONL file cut into {args.part_bytes / 2**20:g} MiB parts, median of {args.repeats}")
    if "minhash" not in args.sections:
        return 0
    cfg = dedup.DedupConfig(near=True, num_perm=args.num_perm, bands=args.bands,
                            shingle_size=args.shingle_size, threshold=args.threshold)
    rows = bench_minhash(texts, cfg, args.repeats, args.steps)
    print_table(rows, f"{len(texts):,} WikiText-2 {args.split}s ({mb:.1f} MB), num_perm={cfg.num_perm}, "
                      f"bands={cfg.bands}, shingle={cfg.shingle_size} words, threshold={cfg.threshold}, "
                      f"one core, median of {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
