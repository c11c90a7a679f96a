"""Raw files -> documents: the first step of the data's journey.

Formats, recognised by name (case-insensitive) and read from paths, directories or globs (`**` is
recursive) in a deterministic order (files sorted per pattern):

- plain text (.txt, .py, .md, anything else), optionally compressed (.gz, .zst): a document is the
  whole file, a blank-line separated paragraph or a line (`txt_docs`);
- JSON Lines (.jsonl, .ndjson, optionally .gz or .zst): one object per line, text in a chosen
  field, optionally an id field and metadata fields;
- Parquet (.parquet, the `temper[data]` extra): a chosen string column, optionally an id column and
  metadata columns, read by record batches of a few hundred rows; its "line" is the 1-based row.

Everything is streamed in bounded pieces: no line or document longer than `max_line_bytes` is
ever held in memory, however long it is on disk, and compressed files are decompressed as they
are read (zstd with the `zstandard` package, also in `temper[data]`). A Parquet file is read one
row group of the needed columns at a time, which is the bound its writer chose.

Bad input is expected, not exceptional. Invalid UTF-8 becomes U+FFFD (counted) or, with
`strict_utf8`, an error naming file:line and byte offset; a byte-order mark, NUL characters and
lone surrogates from JSON escapes (which the Rust tokenizer cannot take) are repaired and
counted; CRLF line ends of text files become LF; empty and whitespace-only documents, and empty
files, are dropped and counted. A bad record (invalid JSON, not an object, missing field or
column, a value that is not a string, line too long, truncated or corrupt gzip / zstd / Parquet,
a text file that looks binary) either stops the run (`on_error="fail"`) with a `DataError`
naming file:line, or is skipped and counted by reason (`on_error="skip"`) until more than
`max_skip_fraction` of all records are bad.
Messages never contain the record's content, which may be private.

It does not filter for quality, deduplicate or tokenize: see filters.py, dedup.py, tokenizer.py.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import importlib
import io
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from temper.errors import InputError

MAX_LINE_BYTES = 64 << 20
TXT_DOCS = ("file", "paragraph", "line")
ON_ERROR = ("fail", "skip")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_GZIP_SUFFIXES = (".gz",)
_ZSTD_SUFFIXES = (".zst", ".zstd")
_PARQUET_SUFFIXES = (".parquet", ".pq")
# Files that are never text. A directory walk or a glob leaves them out (a file named on its own
# is still read, and reported as binary): a folder of sources with a few images should not stop
# the run. Archives and other compressors are *not* here: they may hold the data the user meant,
# so they are read and reported as binary rather than skipped in silence.
_BINARY_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .bmp .ico .webp .tif .tiff .pdf .so .dylib .dll .exe .o .a .obj .lib .pyc .pyo "
    ".pyd .class .jar .whl .bin .pt .pth .ckpt .safetensors .onnx .npy .npz .pkl .pickle .mp3 .mp4 .wav "
    ".ogg .flac .avi .mov .mkv .woff .woff2 .ttf .otf .eot".split()
)
_CHUNK = 1 << 20
_SNIFF_BYTES = 8 << 10
_PARQUET_BATCH_ROWS = 256
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = re.compile(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")
_REPLACEMENT = "\ufffd".encode()
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
# file(1)'s table of bytes that never occur in text (encoding.c, text_chars "F"): the C0 controls
# other than BEL BS HT LF VT FF CR ESC, and DEL.
_NOT_TEXT = bytes(sorted(set(range(32)) - set(b"\a\b\t\n\v\f\r\x1b") | {0x7F}))
# A skip fraction measured over a handful of records says little; before this many records the
# limit is only checked at the end.
_MIN_RECORDS_FOR_EARLY_ABORT = 1000


class DataError(InputError):
    """Input that cannot be read as documents. The message names file:line, never the content, and
    is one line: a library's own message (pyarrow's, zstd's) that spans lines is joined."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


class RecordError(DataError):
    """One record that cannot be used: the message names its file and line (or index) and the key."""

    def __init__(self, where: str, key: str, reason: str, message: str) -> None:
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
        self.where, self.key, self.message = where, key, message
        self.reason = reason
        """Short name of the problem, for counting skipped records by kind."""


