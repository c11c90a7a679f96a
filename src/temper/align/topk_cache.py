"""The teacher's top-k next-token log-probs, computed once and kept on disk for every epoch of distillation.

What it saves: on the fly, distillation runs the teacher's forward pass on every training token of
every epoch (and again on the steps a resumed run repeats); with the cache it runs once per token of
the data set, so E epochs cost 1 teacher pass instead of E, and the teacher need not be in memory
while the student trains. What it costs: k x (4 + 2) bytes per cached position (int32 ids, float16
log-probs; k x 8 with float32), e.g. 192 bytes per token at k = 32 (about 19 GB per 100M tokens),
against 2 x V bytes for the full bf16 logits (256 KB per token at a 128k vocabulary).

The data set is a sequence of *units* (a fixed pretraining window, an SFT example), each with the
positions whose targets are learnt, in order. Layout of the cache directory:
  ids.bin      int32 (P, k)   the teacher's k most likely next tokens at each of the P positions
  logps.bin    float16|32 (P, k)  their log-probabilities under the full softmax at temperature 1
  offsets.bin  int64 (U + 1,) unit u's positions are rows offsets[u] .. offsets[u + 1] - 1
  manifest.json  format, k, dtype, shapes, a fingerprint of what was cached (teacher, data, lengths)
                 and each file's size and sha256, written last
The cache is built in `<dir>.partial` and renamed into place when complete, so a crash leaves no
half cache behind; one whose checksums or fingerprint do not match is rebuilt, never read.
Under torchrun every rank runs the teacher on its share of the batches and writes its rows of the
same files (a shared filesystem); rank 0 writes the manifest.

It does not decide what a unit is or how batches are drawn (the recipe does) and computes no loss
(align/distill.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from temper.align.distill import distill_chunk_tokens
from temper.files import atomic_write_json, fsync_dir, sha256_file
from temper.train.losses import IGNORE_INDEX, Batch
from temper.train.step import autocast

FORMAT = "temper-topk-cache"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class TopKCache:
    """A complete cache, memory-mapped: `positions(units)` gives what a batch of those units needs."""

    path: Path
    k: int
    offsets: np.ndarray  # (U + 1,) int64
    ids: np.ndarray  # (P, k) int32
    logps: np.ndarray  # (P, k) float16 | float32

    @property
    def units(self) -> int:
        return len(self.offsets) - 1

    def positions(self, units: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The batch extras `teacher_ids` (N, k) int64 and `teacher_logps` (N, k) float32 of these units'
        positions, concatenated in the order given (row-major order of a batch whose rows, or whose rows'
        pieces, hold the units in that order)."""
        spans = [(int(self.offsets[u]), int(self.offsets[u + 1])) for u in units]
        ids = np.concatenate([self.ids[a:b] for a, b in spans]) if spans else np.zeros((0, self.k), np.int32)
        logps = np.concatenate([self.logps[a:b] for a, b in spans]) if spans else np.zeros((0, self.k), np.float32)
        return {"teacher_ids": torch.from_numpy(ids.astype(np.int64)).to(device),
                "teacher_logps": torch.from_numpy(logps.astype(np.float32)).to(device)}


def fingerprint(meta: dict) -> str:
    """sha256 of what a cache holds (teacher, data, lengths, k, dtype), as canonical JSON."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def open_cache(path: str | Path, expected: str, verify: bool = True) -> tuple[TopKCache | None, str]:
    """(the cache at `path`, "") when it is complete, holds what `expected` (a `fingerprint`) names and its
    files match their checksums; else (None, why not) — absent, stale or corrupt: the caller rebuilds it."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None, "no cache yet"
    try:
        m = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            return None, f"{path / MANIFEST} is not a {FORMAT} v{VERSION} manifest"
        if m["fingerprint"] != expected:
            return None, f"{path} caches another teacher, data set or setting"
        for name, info in m["files"].items():
            f = path / name
            if not f.is_file() or f.stat().st_size != info["bytes"]:
                return None, f"{f} is missing or has the wrong size"
            if verify and sha256_file(f) != info["sha256"]:
                return None, f"{f} does not match its checksum"
        k, positions, units, dtype = int(m["k"]), int(m["positions"]), int(m["units"]), DTYPES[m["dtype"]]
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged manifest: rebuild, never trust it
        return None, f"{path / MANIFEST} is unreadable ({e})"
    offsets = np.fromfile(path / "offsets.bin", dtype=np.int64)
    if len(offsets) != units + 1 or offsets[-1] != positions:
        return None, f"{path / 'offsets.bin'} does not match the manifest"
    ids = np.memmap(path / "ids.bin", dtype=np.int32, mode="r", shape=(positions, k)) if positions else \
        np.zeros((0, k), np.int32)
    logps = np.memmap(path / "logps.bin", dtype=dtype, mode="r", shape=(positions, k)) if positions else \
        np.zeros((0, k), dtype)
    return TopKCache(path, k, offsets, ids, logps), ""


