"""Shared fixtures of the recipe tests."""

import gzip
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS
from temper.model.heads import RewardModel
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from tests.templates import CHATML

HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


@pytest.fixture(scope="module")
def hh_base(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama-layout model with a ChatML tokenizer, and the first 64 hh-rlhf pairs."""
    root = tmp_path_factory.mktemp("base")
    lines = gzip.open(HH, "rt", encoding="utf-8").read().splitlines()[:64]
    data = root / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    texts = [json.loads(x)["chosen"] for x in lines]
    tok = train_tokenizer(texts, "bpe", 500, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": CHATML})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=256, tie_embeddings=False)
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, root / "model")
    save_hf_tokenizer(hf_tok, root / "model")
    return root / "model", data


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny ChatML policy, a random reward model on the same tokenizer, and 40 sum prompts with answers."""
    root = tmp_path_factory.mktemp("arith")
    rng = random.Random(0)
    records = []
    for _ in range(40):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        records.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [f"{r['prompt']} {a} + {b} = {r['answer']}. The answer is {r['answer']}."
             for r, (a, b) in zip(records, [(1, 2)] * 40)]
    tok = train_tokenizer(texts, "bpe", 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": CHATML})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=128)
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, root / "policy")
    save_hf_tokenizer(hf_tok, root / "policy")
    rm = RewardModel(Transformer(cfg))
    torch.nn.init.normal_(rm.head.score.weight, std=1.0)
    save_hf(rm.backbone, cfg, root / "rm", generation_config={"pad_token_id": 0}, score=rm.head.score.weight)
    save_hf_tokenizer(hf_tok, root / "rm")
    return root / "policy", root / "rm", data
