"""A tiny checkpoint in Hugging Face layout for the evaluation tests: a Llama-style model (random
weights) and a byte-level BPE tokenizer trained on WikiText-2 and ARC text that adds a BOS token."""

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from tests.conftest import SHARED_DATA

BOS, EOS = "<|begin_of_text|>", "<|endoftext|>"


def corpus() -> list[str]:
    wiki = gzip.decompress((SHARED_DATA / "wikitext-2" / "train.txt.gz").read_bytes()).decode()[:200_000]
    arc = [json.loads(line) for line in (SHARED_DATA / "arc-easy" / "train.jsonl").read_text().splitlines()]
    return [wiki[i:i + 2000] for i in range(0, len(wiki), 2000)] + [
        f"Question: {r['question']}\nAnswer: {' '.join(r['choices'])}" for r in arc]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("eval-checkpoint")
    tok = train_tokenizer(corpus(), "bpe", 1024, [EOS, BOS])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    save_hf_tokenizer(HFTokenizer(tok, {"bos_token": BOS, "eos_token": EOS}), root)
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=256)
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, root)
    return root
