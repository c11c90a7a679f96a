"""Raw files -> documents: the first step of the data's journey.

Reads plain text files (.txt, .py, .md, ... and their .gz) and JSON Lines (.jsonl, .ndjson and
their .gz, one object per line, text in a chosen field) named by paths, directories or globs
(`**` is recursive), and yields `Document`s in a deterministic order (files sorted per pattern).
Everything is streamed in bounded pieces: no line or document longer than `max_line_bytes` is
ever held in memory, however long it is on disk.

Bad input is expected, not exceptional. Invalid UTF-8 becomes U+FFFD (counted) or, with
`strict_utf8`, an error naming file:line and byte offset; a byte-order mark, NUL characters and
lone surrogates from JSON escapes (which the Rust tokenizer cannot take) are repaired and
counted; CRLF line ends of text files become LF; empty and whitespace-only documents are
dropped and counted. A bad record (invalid JSON, not an object, missing field, line too long,
truncated gzip) either stops the run (`on_error="fail"`) with a `DataError` naming file:line,
or is skipped and counted by reason (`on_error="skip"`) until more than `max_skip_fraction` of
all records are bad.
Messages never contain the record's content, which may be private.

It does not filter for quality, deduplicate or tokenize: see filters.py, dedup.py, tokenizer.py.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MAX_LINE_BYTES = 64 << 20
TXT_DOCS = ("file", "paragraph", "line")
ON_ERROR = ("fail", "skip")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_CHUNK = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd".encode()
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
# A skip fraction measured over a handful of records says little; before this many records the
# limit is only checked at the end.
_MIN_RECORDS_FOR_EARLY_ABORT = 1000


class DataError(ValueError):
    """Input that cannot be read as documents. The message names file:line, never the content."""


@dataclass(frozen=True)
class Document:
    """One document of raw text and where it came from."""

    text: str
    source: str
    """The file it was read from."""
    line: int
    """1-based line of the file where the document starts."""


@dataclass
class ReadStats:
    """What reading saw, filled in as documents are yielded."""

    files: int = 0
    documents: int = 0
    """Documents yielded."""
    errors: Counter = field(default_factory=Counter)
    """Bad records skipped, by reason (these count against max_skip_fraction)."""
    dropped: Counter = field(default_factory=Counter)
    """Records dropped by design, by reason (e.g. "empty")."""
    repaired: Counter = field(default_factory=Counter)
    """Characters repaired, by kind: invalid_utf8 (U+FFFD inserted), lone_surrogate, nul, bom."""
    examples: list[str] = field(default_factory=list)
    """The first few skipped records as "file:line: reason", to find them again."""

    @property
    def records(self) -> int:
        return self.documents + sum(self.errors.values()) + sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "documents": self.documents,
            "errors": dict(self.errors),
            "dropped": dict(self.dropped),
            "repaired": dict(self.repaired),
        }


def expand_inputs(inputs: str | Sequence[str], exclude: Sequence[str] = ()) -> list[Path]:
    """Paths, directories (all files below) and globs -> the list of files, sorted per pattern."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: dict[str, None] = {}  # ordered set: a file named by two patterns is read once
    for pattern in map(str, inputs):
        if "\x00" in pattern:
            raise DataError(f"input {pattern!r} contains a NUL byte")
        if any(c in pattern for c in "*?["):
            matches = glob.glob(pattern, recursive=True)
        elif os.path.isdir(pattern):
            matches = glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise DataError(f"input {pattern!r}: no such file or directory")
        matches = [m for m in matches if os.path.isfile(m)]
        matches = [m for m in matches if not any(fnmatch.fnmatch(m, x) for x in exclude)]
        if not matches:
            raise DataError(f"input {pattern!r} matches no files")
        files.update(dict.fromkeys(sorted(matches)))
    return [Path(f) for f in files]


def read_documents(inputs: str | Sequence[str], *, exclude: Sequence[str] = (), **options: Any) -> Iterator[Document]:
    """Stream the documents of `inputs` (paths, directories, globs); `options` as for `read_files`."""
    return read_files(expand_inputs(inputs, exclude), **options)


