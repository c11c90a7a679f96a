"""Documents -> chunks: windows of `size` tokens that overlap by `overlap`, each keeping its source, title and place.

A chunk is a window of a document's tokens (the tokenizer of the embedding model, so a chunk never
exceeds what the encoder reads) turned back into the document's own text by the tokenizer's character
offsets: the text of a chunk is a slice of the document, not a decode of ids, so BM25 and the prompt see
the words as written. Windows start every `size - overlap` tokens; the last one ends at the document's end.

Titles: a document's `meta["title"]` when its reader kept one (JSONL/Parquet `meta_fields=("title",)`),
else its first line when that line is a top-level heading ("= Title =", WikiText's markup), else the
file's name. `split_articles` cuts a text document at its top-level headings, so a WikiText file read
as one document becomes one document per article.

It does not read files (`temper.data.sources` does), embed, or index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from temper.data.sources import Document
from temper.errors import InputError

# A top-level WikiText heading: " = Title = " (sections are "= = Section = =", which this does not match).
_HEADING = re.compile(r"^ ?= ([^=].*?) = ?$")


@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a document."""

    id: int
    """Position of the chunk in its index (0, 1, ...): what retrieval returns and labelled sets name."""
    text: str
    source: str
    """Where the document came from: its id when the reader kept one, else "file:line"."""
    title: str
    position: int
    """Index of the chunk within its document (0 for the first window)."""
    start: int
    """First token of the window, counted in the document's tokens."""
    end: int
    """One past the last token of the window."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chunk:
        return cls(id=int(d["id"]), text=str(d["text"]), source=str(d["source"]), title=str(d["title"]),
                   position=int(d["position"]), start=int(d["start"]), end=int(d["end"]))


def check_window(size: int, overlap: int) -> None:
    """Raise InputError unless 0 <= overlap < size."""
    if size < 1:
        raise InputError(f"chunk size must be >= 1 token, got {size}")
    if not 0 <= overlap < size:
        raise InputError(f"chunk overlap must be in [0, size={size}), got {overlap}")


def _offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character span of each token of `text` (no special tokens): from a `tokenizers.Tokenizer` or an
    HFTokenizer (`temper.data.tokenizer`), which wraps one."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    return list(tok.encode(text, add_special_tokens=False).offsets)


def chunk_document(doc_text: str, source: str, title: str, tokenizer: Any, size: int, overlap: int,
                   *, first_id: int = 0) -> list[Chunk]:
    """The chunks of one document, numbered from `first_id`; none for a document without tokens."""
    check_window(size, overlap)
    spans = _offsets(tokenizer, doc_text)
    chunks: list[Chunk] = []
    step = size - overlap
    start = 0
    while start < len(spans):
        end = min(start + size, len(spans))
        text = doc_text[spans[start][0]:spans[end - 1][1]].strip()
        if text:
            chunks.append(Chunk(first_id + len(chunks), text, source, title, len(chunks), start, end))
        if end == len(spans):
            break
        start += step
    return chunks


def title_of(doc: Document) -> str:
    """The title rule of the module docstring."""
    if doc.meta and isinstance(doc.meta.get("title"), str) and doc.meta["title"].strip():
        return doc.meta["title"].strip()
    first = doc.text.lstrip("\n").split("\n", 1)[0]
    m = _HEADING.match(first.rstrip())
    if m:
        return m.group(1).strip()
    return Path(doc.source).name


def split_articles(doc: Document) -> list[Document]:
    """`doc` cut before each top-level heading line ("= Title ="); the text before the first one stays a
    document of its own when it has any. Each piece keeps the line it starts on."""
    lines = doc.text.split("\n")
    starts = [i for i, line in enumerate(lines) if _HEADING.match(line.rstrip())]
    if not starts:
        return [doc]
    if starts[0] != 0:
        starts.insert(0, 0)
    out = []
    for a, b in zip(starts, starts[1:] + [len(lines)], strict=True):
        text = "\n".join(lines[a:b])
        if text.strip():
            out.append(Document(text=text, source=doc.source, line=doc.line + a, id=doc.id, meta=doc.meta))
    return out


def chunk_documents(docs: Iterable[Document], tokenizer: Any, size: int, overlap: int, *, first_id: int = 0,
                    articles: bool = False) -> Iterator[Chunk]:
    """Chunks of every document in order, numbered from `first_id`; with `articles`, text documents are
    first cut at their top-level headings (`split_articles`)."""
    check_window(size, overlap)
    next_id = first_id
    for doc in docs:
        for piece in split_articles(doc) if articles else [doc]:
            source = piece.id if piece.id is not None else f"{piece.source}:{piece.line}"
            chunks = chunk_document(piece.text, source, title_of(piece), tokenizer, size, overlap, first_id=next_id)
            next_id += len(chunks)
            yield from chunks
