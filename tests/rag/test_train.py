"""`temper rag train`: a bi-encoder trained with InfoNCE on inverse-cloze pairs of WikiText-2 retrieves held-out
articles' passages better than the untuned model it starts from; bad input fails with the key or record named."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from temper.config import ConfigError
from temper.data.sources import DataError
from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from temper.rag.embed import load_embedder
from temper.rag.ict import ict_pairs
from temper.recipes.rag import RetrieverDataConfig, read_pairs
from temper.recipes.rag import main as rag
from temper.train.log import read_metrics
from tests.conftest import SHARED_DATA
from tests.ranks import temper_on_ranks

HELD_OUT = 150  # articles kept out of training, the evaluation's queries and passages


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """A random-init debug model with a BPE tokenizer of WikiText-2's training articles, and the articles."""
    if not (SHARED_DATA / "wikitext-2").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("retriever")
    lines = gzip.open(SHARED_DATA / "wikitext-2" / "train.txt.gz", "rt", encoding="utf-8").read().splitlines()
    articles = [line for line in lines if len(line.split()) > 80]  # WikiText paragraphs, headings dropped
    train, held = articles[:-HELD_OUT], articles[-HELD_OUT:]
    tok = train_tokenizer(train, "bpe", 1024, ["<|endoftext|>"])
    cfg = replace(PRESETS["debug"], vocab_size=1024, dropout=0.0)
    torch.manual_seed(0)
    save_hf(Transformer(cfg).eval(), cfg, root / "base")
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": "<|endoftext|>"}), root / "base")
    (root / "train.txt").write_text("\n\n".join(train))
    return root, held


def _scores(model_dir, pairs) -> tuple[float, float]:
    """(recall@10, MRR) of each query's own passage among all the pairs' passages, by exact inner product."""
    e = load_embedder(model_dir, max_len=64)  # both models read the same tokens
    q, p = e.encode([x.query for x in pairs]), e.encode([x.passage for x in pairs])
    s = q @ p.T
    rank = (s > np.diagonal(s)[:, None]).sum(1)  # passages scored above the right one
    return float((rank < 10).mean()), float((1.0 / (rank + 1)).mean())


def test_ict_training_beats_the_untuned_model_on_held_out_articles(wiki, tmp_path):
    root, held = wiki
    args = ["train", f"--model={root / 'base'}", f"--data.files={root / 'train.txt'}", "--data.ict=true",
            "--max_len=64", f"--run.dir={tmp_path}", "--run.name=ret", "--run.device=cpu",
            "--train.micro_batch_size=32", "--train.steps=150", "--optim.lr=3e-4", "--eval.every=0",
            "--checkpoint.every=0", "--log.progress=false", "--log.plots=false"]
    assert rag(args) == 0
    final = tmp_path / "ret" / "final"
    assert json.loads((final / "retriever.json").read_text()) == {"pooling": "mean", "max_len": 64}
    assert load_embedder(final).identity["max_len"] == 64  # the index and queries default to the trained settings

    pairs = ict_pairs(held, seed=1)  # other articles than training's: no passage was seen
    assert len(pairs) > 200
    (r10_base, mrr_base), (r10, mrr) = _scores(root / "base", pairs), _scores(final, pairs)
    print(f"held-out ICT, {len(pairs)} pairs: untuned recall@10 {r10_base:.3f} MRR {mrr_base:.3f}; "
          f"trained recall@10 {r10:.3f} MRR {mrr:.3f}")
    assert mrr > 1.15 * mrr_base and r10 > r10_base
    val = [m["val_loss"] for m in read_metrics(tmp_path / "ret" / "metrics.jsonl") if m["kind"] == "val"]
    assert len(val) == 2 and val[-1] < val[0]


