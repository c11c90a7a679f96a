"""Shared fixtures of the recipe tests."""

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS
from temper.model.convert import save_hf
from temper.model.transformer import Transformer

HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


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