def _top_k(teacher: nn.Module, batch: Batch, valid: torch.Tensor, k: int, amp_dtype: torch.dtype | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's k most likely next tokens (N, k) int32 and their log-probs (N, k) float32 at the valid
    positions: the output layer and the softmax a chunk of positions at a time (`distill_chunk_tokens`), so a
    128k vocabulary never holds the batch's (N x V) logits."""
    with autocast(batch.inputs.device, amp_dtype):
        hidden = teacher(batch.inputs, logits_at=valid, hidden_only=True, **batch.model_kwargs)  # (N, C)
        chunk = distill_chunk_tokens(teacher.cfg.vocab_size)
        ids, logps = [], []
        for lo in range(0, hidden.shape[0], chunk):
            logits = teacher.logits(hidden[lo:lo + chunk])  # (n, V)
            top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # (n, k) each
            del logits  # before the next chunk's: one chunk's logits alive at a time
            ids.append(top.indices.to(torch.int32).cpu())
            logps.append(top.values.cpu())
    if not ids:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return torch.cat(ids).numpy(), torch.cat(logps).numpy()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def build_cache(
    path: str | Path, teacher: nn.Module, n_batches: int, batch_of: Callable[[int], tuple[Sequence[int], Batch]],
    counts: Sequence[int], *, k: int, dtype: str = "float16", fingerprint: str, amp_dtype: torch.dtype | None = None,
    rank: int = 0, world: int = 1, log: Callable[[str], None] | None = None,
) -> TopKCache:
    """Run `teacher` once over the data set and write the cache at `path` (module docstring).

    batch_of(j) for j < n_batches: (the units of its rows, in row order; the Batch), one unit per row,
    whose valid targets are the unit's positions; counts[u]: unit u's positions (checked against the
    batches). Every rank calls this; rank r runs batches j = r, r + world, ... (the same batches whatever
    the world size, so the cache is too)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
    P, np_dtype = int(offsets[-1]), DTYPES[dtype]
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a crash's leftover
        partial.mkdir(parents=True)
        offsets.tofile(partial / "offsets.bin")
        for name, dt in (("ids.bin", np.int32), ("logps.bin", np_dtype)):  # sized now, filled by every rank
            with open(partial / name, "wb") as f:
                f.truncate(P * k * np.dtype(dt).itemsize)
    _barrier()
    t0 = time.perf_counter()
    if P:
        ids = np.memmap(partial / "ids.bin", dtype=np.int32, mode="r+", shape=(P, k))
        logps = np.memmap(partial / "logps.bin", dtype=np_dtype, mode="r+", shape=(P, k))
        teacher.eval()
        for j in range(rank, n_batches, world):
            units, batch = batch_of(j)
            valid = batch.targets != IGNORE_INDEX  # (B, T)
            per_row = valid.sum(-1).tolist()
            want = [int(offsets[u + 1] - offsets[u]) for u in units]
            if per_row != want:
                raise ValueError(f"cache batch {j}: rows have {per_row} valid targets, the units {want}")
            top_ids, top_logps = _top_k(teacher, batch, valid, k, amp_dtype)
            row = 0
            for u, n in zip(units, want, strict=True):
                a = int(offsets[u])
                ids[a:a + n], logps[a:a + n] = top_ids[row:row + n], top_logps[row:row + n].astype(np_dtype)
                row += n
        ids.flush()
        logps.flush()
        del ids, logps
    _barrier()
    if rank == 0:
        files = {name: {"bytes": (partial / name).stat().st_size, "sha256": sha256_file(partial / name)}
                 for name in ("ids.bin", "logps.bin", "offsets.bin")}
        atomic_write_json(partial / MANIFEST, {
            "format": FORMAT, "version": VERSION, "k": k, "dtype": dtype, "units": len(counts), "positions": P,
            "bytes_per_position": k * (4 + np.dtype(np_dtype).itemsize), "fingerprint": fingerprint, "files": files})
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        fsync_dir(path.parent)
        if log is not None:
            size = sum(f["bytes"] for f in files.values())
            log(f"teacher top-{k} cache: {P} positions of {len(counts)} units, {size / 2**20:.1f} MiB, "
                f"built in {time.perf_counter() - t0:.1f}s at {path}")
    _barrier()
    cache, why = open_cache(path, fingerprint, verify=False)
    if cache is None:  # only if another process changed it under us
        raise RuntimeError(f"the top-k cache just written is not readable: {why}")
    return cache
