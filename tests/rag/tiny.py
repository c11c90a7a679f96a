"""What the RAG tests build: a tiny checkpoint with its own tokenizer, and real WikiText-2 lines."""

import gzip
from dataclasses import replace
from pathlib import Path

import torch

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from tests.templates import CHATML


def wikitext_lines(shared_data: Path, n: int) -> list[str]:
    """The first n non-empty, non-heading lines of WikiText-2's validation split."""
    out = []
    with gzip.open(shared_data / "wikitext-2" / "valid.txt.gz", "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("="):
                out.append(line)
                if len(out) == n:
                    break
    return out


def tiny_checkpoint(root: Path, texts: list[str], context: int = 256, chat: bool = True) -> Path:
    """A debug Llama-layout model and a BPE tokenizer trained on `texts` (ChatML template when `chat`)."""
    tok = train_tokenizer(texts, "bpe", 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                         {"default": CHATML} if chat else {})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=context)
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, root)
    save_hf_tokenizer(hf_tok, root)
    return root