@dataclass(frozen=True)
class Document:
    """One document of raw text and where it came from."""

    text: str
    source: str
    """The file it was read from."""
    line: int
    """1-based line of the file where the document starts (the row, in a Parquet file)."""
    id: str | None = None
    """The record's `id_field` as a string (JSONL and Parquet), None when not asked for or absent."""
    meta: dict | None = field(default=None, hash=False)
    """The record's `meta_fields` that it has (JSONL and Parquet), None when none were asked for."""


@dataclass
class ReadStats:
    """What reading saw, filled in as documents are yielded. It pickles, and `merge` sums the
    stats of reads done in other processes."""

    files: int = 0
    documents: int = 0
    """Documents yielded."""
    errors: Counter = field(default_factory=Counter)
    """Bad records skipped, by reason (these count against max_skip_fraction)."""
    dropped: Counter = field(default_factory=Counter)
    """Records dropped by design, by reason: "empty" (document), "empty_file"."""
    repaired: Counter = field(default_factory=Counter)
    """Characters repaired, by kind: invalid_utf8 (U+FFFD inserted), lone_surrogate, nul, bom."""
    examples: list[str] = field(default_factory=list)
    """The first few skipped records as "file:line: reason", to find them again."""

    @property
    def records(self) -> int:
        return self.documents + sum(self.errors.values()) + sum(self.dropped.values())

    def merge(self, other: ReadStats) -> None:
        """Add `other`'s counts to these (keeping at most 10 examples)."""
        self.files += other.files
        self.documents += other.documents
        self.errors.update(other.errors)
        self.dropped.update(other.dropped)
        self.repaired.update(other.repaired)
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])

    def check_fraction(self, max_skip_fraction: float, final: bool = True) -> None:
        """Raise DataError when more than `max_skip_fraction` of the records were bad. Before the
        end (`final=False`) only once enough records were seen for the fraction to mean something."""
        bad, seen = sum(self.errors.values()), self.records
        if seen == 0 or (not final and seen < _MIN_RECORDS_FOR_EARLY_ABORT):
            return
        if bad > max_skip_fraction * seen:
            raise DataError(
                f"{bad} of {seen} records were bad input ({bad / seen:.1%}), above "
                f"max_skip_fraction={max_skip_fraction}: {dict(self.errors)}; first ones: {self.examples[:3]}"
            )

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "documents": self.documents,
            "errors": dict(self.errors),
            "dropped": dict(self.dropped),
            "repaired": dict(self.repaired),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReadStats:
        """Stats that travelled as JSON: `as_dict()`, with "examples" when it was added."""
        return cls(d["files"], d["documents"], Counter(d["errors"]), Counter(d["dropped"]),
                   Counter(d["repaired"]), list(d.get("examples", [])))


def expand_inputs(inputs: str | Sequence[str], exclude: Sequence[str] = ()) -> list[Path]:
    """Paths, directories (all files below) and globs -> the list of files, sorted per pattern.

    A directory or a glob leaves out files whose names say they are never text (images,
    compiled code, weights: see _BINARY_SUFFIXES); a file named on its own is always kept."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: dict[str, None] = {}  # ordered set: a file named by two patterns is read once
    for pattern in map(str, inputs):
        if "\x00" in pattern:
            raise DataError(f"input {pattern!r} contains a NUL byte")
        named = False
        if any(c in pattern for c in "*?["):
            matches = glob.glob(pattern, recursive=True)
        elif os.path.isdir(pattern):
            matches = glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
        elif os.path.exists(pattern):
            matches, named = [pattern], True
        else:
            raise DataError(f"input {pattern!r}: no such file or directory")
        matches = [m for m in matches if os.path.isfile(m)]
        matches = [m for m in matches if not any(fnmatch.fnmatch(m, x) for x in exclude)]
        if not named and matches:
            text = [m for m in matches if not _binary_name(m)]
            if not text:
                raise DataError(f"input {pattern!r} matches only binary files (e.g. {matches[0]!r})")
            matches = text
        if not matches:
            raise DataError(f"input {pattern!r} matches no files")
        files.update(dict.fromkeys(sorted(matches)))
    return [Path(f) for f in files]


@dataclass(frozen=True)
class FilePart:
    """Bytes [start, end) of a line-oriented file, cut at line starts, whose first line is
    `first_line`: a big file is read by several processes at once, each a part, and the documents
    still carry their file's true line numbers."""

    path: Path
    start: int
    end: int
    first_line: int