def read_files(
    files: Sequence[str | os.PathLike],
    *,
    text_field: str = "text",
    txt_docs: str = "file",
    on_error: str = "fail",
    max_skip_fraction: float = 0.01,
    strict_utf8: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Stream the documents of `files`, in order; pass a `ReadStats` to see what was skipped or
    repaired.

    Arguments are checked now; files are read as the iterator is consumed. `txt_docs` says what
    a document is in a text file: the whole "file", a blank-line separated "paragraph", or a
    "line". JSONL files are recognised by name (.jsonl, .ndjson, optionally .gz).
    """
    if txt_docs not in TXT_DOCS:
        raise ValueError(f"txt_docs must be one of {TXT_DOCS}, got {txt_docs!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
    reader = _Reader(text_field, txt_docs, on_error, max_skip_fraction, strict_utf8, max_line_bytes,
                     stats if stats is not None else ReadStats())
    return reader.read([Path(f) for f in files])


def _lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield (line number, byte offset, line) with its newline; line is None when it is longer
    than `max_bytes`, and then it was skipped in bounded reads instead of being loaded."""
    offset = 0
    number = 0
    while line := f.readline(max_bytes + 1):
        number += 1
        size = len(line)
        if size > max_bytes and not line.endswith(b"\n"):
            line = None
            while rest := f.readline(_CHUNK):
                size += len(rest)
                if rest.endswith(b"\n"):
                    break
        yield number, offset, line
        offset += size


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(_JSONL_SUFFIXES)


class _Reader:
    """The options and counters of one read; its methods are the per-format readers."""

    def __init__(self, text_field: str, txt_docs: str, on_error: str, max_skip_fraction: float,
                 strict_utf8: bool, max_line_bytes: int, stats: ReadStats):
        self.text_field = text_field
        self.txt_docs = txt_docs
        self.on_error = on_error
        self.max_skip_fraction = max_skip_fraction
        self.strict_utf8 = strict_utf8
        self.max_line_bytes = max_line_bytes
        self.stats = stats

    def read(self, files: list[Path]) -> Iterator[Document]:
        for path in files:
            self.stats.files += 1
            try:
                with _open(path) as f:
                    yield from (self._jsonl(f, path) if _is_jsonl(path) else self._text(f, path))
            except EOFError as e:  # gzip's "Compressed file ended before the end-of-stream marker"
                self._problem("truncated_gzip", str(path), "truncated gzip file", e)
            except (gzip.BadGzipFile, zlib.error) as e:
                self._problem("corrupt_gzip", str(path), f"corrupt gzip file ({e})", e)
        self._check_fraction(final=True)

    # -- problems and counters ---------------------------------------------------------------

    def _problem(self, reason: str, where: str, message: str, cause: BaseException | None = None) -> None:
        """A bad record: raise (on_error="fail") or count it and go on."""
        if self.on_error == "fail":
            raise DataError(f"{where}: {message}") from cause
        self.stats.errors[reason] += 1
        if len(self.stats.examples) < 10:
            self.stats.examples.append(f"{where}: {message}")
        self._check_fraction(final=False)

    def _check_fraction(self, final: bool) -> None:
        bad, seen = sum(self.stats.errors.values()), self.stats.records
        if seen == 0 or (not final and seen < _MIN_RECORDS_FOR_EARLY_ABORT):
            return
        if bad > self.max_skip_fraction * seen:
            raise DataError(
                f"{bad} of {seen} records were bad input ({bad / seen:.1%}), above "
                f"max_skip_fraction={self.max_skip_fraction}: {dict(self.stats.errors)}; "
                f"first ones: {self.stats.examples[:3]}"
            )

    def _decode(self, raw: bytes, path: Path, line: int, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.strict_utf8:
                bad_line = line + raw.count(b"\n", 0, e.start)
                raise DataError(
                    f"{path}:{bad_line}: invalid UTF-8 at byte offset {offset + e.start} ({e.reason})"
                ) from None  # the exception's object is the raw line: keep it out of tracebacks
            text = raw.decode("utf-8", "replace")
            self.stats.repaired["invalid_utf8"] += text.count("\ufffd") - raw.count(_REPLACEMENT)
            return text

    def _emit(self, text: str, path: Path, line: int, from_json: bool) -> Iterator[Document]:
        """Repair what the tokenizer cannot take, drop empty documents, yield the rest."""
        if "\x00" in text:  # NUL never carries meaning in text, and C tools stop at it
            self.stats.repaired["nul"] += text.count("\x00")
            text = text.replace("\x00", "")
        if from_json and not text.isascii():
            # json.loads turns "\ud800" into a lone surrogate, which cannot be encoded as UTF-8
            # and makes the tokenizer raise much later; replace it now.
            text, n = _SURROGATE.subn("\ufffd", text)
            self.stats.repaired["lone_surrogate"] += n
        if not text.strip():
            self.stats.dropped["empty"] += 1
            return
        self.stats.documents += 1
        yield Document(text, str(path), line)

    # -- formats -----------------------------------------------------------------------------

    def _jsonl(self, f: BinaryIO, path: Path) -> Iterator[Document]:
        field_ = self.text_field
        for number, offset, raw in _lines(f, self.max_line_bytes):
            where = f"{path}:{number}"
            if raw is None:
                self._problem("too_long", where, f"line exceeds max_line_bytes ({self.max_line_bytes})")
                continue
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
                self.stats.repaired["bom"] += 1
            if not raw.strip():
                continue  # blank lines (a trailing one is common) are not records
            try:
                obj = json.loads(self._decode(raw, path, number, offset))
            except json.JSONDecodeError as e:
                self._problem("malformed_json", where, f"invalid JSON ({e.msg} at column {e.colno})", e)
                continue
            if not isinstance(obj, dict):
                kind = _JSON_TYPES.get(type(obj), "null")
                self._problem("not_object", where, f"expected a JSON object, got {kind}")
                continue
            if field_ not in obj:
                keys = ", ".join(k[:40] for k in sorted(obj)[:10])  # names help; values never shown
                self._problem(f"missing_field:{field_}", where, f"missing field {field_!r} (keys: {keys})")
                continue
            value = obj[field_]
            if not isinstance(value, str):
                kind = _JSON_TYPES.get(type(value), "null")
                self._problem(f"not_string:{field_}", where, f"field {field_!r} is {kind}, not a string")
                continue
            yield from self._emit(value, path, number, from_json=True)

    def _text(self, f: BinaryIO, path: Path) -> Iterator[Document]:
        if self.txt_docs == "file":
            raw = self._read_capped(f)
            if raw is None:
                self._problem("too_long", str(path), f"document exceeds max_line_bytes ({self.max_line_bytes})")
            else:
                yield from self._text_doc([raw], path, 1, 0)
            return
        para: list[bytes] = []  # the paragraph being collected
        start = (1, 0)  # its (line, offset)
        size = 0
        too_long = False
        for number, offset, raw in _lines(f, self.max_line_bytes):
            if self.txt_docs == "line":
                if raw is None:
                    self._problem("too_long", f"{path}:{number}",
                                  f"line exceeds max_line_bytes ({self.max_line_bytes})")
                else:
                    yield from self._text_doc([raw], path, number, offset, strip_newline=True)
                continue
            if raw is not None and not raw.strip():  # a blank line ends the paragraph
                yield from self._end_paragraph(para, path, start, too_long)
                para, size, too_long = [], 0, False
                continue
            if not para and not too_long:
                start = (number, offset)
            size += self.max_line_bytes + 1 if raw is None else len(raw)
            if size > self.max_line_bytes:
                too_long, para = True, []  # keep skipping lines until the paragraph ends
            else:
                para.append(raw)
        yield from self._end_paragraph(para, path, start, too_long)

    def _end_paragraph(self, para: list[bytes], path: Path, start: tuple[int, int],
                       too_long: bool) -> Iterator[Document]:
        if too_long:
            self._problem("too_long", f"{path}:{start[0]}",
                          f"paragraph exceeds max_line_bytes ({self.max_line_bytes})")
        elif para:
            yield from self._text_doc(para, path, *start, strip_newline=True)

    def _text_doc(self, parts: list[bytes], path: Path, line: int, offset: int,
                  strip_newline: bool = False) -> Iterator[Document]:
        text = self._decode(b"".join(parts), path, line, offset)
        if line == 1 and text.startswith("\ufeff"):
            text = text[1:]
            self.stats.repaired["bom"] += 1
        text = text.replace("\r\n", "\n")
        if strip_newline:
            text = text.removesuffix("\n")
        yield from self._emit(text, path, line, from_json=False)

    def _read_capped(self, f: BinaryIO) -> bytes | None:
        """The whole file, or None (without reading on) once it passes max_line_bytes."""
        blocks, size = [], 0
        while block := f.read(_CHUNK):
            size += len(block)
            if size > self.max_line_bytes:
                return None
            blocks.append(block)
        return b"".join(blocks)
