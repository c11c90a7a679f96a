"""Texts -> unit vectors: a checkpoint's final hidden states, pooled over each text's tokens and normalised.

Any checkpoint `temper.infer.load` reads is an encoder here: its final (normed) hidden states
(`Transformer.forward(hidden_only=True)`) are pooled over the text's tokens, either their mean
("mean", as sentence-transformers' mean pooling) or the last token's ("last": a causal model's last
position has seen the whole text, as E5-Mistral / SGPT-style embedders use), then L2-normalised so that
an inner product is the cosine similarity FAISS and the training loss both use.

Batches are right-padded: the model is causal, so real tokens never attend to the padding after them,
and the mask drops the padding from the pool. Texts are sorted by length before batching (less padding)
and put back in order.

A retriever trained by `temper rag train` may carry `retriever.json` ({"pooling", "max_len"}) next to its
weights: those are its defaults, so an index built with it and a query encoded with it agree.

`Embedder.identity` is what an index's manifest records to refuse queries from another model: the
directory, a fingerprint of its weight files (sha256 of the whole file up to 256 MiB; of its size and 16
evenly spaced 64 KiB blocks above that, so opening a large model does not read it all: a fine-tune
changes every block), the pooling and the token limit.

It does not chunk, index or train (`pool` is differentiable so that training can call it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from temper.data.tokenizer import HFTokenizer
from temper.errors import InputError
from temper.files import read_json_object
from temper.infer.load import open_checkpoint
from temper.model.transformer import Transformer

POOLINGS = ("mean", "last")
FULL_HASH_BYTES = 256 << 20
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 64 << 10


def pool(hidden: torch.Tensor, mask: torch.Tensor, kind: Literal["mean", "last"]) -> torch.Tensor:
    """(B, T, C) hidden states and a (B, T) mask of real tokens -> (B, C) unit vectors (differentiable).

    "mean": the average over the masked tokens; "last": the last masked token of each row (rows are
    right-padded, or at least their real tokens are contiguous from the left). A row without tokens is an error.
    """
    mask = mask.to(torch.bool)
    counts = mask.sum(dim=1)  # (B,)
    if bool((counts == 0).any()):
        raise ValueError("pool: a row has no tokens")
    if kind == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out = (hidden * m).sum(dim=1) / counts.unsqueeze(-1).to(hidden.dtype)  # (B, C)
    elif kind == "last":
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), counts - 1]  # (B, C)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")
    return F.normalize(out.float(), dim=-1).to(hidden.dtype)


def weights_fingerprint(root: str | Path) -> str:
    """sha256 over the checkpoint's weight files (see the module docstring)."""
    root = Path(root)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        raise InputError(f"checkpoint {root}: no weight files (*.safetensors, *.bin) to fingerprint")
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= FULL_HASH_BYTES:
                while block := f.read(1 << 20):
                    h.update(block)
            else:
                for i in range(SAMPLE_BLOCKS):
                    f.seek((size - SAMPLE_BYTES) * i // (SAMPLE_BLOCKS - 1))
                    h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


@dataclass
class Embedder:
    """A loaded model and its tokenizer, encoding texts into (n, dim) float32 unit vectors."""

    model: Transformer
    tokenizer: HFTokenizer
    pooling: str
    max_len: int
    batch_size: int
    identity: dict[str, Any]
    """What an index's manifest records: model, weights_sha256, pooling, max_len, dim."""

    @property
    def dim(self) -> int:
        return int(self.model.cfg.dim)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (with the tokenizer's special tokens), cut to max_len."""
        # One batched call (the Rust tokenizer's threads), as HFTokenizer.encode does for one text.
        ids = [e.ids[: self.max_len] for e in self.tokenizer.tokenizer.encode_batch(texts, add_special_tokens=True)]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise InputError(f"cannot embed empty text (texts {empty[:5]} have no tokens)")
        return ids

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors, in the order of `texts`."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(list(texts))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        device = next(self.model.parameters()).device
        for b in range(0, len(order), self.batch_size):
            rows = order[b:b + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            tokens = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, i in enumerate(rows):
                tokens[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = True
            hidden = self.model(tokens.to(device), hidden_only=True)  # (B, T, C)
            vecs = pool(hidden, mask.to(device), self.pooling)  # type: ignore[arg-type]
            out[rows] = vecs.float().cpu().numpy()
        return out


def _retriever_defaults(root: Path) -> dict[str, Any]:
    path = root / "retriever.json"
    if not path.is_file():
        return {}
    d = read_json_object(path)
    if not set(d) <= {"pooling", "max_len"}:
        raise InputError(f"{path}: expected a JSON object with 'pooling' and 'max_len', got {d!r}"[:300])
    return d


def load_embedder(path: str | Path, *, pooling: str | None = None, max_len: int | None = None,
                  batch_size: int = 32, device: str | torch.device = "cpu") -> Embedder:
    """The encoder of checkpoint `path` (HF layout or a run directory). pooling / max_len None: the
    checkpoint's retriever.json's, else "mean" and 256 tokens (never more than the model's context)."""
    ckpt = open_checkpoint(path)
    defaults = _retriever_defaults(ckpt.path)
    pooling = pooling or str(defaults.get("pooling", "mean"))
    if pooling not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    max_len = max_len if max_len is not None else defaults.get("max_len", 256)
    if type(max_len) is not int or max_len < 1:
        raise InputError(f"max_len must be >= 1, got {max_len}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    max_len = min(max_len, ckpt.config.max_seq_len)
    loaded = ckpt.load(device=device)
    identity = {"model": str(ckpt.path.resolve()), "weights_sha256": weights_fingerprint(ckpt.path),
                "pooling": pooling, "max_len": max_len, "dim": int(ckpt.config.dim)}
    return Embedder(loaded.model.eval(), ckpt.tokenizer, pooling, max_len, batch_size, identity)