def split_file(path: str | os.PathLike, part_bytes: int, txt_docs: str = "file") -> list[FilePart | Path]:
    """`path` cut into parts of about `part_bytes` at line starts, or `[path]` when it cannot or
    need not be cut: only uncompressed JSONL and line-per-document text files can be read from
    the middle. One pass over the file counts the lines before each part."""
    path = Path(path)
    size = path.stat().st_size
    name = path.name.lower()
    line_oriented = _format(path) == "jsonl" or (_format(path) == "text" and txt_docs == "line")
    if part_bytes <= 0 or size <= part_bytes or not line_oriented or _strip_compression(name) != name:
        return [path]
    bounds = [0]
    with open(path, "rb") as f:
        for target in range(part_bytes, size, part_bytes):
            if target <= bounds[-1]:
                continue
            f.seek(target - 1)
            while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass  # the rest of the line that straddles the target (bounded reads: it may be huge)
            if f.tell() < size:
                bounds.append(f.tell())
        bounds.append(size)
        parts, line = [], 1
        for start, end in zip(bounds[:-1], bounds[1:]):
            parts.append(FilePart(path, start, end, line))
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(_CHUNK, left))
                line += block.count(b"\n")
                left -= len(block)
    return parts


def read_documents(inputs: str | Sequence[str], *, exclude: Sequence[str] = (), **options: Any) -> Iterator[Document]:
    """Stream the documents of `inputs` (paths, directories, globs); `options` as for `read_files`."""
    return read_files(expand_inputs(inputs, exclude), **options)


