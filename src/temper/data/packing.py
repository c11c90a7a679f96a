"""Variable-length examples -> fixed-shape batches: packing with document boundaries, and buckets.

Two ways to batch examples of different lengths (SFT conversations, preference pairs):
- packing: several documents share one row of `seq_len` tokens, chosen by best-fit-decreasing
  bin packing (Johnson 1973; Krell et al. 2021, "Efficient Sequence Packing without
  Cross-contamination"). Each token records which document of its row it belongs to and its
  position within that document, so attention can stop at document boundaries
  (the model's `Segments(doc_ids)`) and positions restart at 0: a packed row then gives the logits of
  running its documents one by one, without their padding.
- bucketing: each row holds one example, and examples of similar length share a batch (sorted
  within large shuffled pools, then the batches shuffled), so little of a padded batch is
  padding. `padding_fraction` measures it.

Targets follow the token stream: a token's target is the next token of the same document, and
IGNORE_INDEX at padding, at a document's last token (nothing of it follows) and where the
caller's loss mask says a token is not to be learnt (SFT prompts).

It does not read shards, tokenize or render chat templates, and knows nothing of models; it
builds the tensors that a model's `positions` and `Segments` take.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100
"""The target that the loss skips; equal to `temper.train.step.IGNORE_INDEX` (a test checks it;
`data` may not import `train`)."""


class Piece(NamedTuple):
    """Tokens [start, stop) of document `doc`, placed in a row."""

    doc: int
    start: int
    stop: int


@dataclass
class PackedBatch:
    """Rows of documents, each (B, T) int64; padding sits at the end of a row."""

    tokens: torch.Tensor
    """Token ids; `pad_id` at padding."""
    targets: torch.Tensor
    """The next token of the same document, or IGNORE_INDEX (padding, a document's end, masked tokens)."""
    positions: torch.Tensor
    """Position of each token within its document: 0, 1, ... restarting at every document; 0 at padding."""
    doc_ids: torch.Tensor
    """Which document of its row a token belongs to: 0, 1, ... in row order; -1 at padding."""
    pieces: list[list[Piece]]
    """Per row, the (document, start, stop) slices it holds, in order: where every token came from."""

    @property
    def padding_fraction(self) -> float:
        """Share of the B*T slots that hold padding."""
        return float((self.doc_ids < 0).double().mean()) if self.doc_ids.numel() else 0.0

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device` (through pinned memory to a GPU, so the copy overlaps compute)."""
        pinned = torch.device(device).type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device)

        return PackedBatch(move(self.tokens), move(self.targets), move(self.positions), move(self.doc_ids),
                           self.pieces)


def plan_packing(
    lengths: Sequence[int], seq_len: int, *, overflow: Literal["split", "truncate"] = "split"
) -> list[list[Piece]]:
    """Which documents (or slices of them) go in which row of `seq_len` tokens: best-fit-decreasing.

    Pieces are placed longest first, each into the fullest row that still has room (ties: the
    earliest row), or a new row; the same lengths always give the same plan. A document longer than
    `seq_len` is cut into `seq_len` pieces plus a remainder ("split": every token is kept) or cut
    to its first `seq_len` tokens ("truncate"). Empty documents are left out.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if overflow not in ("split", "truncate"):
        raise ValueError(f"unknown overflow {overflow!r}: expected 'split' or 'truncate'")
    pieces = []
    for doc, n in enumerate(lengths):
        n = int(n)
        if n < 0:
            raise ValueError(f"document {doc} has negative length {n}")
        stop = min(n, seq_len) if overflow == "truncate" else n
        pieces += [Piece(doc, s, min(s + seq_len, stop)) for s in range(0, stop, seq_len)]
    # Longest first, then document order: a total order, so the plan does not depend on sort stability.
    pieces.sort(key=lambda p: (p.start - p.stop, p.doc, p.start))

    rows: list[list[Piece]] = []
    by_room: dict[int, list[int]] = {}  # free slots -> heap of row numbers with exactly that many
    rooms: list[int] = []  # sorted distinct keys of by_room, for a bisect to the best fit
    for piece in pieces:
        need = piece.stop - piece.start
        i = bisect.bisect_left(rooms, need)
        if i < len(rooms):
            room = rooms[i]
            row = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(i)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(piece)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(by_room[left], row)
    return rows


def collate_rows(
    docs: Sequence[np.ndarray],
    rows: Sequence[Sequence[Piece]],
    seq_len: int,
    *,
    loss_masks: Sequence[np.ndarray] | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> PackedBatch:
    """Materialise rows of pieces (from `plan_packing`, or one document per row) as a PackedBatch.

    loss_masks: per document, a bool array of its length, True where a token is to be learnt as a
        target (e.g. only the response of an SFT example); the target that predicts a False token
        becomes ignore_index. None: every token is learnt.
    A piece that ends before its document does still predicts the document's next token (it is
    the same document, not a boundary); only a document's very last token predicts nothing.
    """
    if loss_masks is not None:
        if len(loss_masks) != len(docs):
            raise ValueError(f"{len(loss_masks)} loss masks for {len(docs)} documents")
        loss_masks = [np.asarray(m, dtype=bool) for m in loss_masks]
        for doc, (m, ids) in enumerate(zip(loss_masks, docs, strict=True)):
            if m.shape != np.shape(ids):
                raise ValueError(f"loss mask of document {doc} has shape {m.shape}, its tokens {np.shape(ids)}")
    B = len(rows)
    tokens = np.full((B, seq_len), pad_id, dtype=np.int64)
    targets = np.full((B, seq_len), ignore_index, dtype=np.int64)
    positions = np.zeros((B, seq_len), dtype=np.int64)
    doc_ids = np.full((B, seq_len), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        col = 0
        for k, (doc, start, stop) in enumerate(row):
            n = stop - start
            if col + n > seq_len:
                raise ValueError(f"row {r} holds more than seq_len={seq_len} tokens")
            ids = np.asarray(docs[doc])
            if not 0 <= start <= stop <= len(ids):
                raise ValueError(f"piece {(doc, start, stop)} is outside document {doc} of length {len(ids)}")
            tokens[r, col : col + n] = ids[start:stop]
            positions[r, col : col + n] = np.arange(n)
            doc_ids[r, col : col + n] = k
            nxt = ids[start + 1 : stop + 1].astype(np.int64)  # the next token of this document, where there is one
            if loss_masks is not None:
                nxt = np.where(loss_masks[doc][start + 1 : stop + 1], nxt, ignore_index)
            targets[r, col : col + len(nxt)] = nxt
            col += n
    as_t = torch.from_numpy
    return PackedBatch(as_t(tokens), as_t(targets), as_t(positions), as_t(doc_ids), [list(row) for row in rows])


def pack_documents(
    docs: Sequence[np.ndarray],
    seq_len: int,
    *,
    overflow: Literal["split", "truncate"] = "split",
    loss_masks: Sequence[np.ndarray] | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> PackedBatch:
    """Pack variable-length token sequences into rows of `seq_len` (`plan_packing` + `collate_rows`).

    Rows come longest-first, as the packing placed them: shuffle the rows (or take them in a
    seeded order) before training on them.
    """
    rows = plan_packing([len(d) for d in docs], seq_len, overflow=overflow)
    return collate_rows(docs, rows, seq_len, loss_masks=loss_masks, pad_id=pad_id, ignore_index=ignore_index)


def pad_batch(
    docs: Sequence[np.ndarray],
    indices: Sequence[int],
    *,
    pad_to_multiple_of: int = 1,
    loss_masks: Sequence[np.ndarray] | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> PackedBatch:
    """One document per row (a batch from `bucket_by_length`), right-padded to the longest.

    `pad_to_multiple_of` rounds the width up (e.g. to 8 for tensor cores, or to limit the number
    of shapes a compiled model sees). `doc_ids` is 0 on real tokens and -1 on padding, the model's
    segments as they are; positions are 0 .. T-1.
    """
    longest = max((len(docs[i]) for i in indices), default=0)
    width = -(-max(longest, 1) // pad_to_multiple_of) * pad_to_multiple_of
    rows = [[Piece(int(i), 0, len(docs[i]))] for i in indices]
    return collate_rows(docs, rows, width, loss_masks=loss_masks, pad_id=pad_id, ignore_index=ignore_index)


def bucket_by_length(
    lengths: Sequence[int],
    *,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    pool_size: int = 4096,
) -> list[list[int]]:
    """Batches of example indices with little padding, a pure function of (lengths, seed, epoch).

    The examples are shuffled by a permutation seeded with (seed, epoch) and cut into pools of
    `pool_size`; each pool is sorted by length (longest first, ties by index) and cut into
    batches of at most `batch_size` examples and at most `max_tokens` padded tokens (batch size
    times its longest example); the batches of all pools are then shuffled. A bigger pool pads
    less, a smaller one mixes lengths more randomly across epochs (the "megabatch" of Hugging
    Face's LengthGroupedSampler and fairseq's bucketing). Every example is in exactly one batch.
    """
    if max_tokens is None and batch_size is None:
        raise ValueError("give max_tokens, batch_size or both")
    if (batch_size is not None and batch_size < 1) or (max_tokens is not None and max_tokens < 1) or pool_size < 1:
        raise ValueError("batch_size, max_tokens and pool_size must be >= 1")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if max_tokens is not None and lens.size and lens.max() > max_tokens:
        i = int(lens.argmax())
        raise ValueError(f"example {i} has {lens[i]} tokens, more than max_tokens={max_tokens}: truncate or drop it first")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lens))
    batches: list[list[int]] = []
    for p in range(0, len(order), pool_size):
        pool = order[p : p + pool_size]
        pool = pool[np.lexsort((pool, -lens[pool]))]  # longest first, ties by index
        i = 0
        while i < len(pool):
            fits = len(pool) - i if batch_size is None else batch_size
            if max_tokens is not None:  # sorted descending, so the first example is the batch's longest
                fits = min(fits, max_tokens // max(int(lens[pool[i]]), 1))
            batches.append(pool[i : i + fits].tolist())
            i += fits
    return [batches[j] for j in rng.permutation(len(batches))]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded slots (each batch padded to its longest example) that hold padding."""
    lens = np.asarray(lengths, dtype=np.int64)
    padded = sum(len(b) * int(lens[list(b)].max()) for b in batches if len(b))
    real = sum(int(lens[list(b)].sum()) for b in batches if len(b))
    return 1.0 - real / padded if padded else 0.0
