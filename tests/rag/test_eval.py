"""`temper rag evalset` and `temper rag eval` end to end on WikiText-2 articles with a tiny model: the scores equal
those computed from `retrieve` and the metrics by hand; BM25 finds a sentence left in the index almost always
and much less often once it is masked out (the leakage the evalset docstring describes); answers are scored by
SQuAD's EM/F1; a labelled set for another index and a missing file are refused in one line."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from temper.__main__ import main as temper_main
from temper.infer.load import load_for_inference
from temper.rag.answer import answer
from temper.rag.evalset import read_labelled, write_labelled
from temper.rag.index import Index
from temper.rag.metrics import exact_match, retrieval_scores, token_f1
from temper.rag.retrieve import retrieve
from tests.rag.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    src = SHARED_DATA / "wikitext-2" / "valid.txt.gz"
    if not src.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("rag_eval")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        text = "".join(line for _, line in zip(range(1200), f, strict=False))
    (root / "wiki.txt").write_text(text, encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()][:300]
    torch.manual_seed(0)
    ckpt = tiny_checkpoint(root / "ckpt", lines, chat=False)
    index = root / "index"
    assert temper_main(["rag", "index", f"--inputs=[{root / 'wiki.txt'}]", f"--out={index}", f"--model={ckpt}",
                        "--articles", "--chunk_size=64", "--overlap=16", "--max_len=96", "--device=cpu"]) == 0
    return root, ckpt, index


def test_evalset_and_eval_match_a_by_hand_computation(built, capsys):
    root, ckpt, index = built
    plain, masked_set, masked = root / "plain.jsonl", root / "masked.jsonl", root / "masked_index"
    assert temper_main(["rag", "evalset", f"--index={index}", f"--out={plain}", "--n=30", "--seed=3"]) == 0
    assert temper_main(["rag", "evalset", f"--index={index}", f"--out={masked_set}", "--n=30", "--seed=3",
                        f"--masked_index={masked}"]) == 0
    queries = read_labelled(plain)
    assert read_labelled(masked_set) == queries and len(queries) == 30
    original, hidden = Index.open(index), Index.open(masked)
    assert hidden.manifest["embedder"] == original.manifest["embedder"]
    assert hidden.manifest["chunking"] == original.manifest["chunking"]
    for q in queries:
        assert all(q.query in original.chunks[i].text and q.query not in hidden.chunks[i].text for i in q.relevant)

    out = {}
    for name, idx, data in (("plain", index, plain), ("masked", masked, masked_set)):
        for mode in ("sparse", "hybrid"):
            path = root / f"{name}-{mode}.json"
            assert temper_main(["rag", "eval", f"--index={idx}", f"--data={data}", f"--mode={mode}",
                                "--ks=[1,10]", f"--out={path}", "--device=cpu"]) == 0
            out[name, mode] = json.loads(path.read_text())
    assert "recall@10" in capsys.readouterr().out
    # The command's numbers are retrieve's rankings scored by the metrics, nothing else.
    opened = Index.open(masked)
    want = retrieval_scores([[h.id for h in retrieve(opened, q.query, k=10, mode="sparse")] for q in queries],
                            [set(q.relevant) for q in queries], ks=(1, 10))
    for key, value in want.items():
        assert out["masked", "sparse"][key] == pytest.approx(value, abs=1e-12)
    # A sentence left in its chunk is an easy target for BM25; cut out, it is much harder.
    assert out["plain", "sparse"]["recall@10"] >= 0.9
    assert out["masked", "sparse"]["recall@10"] < out["plain", "sparse"]["recall@10"]


def test_eval_scores_answers_with_squad_metrics(built, capsys):
    root, ckpt, index = built
    opened = Index.open(index)
    queries = read_labelled_from(opened)
    data = root / "answers.jsonl"
    write_labelled(data, queries)
    path = root / "answers.json"
    assert temper_main(["rag", "eval", f"--index={index}", f"--data={data}", "--mode=sparse", f"--checkpoint={ckpt}",
                        "--answer_k=2", "--max_new_tokens=6", f"--out={path}", "--device=cpu"]) == 0
    got = json.loads(path.read_text())
    loaded = load_for_inference(ckpt, device="cpu", dtype=torch.float32)
    texts = [answer(loaded, q.query, retrieve(opened, q.query, k=2, mode="sparse"), max_new_tokens=6).text
             for q in queries if q.answers]
    golds = [q.answers for q in queries if q.answers]
    assert got["answered"] == 2
    assert got["exact_match"] == pytest.approx(sum(map(exact_match, texts, golds)) / 2)
    assert got["f1"] == pytest.approx(sum(map(token_f1, texts, golds)) / 2)


def read_labelled_from(index: Index):
    from temper.rag.evalset import LabelledQuery

    # Two queries with answers (one of them the chunk's own first words, so F1 has something to match), one without.
    c0, c1 = index.chunks[0], index.chunks[5]
    return [LabelledQuery(c0.text[:60], (0,), (" ".join(c0.text.split()[:3]),)),
            LabelledQuery(c1.text[:60], (5,), ("no such answer", "also not")),
            LabelledQuery("what is this about ?", (1, 2))]


def test_eval_refuses_bad_sets(built, capsys):
    root, _, index = built
    n = len(Index.open(index).chunks)
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"query": "where ?", "relevant": [n + 5]}) + "\n", encoding="utf-8")
    assert temper_main(["rag", "eval", f"--index={index}", f"--data={bad}", "--mode=sparse"]) == 2
    err = capsys.readouterr().err
    assert f"names chunk id {n + 5}" in err and len(err.strip().splitlines()) == 1
    assert temper_main(["rag", "eval", f"--index={index}", f"--data={root / 'missing.jsonl'}", "--mode=sparse"]) == 2
    assert "cannot read the labelled set" in capsys.readouterr().err
    assert temper_main(["rag", "eval", f"--index={index}", f"--data={bad}", "--ks=[0]"]) == 2
    assert "ks" in capsys.readouterr().err
    assert temper_main(["rag", "evalset", f"--index={index}", f"--out={root / 'x.jsonl'}",
                        f"--masked_index={index}"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert Path(index, "manifest.json").exists()