def read_files(
    files: Sequence[str | os.PathLike | FilePart],
    *,
    text_field: str = "text",
    id_field: str = "",
    meta_fields: Sequence[str] = (),
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
    "line". JSONL (.jsonl, .ndjson, optionally .gz / .zst) and Parquet (.parquet) files are
    recognised by name; their text is in `text_field`. With `id_field`, a document's `id` is that
    field as a string (None where a record lacks it); with `meta_fields`, its `meta` holds those
    of the fields that the record has. Text files have neither. A `FilePart` (from `split_file`)
    is read like a file of its own that starts at its line.
    """
    if txt_docs not in TXT_DOCS:
        raise ValueError(f"txt_docs must be one of {TXT_DOCS}, got {txt_docs!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
    if isinstance(meta_fields, str):
        raise ValueError(f"meta_fields must be a sequence of field names, got the string {meta_fields!r}")
    reader = _Reader(text_field, id_field, tuple(meta_fields), txt_docs, on_error, max_skip_fraction,
                     strict_utf8, max_line_bytes, stats if stats is not None else ReadStats())
    return reader.read([f if isinstance(f, FilePart) else Path(f) for f in files])


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, value) of each record of a JSON array or JSON Lines file (.gz allowed): location is
    "file:line" or "file[index]"; a bad line's value is its `RecordError`, for the caller to skip or
    raise. A file that cannot be read as a whole (corrupt gzip, a JSON array that does not parse,
    invalid UTF-8 in an array) raises `DataError`."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e})") from e
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if raw.lstrip()[:1] == b"[":  # a JSON array; JSON Lines records are objects
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        for i, obj in enumerate(data):
            yield f"{path}[{i}]", obj
        return
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue  # blank lines (a trailing one is common) are not records
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield where, RecordError(where, "", "invalid_utf8", f"invalid UTF-8 at column {e.start + 1} ({e.reason})")
        except json.JSONDecodeError as e:
            yield where, RecordError(where, "", "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")



# -- files and formats -------------------------------------------------------------------------


def one_line(text: str) -> str:
    """`text` with its line breaks (and the spaces around them) made single spaces: an error is one line."""
    return _LINE_BREAKS.sub(" ", text).strip()


def _format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    name = _strip_compression(name)
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"


def _strip_compression(name: str) -> str:
    for suffix in _GZIP_SUFFIXES + _ZSTD_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _binary_name(path: str) -> bool:
    return os.path.splitext(_strip_compression(os.path.basename(path).lower()))[1] in _BINARY_SUFFIXES


def _import(module: str, path: Path, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{path}: reading it needs the {package!r} package: pip install 'temper[data]'") from e


def _open(path: Path) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(_GZIP_SUFFIXES):
        return gzip.open(path, "rb")
    if name.endswith(_ZSTD_SUFFIXES):
        return io.BufferedReader(_ZstdRaw(path), _CHUNK)
    return open(path, "rb")


def _lines(f: BinaryIO, max_bytes: int, part: FilePart | None = None) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield (line number, byte offset, line) with its newline; line is None when it is longer
    than `max_bytes`, and then it was skipped in bounded reads instead of being loaded. With a
    `part`, `f` is positioned at its start and reading stops at its end."""
    offset = part.start if part else 0
    number = part.first_line - 1 if part else 0
    end = part.end if part else None
    while (end is None or offset < end) and (line := f.readline(max_bytes + 1)):
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


def _looks_binary(head: bytes) -> str | None:
    """Why a file whose first bytes are `head` is not text, or None if it looks like text.

    The rule is file(1)'s, loosened to tolerate damage: bytes that never occur in text (NUL and
    the other controls of _NOT_TEXT) may be at most 1% of the head (git calls any NUL binary; we
    let a few through so that stray NULs in real text are repaired and counted instead), and at
    most 30% of it may be invalid UTF-8 (Latin-1 prose has a few percent; text in a legacy
    encoding of another script, or compressed or random bytes, have far more).
    """
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "looks binary: it starts with a UTF-16 byte-order mark (convert it to UTF-8)"
    controls = len(head) - len(head.translate(None, _NOT_TEXT))
    if controls > 1 + len(head) // 100:
        return f"looks binary: {controls} of its first {len(head)} bytes are NUL or control bytes"
    # final=False: a character cut at the end of the head is not a decoding error
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(head, final=False)
    invalid = text.count("\ufffd") - head.count(_REPLACEMENT)
    if invalid > 0.3 * len(head):
        return (f"looks binary: {invalid} of its first {len(head)} bytes are not UTF-8 "
                "(if it is text in another encoding, convert it to UTF-8)")
    return None


class _ZstdTruncated(EOFError):
    """The zstd frames of a file stop before their end."""


class _ZstdCorrupt(Exception):
    """The zstd decoder failed."""


class _ZstdRaw(io.RawIOBase):
    """A .zst file decompressed as a raw stream, for a BufferedReader.

    zstandard's stream reader is bounded (it writes into the caller's buffer) and reads across
    frames, but at the end of a truncated file it just stops. So at the end of the stream the
    frame and block headers are walked (without decompressing) to tell a truncated file from a
    complete one, and a truncated one raises like gzip's "Compressed file ended before the
    end-of-stream marker was reached". (Feeding a decompressobj instead would catch truncation
    but its output per call is unbounded: a few KiB of RLE blocks expand to GiBs.)"""

    def __init__(self, path: Path):
        zstandard = _import("zstandard", path, "zstandard")
        self._error = zstandard.ZstdError
        self._path = path
        self._file = open(path, "rb")
        self._stream = zstandard.ZstdDecompressor().stream_reader(self._file, read_across_frames=True,
                                                                  closefd=False)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            n = self._stream.readinto(buffer)
        except self._error as e:
            raise _ZstdCorrupt(str(e)) from e
        if n == 0 and _zstd_truncated(self._path):
            raise _ZstdTruncated("compressed file ended before the end of its last zstd frame")
        return n

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._file.close()
        super().close()


def _zstd_truncated(path: Path) -> bool:
    """Whether the zstd frames of `path` need more bytes than it has, by walking their frame and
    block headers (RFC 8878, section 3.1). What it cannot parse is left to the decoder to report."""
    size = os.path.getsize(path)
    pos = 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(14)  # the longest frame header: magic 4, descriptor 1, window 1, dict id 4, ...
            if len(head) < 5:
                return True
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: magic, 4-byte size, data
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != 0xFD2FB528:
                return False
            descriptor = head[4]
            single_segment = descriptor >> 5 & 1
            pos += (5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
                    + (single_segment, 2, 4, 8)[descriptor >> 6])
            last = 0
            while not last:
                f.seek(pos)
                block = f.read(3)
                if len(block) < 3:
                    return True
                header = int.from_bytes(block, "little")
                last, kind, block_size = header & 1, header >> 1 & 3, header >> 3
                if kind == 3:  # reserved block type: corrupt, not truncated
                    return False
                pos += 3 + (1 if kind == 1 else block_size)  # an RLE block stores one byte
            pos += 4 * (descriptor >> 2 & 1)  # content checksum
    return pos > size


def _arrow_text_kind(pa: Any, type_: Any) -> str | None:
    """"str" or "bytes" for the Arrow types a text column may have ("null": all values null)."""
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    if pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return "str"
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_binary_view(type_):
        return "bytes"
    return "null" if pa.types.is_null(type_) else None


def _text_values(pa: Any, column: Any, kind: str) -> list:
    """A batch's text column as Python values, strings as bytes: pyarrow does not check the UTF-8 of
    a file's strings (its to_pylist raises on bad bytes), so they are decoded as in every other
    format, repaired and counted or, with strict_utf8, an error naming file:row."""
    if kind == "str":
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        column = column.cast(pa.large_binary() if pa.types.is_large_string(column.type)
                             else pa.binary_view() if pa.types.is_string_view(column.type) else pa.binary())
    return column.to_pylist()


# -- reading -----------------------------------------------------------------------------------


class _Reader:
    """The options and counters of one read; its methods are the per-format readers."""

    def __init__(self, text_field: str, id_field: str, meta_fields: tuple[str, ...], txt_docs: str,
                 on_error: str, max_skip_fraction: float, strict_utf8: bool, max_line_bytes: int,
                 stats: ReadStats):
        self.text_field = text_field
        self.id_field = id_field
        self.meta_fields = meta_fields
        self.txt_docs = txt_docs
        self.on_error = on_error
        self.max_skip_fraction = max_skip_fraction
        self.strict_utf8 = strict_utf8
        self.max_line_bytes = max_line_bytes
        self.stats = stats

    def read(self, files: list[Path | FilePart]) -> Iterator[Document]:
        for item in files:
            path, part = (item.path, item) if isinstance(item, FilePart) else (item, None)
            self.stats.files += part is None or part.start == 0
            try:
                if _format(path) == "parquet":
                    yield from self._parquet(path)
                else:
                    yield from self._stream(path, part)
            except _ZstdTruncated as e:
                self._problem("truncated_zst", str(path), "truncated zstd file", e)
            except _ZstdCorrupt as e:
                self._problem("corrupt_zst", str(path), f"corrupt zstd file ({e})", e.__cause__)
            except EOFError as e:  # gzip's "Compressed file ended before the end-of-stream marker"
                self._problem("truncated_gzip", str(path), "truncated gzip file", e)
            except (gzip.BadGzipFile, zlib.error) as e:
                self._problem("corrupt_gzip", str(path), f"corrupt gzip file ({e})", e)
        self._check_fraction(final=True)

    # -- problems and counters ---------------------------------------------------------------

    def _problem(self, reason: str, where: str, message: str, cause: BaseException | None = None) -> None:
        """A bad record: raise (on_error="fail") or count it and go on."""
        message = one_line(message)  # a library's message (pyarrow's, zstd's) may span lines
        if self.on_error == "fail":
            raise DataError(f"{where}: {message}") from cause
        self.stats.errors[reason] += 1
        if len(self.stats.examples) < 10:
            self.stats.examples.append(f"{where}: {message}")
        self._check_fraction(final=False)

    def _check_fraction(self, final: bool) -> None:
        self.stats.check_fraction(self.max_skip_fraction, final)

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

    def _emit(self, text: str, path: Path, line: int, from_json: bool, id_: str | None = None,
              meta: dict | None = None) -> Iterator[Document]:
        """Repair what the tokenizer cannot take, drop empty documents, yield the rest."""
        if "\x00" in text:  # NUL never carries meaning in text, and C tools stop at it
            self.stats.repaired["nul"] += text.count("\x00")
            text = text.replace("\x00", "")
        if from_json and not text.isascii():
            # json.loads turns "\ud800" into a lone surrogate, which cannot be encoded as UTF-8
            # and makes the tokenizer raise much later; replace it now.
            text, n = _SURROGATE.subn("\ufffd", text)
            if n:
                self.stats.repaired["lone_surrogate"] += n
        if not text.strip():
            self.stats.dropped["empty"] += 1
            return
        self.stats.documents += 1
        yield Document(text, str(path), line, id_, meta)

    def _id(self, value: Any) -> str | None:
        """A record's id as a string (str() of a number), None if it has none."""
        if value is None:
            return None
        if not isinstance(value, str):
            return str(value)
        if not value.isascii():  # an id is written out with the document: it must encode too
            value, n = _SURROGATE.subn("\ufffd", value)
            if n:
                self.stats.repaired["lone_surrogate"] += n
        return value

    # -- formats -----------------------------------------------------------------------------

    def _stream(self, path: Path, part: FilePart | None = None) -> Iterator[Document]:
        """A text or JSONL file, possibly compressed: its head is looked at first, then it is
        opened again and streamed (a decompressing stream cannot go back)."""
        with _open(path) as f:
            if part is not None:
                f.seek(part.start)
            head = f.read(_SNIFF_BYTES)
        if not head:
            self.stats.dropped["empty_file"] += 1
            return
        if why := _looks_binary(head):
            self._problem("binary", str(path), why)
            return
        with _open(path) as f:
            if part is not None:
                f.seek(part.start)
            yield from (self._jsonl(f, path, part) if _format(path) == "jsonl" else self._text(f, path, part))

    def _jsonl(self, f: BinaryIO, path: Path, part: FilePart | None = None) -> Iterator[Document]:
        field_ = self.text_field
        for number, offset, raw in _lines(f, self.max_line_bytes, part):
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
            id_ = self._id(obj.get(self.id_field)) if self.id_field else None
            meta = {k: obj[k] for k in self.meta_fields if k in obj} if self.meta_fields else None
            yield from self._emit(value, path, number, from_json=True, id_=id_, meta=meta)

    def _parquet(self, path: Path) -> Iterator[Document]:
        pa = _import("pyarrow", path, "pyarrow")
        pq = _import("pyarrow.parquet", path, "pyarrow")
        if os.path.getsize(path) == 0:
            self.stats.dropped["empty_file"] += 1
            return
        field_ = self.text_field
        row = 0
        try:
            with pq.ParquetFile(path) as pf:
                schema = pf.schema_arrow
                if field_ not in schema.names:
                    names = ", ".join(n[:40] for n in schema.names[:20])
                    self._problem(f"missing_field:{field_}", str(path), f"missing column {field_!r} (columns: {names})")
                    return
                kind = _arrow_text_kind(pa, schema.field(field_).type)
                if kind is None:
                    self._problem(f"not_string:{field_}", str(path),
                                  f"column {field_!r} is {schema.field(field_).type}, not a string")
                    return
                if pf.metadata.num_rows == 0:
                    self.stats.dropped["empty_file"] += 1
                    return
                wanted = [self.id_field] if self.id_field else []
                wanted += self.meta_fields
                extra = [c for c in dict.fromkeys(wanted) if c in schema.names and c != field_]
                batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field_, *extra],
                                          use_threads=False)  # callers run one reader per process
                for batch in batches:
                    texts = _text_values(pa, batch.column(field_), kind)
                    columns = {c: batch.column(c).to_pylist() for c in extra}
                    for i, value in enumerate(texts):
                        row += 1
                        yield from self._parquet_row(value, path, row, {c: v[i] for c, v in columns.items()})
        except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
            raise  # the machine's problem, not the file's (pyarrow's ArrowMemoryError is a MemoryError)
        # pyarrow raises OSError for damaged pages, UnicodeDecodeError for bad UTF-8 in an id or meta column
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            after = f" after row {row}" if row else ""
            self._problem("corrupt_parquet", str(path), f"corrupt Parquet file{after} ({e})", e)

    def _parquet_row(self, value: Any, path: Path, row: int, extra: dict) -> Iterator[Document]:
        field_ = self.text_field
        where = f"{path}:{row}"
        if value is None:
            self._problem(f"not_string:{field_}", where, f"field {field_!r} is null, not a string")
            return
        size = len(value)  # characters: at most the bytes, at least a quarter of them
        if isinstance(value, str) and self.max_line_bytes < 4 * size and size <= self.max_line_bytes:
            size = len(value.encode())
        if size > self.max_line_bytes:
            self._problem("too_long", where, f"value exceeds max_line_bytes ({self.max_line_bytes})")
            return
        if isinstance(value, bytes):
            value = self._decode(value, path, row, 0)
        id_ = self._id(extra.get(self.id_field)) if self.id_field else None
        meta = {k: extra[k] for k in self.meta_fields if k in extra} if self.meta_fields else None
        yield from self._emit(value, path, row, from_json=False, id_=id_, meta=meta)

    def _text(self, f: BinaryIO, path: Path, part: FilePart | None = None) -> Iterator[Document]:
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
        for number, offset, raw in _lines(f, self.max_line_bytes, part):
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