def test_pairs_from_jsonl_with_accumulation_and_bad_input(wiki, tmp_path):
    root, held = wiki
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": p.query, "passage": p.passage}) + "\n"
                            for p in ict_pairs(held[:20], seed=0)))
    base = [f"--model={root / 'base'}", f"--run.dir={tmp_path}", "--run.device=cpu", "--max_len=32",
            "--checkpoint.every=0", "--log.progress=false", "--log.plots=false"]
    assert rag(["train", *base, f"--data.files={data}", "--run.name=acc", "--train.micro_batch_size=4",
                "--train.accumulation=2", "--train.steps=2", "--symmetric=true"]) == 0
    train_lines = [m for m in read_metrics(tmp_path / "acc" / "metrics.jsonl") if m["kind"] == "train"]
    assert len(train_lines) == 2 and all(np.isfinite(m["loss"]) for m in train_lines)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a question", "passage": "its passage"}\n{"query": "no passage"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*'passage'"):
        rag(["train", *base, f"--data.files={bad}", "--run.name=bad"])
    one = tmp_path / "one.jsonl"
    one.write_text('{"query": "a question", "passage": "its passage"}\n')
    with pytest.raises(ConfigError, match="at least 2"):
        rag(["train", *base, f"--data.files={one}", "--run.name=one"])
    with pytest.raises(ConfigError, match="data.files"):
        rag(["train", *base, "--run.name=none"])
    with pytest.raises(ConfigError, match="passage_sentences"):
        rag(["train", *base, f"--data.files={data}", "--data.ict=true", "--data.passage_sentences=1"])
    with pytest.raises(ConfigError, match="temperature"):
        rag(["train", *base, f"--data.files={data}", "--temperature=0", "--run.name=t"])


def test_ict_passages_stay_inside_a_document(tmp_path):
    """--data.txt_docs=line makes each line a document: no passage mixes two of WikiText's paragraphs."""
    text = tmp_path / "two.txt"
    text.write_text("Alpha one two three four. Alpha five six seven eight.\n"
                    "Beta one two three four. Beta five six seven eight.\n"
                    "Gamma one two three four. Gamma five six seven eight.\n")
    per_line = read_pairs(RetrieverDataConfig(files=[str(text)], ict=True, txt_docs="line"), seed=0)
    assert len(per_line) == 3
    assert all(len({w for w in (p.query + " " + p.passage).split() if w[0].isupper()}) == 1 for p in per_line)
    whole = read_pairs(RetrieverDataConfig(files=[str(text)], ict=True, remove_prob=0.0), seed=0)
    assert len(whole) == 2 and "Alpha" in whole[0].passage and "Beta" in whole[0].passage  # 4-sentence windows


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_one_rank_accumulating_the_same_micro_batches(wiki, tmp_path):
    """Rank r's micro-batch at a step is the one that micro-step r of a single process takes (align.pairs'
    dealing), so 2 DDP ranks x micro 4 and 1 process x micro 4 x 2 accumulation hold the same in-batch negatives
    and must reach the same weights (DDP's all-reduce sums in another order: close, not equal)."""

    from safetensors.torch import load_file

    root, held = wiki
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": p.query, "passage": p.passage}) + "\n"
                            for p in ict_pairs(held[:20], seed=0)))
    flags = [f"--model={root / 'base'}", f"--data.files={data}", f"--run.dir={tmp_path}", "--run.device=cpu",
             "--max_len=32", "--train.steps=3", "--train.micro_batch_size=4", "--optim.lr=1e-3",
             "--checkpoint.every=0", "--log.progress=false", "--log.plots=false", "--eval.every=0"]
    assert rag(["train", *flags, "--run.name=one", "--train.accumulation=2"]) == 0
    temper_on_ranks(["rag", "train", *flags, "--run.name=two"], 2, tmp_path / "two-logs")
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert one.keys() == two.keys()
    base = load_file(root / "base" / "model.safetensors")
    assert any(not torch.equal(one[k], base[k]) for k in one)  # it trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=k)
    losses = [[m["loss"] for m in read_metrics(tmp_path / name / "metrics.jsonl") if m["kind"] == "train"]
              for name in ("one", "two")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
