"""The on-disk token-shard format: writing it, and reading it back verified and memory-mapped.

A prepared data directory holds, for each split ("train", "val"), shards `<split>-NNNNN.bin`
(raw little-endian uint16 when the vocabulary fits, else uint32: every document's tokens
followed by the end-of-text id) with `<split>-NNNNN.idx` (int64 start offset of each document
in its shard), the `tokenizer.json`, and a `manifest.json` with sizes and sha256 checksums:

    {"format": "temper-shards", "version": 1, "dtype": "uint16", "vocab_size": 4096,
     "eot_id": 0, "tokenizer": "tokenizer.json",
     "splits": {"train": {"tokens": N, "documents": D,
                          "shards": [{"file", "index", "tokens", "documents", "sha256",
                                      "index_sha256"}, ...]}, "val": {...}},
     "stats": {...}}

The manifest is input like any other: `read_manifest` checks every key the readers use (naming the
key and the file), and every file it names, the tokenizer's included, must lie inside the
directory. The manifest is written atomically and last, so a directory without one is incomplete. A
document never spans two shards (a shard closes after the document that fills it), so the
`.idx` offsets are plain positions. `eot_id` is null only when documents were concatenated
without a separator on purpose (nanoGPT's shakespeare_char).

It does not tokenize (tokenizer.py) or batch (loader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from temper.errors import InputError
from temper.files import UnsafePath, atomic_write_json, safe_join, sha256_file

FORMAT = "temper-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{5}\.(bin|idx)$")


class ShardError(InputError):
    """A prepared data directory cannot be used."""


class DataNotPrepared(ShardError, FileNotFoundError):
    """The directory or its manifest.json is missing: `temper prepare` has not finished there."""


class ShardCorrupt(ShardError):
    """A shard, index or manifest does not match what the manifest promises."""


def is_shard_file(name: str) -> bool:
    """Whether `name` is a shard or index file name (`train-00000.bin`), which prepare may delete."""
    return bool(_SHARD_FILE.match(name))


def dtype_for(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Append documents to the shards of one split; `close()` returns its manifest entry."""

    def __init__(self, out_dir: str | os.PathLike, split: str, vocab_size: int, eot_id: int | None,
                 shard_tokens: int = 100_000_000):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.vocab_size = vocab_size
        self.dtype = dtype_for(vocab_size)
        self.eot = None if eot_id is None else np.array([eot_id], dtype=self.dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def add(self, ids: np.ndarray) -> None:
        """Write one document's token ids, then the end-of-text id."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for vocab_size {self.vocab_size}")
        if self._file is None:
            self._open()
        self._offsets.append(self._tokens)
        for part in (ids, self.eot):
            if part is not None and part.size:
                data = part.astype(self.dtype, copy=False).tobytes()
                self._file.write(data)
                self._hash.update(data)
                self._tokens += part.size
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def add_documents(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Append documents that already end with their end-of-text id (another writer's output):
        `tokens` holds them back to back and `starts` their offsets. Copied in slices of whole
        documents, so `tokens` may be a memory map of any size."""
        tokens, starts = np.asarray(tokens), np.asarray(starts, dtype=np.int64)
        ends = np.append(starts[1:], len(tokens))
        i = 0
        while i < len(starts):
            if self._file is None:
                self._open()
            # Take documents until this shard is full (a shard closes after the document that fills it).
            room = self.shard_tokens - self._tokens
            j = int(np.searchsorted(ends, starts[i] + room, side="left")) + 1
            j = min(max(j, i + 1), len(starts))
            part = np.ascontiguousarray(tokens[starts[i]:ends[j - 1]], dtype=self.dtype)
            if part.size and part.max() >= self.vocab_size:
                raise ValueError(f"token id out of range for vocab_size {self.vocab_size}")
            self._offsets.extend((starts[i:j] - starts[i] + self._tokens).tolist())
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._tokens += part.size
            if self._tokens >= self.shard_tokens:
                self._close_shard()
            i = j

    def close(self) -> dict:
        """Finish the last shard; return {"tokens", "documents", "shards": [...]}."""
        if self._file is not None:
            self._close_shard()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self._bin, self._idx = f"{name}.bin", f"{name}.idx"
        self._file = open(self.out_dir / self._bin, "wb")
        self._hash = hashlib.sha256()  # hashed while written, so the shard is never read back
        self._offsets: list[int] = []
        self._tokens = 0

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())  # the data must be durable before the manifest names it
        self._file.close()
        self._file = None
        index = np.asarray(self._offsets, dtype="<i8").tobytes()
        with open(self.out_dir / self._idx, "wb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({
            "file": self._bin,
            "index": self._idx,
            "tokens": self._tokens,
            "documents": len(self._offsets),
            "sha256": self._hash.hexdigest(),
            "index_sha256": hashlib.sha256(index).hexdigest(),
        })


def clear_output(out_dir: str | os.PathLike) -> Path:
    """Make `out_dir` ready for a new prepare: create it, remove the manifest first (so the
    directory reads as incomplete until the new one is written) and stale shard files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for entry in out.iterdir():
        if _SHARD_FILE.match(entry.name) and entry.is_file():
            entry.unlink()
    return out


def write_manifest(out_dir: str | os.PathLike, *, vocab_size: int, eot_id: int | None,
                   splits: dict[str, dict], stats: dict) -> dict:
    """Write manifest.json atomically; call it last, after every shard is closed."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype_for(vocab_size).name,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "tokenizer": TOKENIZER,
        "splits": splits,
        "stats": stats,
    }
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, with a clear error if prepare has not finished."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataNotPrepared(f"data directory {data_dir} does not exist: run `temper prepare` first")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataNotPrepared(f"no {MANIFEST} in {data_dir}: run `temper prepare` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardCorrupt(f"{path} is not valid JSON: run `temper prepare` again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardCorrupt(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path} has format version {manifest.get('version')}; this temper reads {VERSION}")
    _check_manifest(manifest, path)
    return manifest


def tokenizer_path(data_dir: str | os.PathLike, manifest: dict | None = None) -> Path:
    """The tokenizer.json a prepared directory names, inside it (read_manifest checks that)."""
    manifest = read_manifest(data_dir) if manifest is None else manifest
    return safe_join(data_dir, manifest["tokenizer"])


# Keys of a manifest, of each split and of each shard, with their types: a manifest edited by hand
# or by another tool fails here with the key's name instead of deep in the loader.
_INT = (int,)
_MANIFEST_KEYS = {"dtype": (str,), "vocab_size": _INT, "tokenizer": (str,), "splits": (dict,)}
_SPLIT_KEYS = {"tokens": _INT, "documents": _INT, "shards": (list,)}
_SHARD_KEYS = {"file": (str,), "index": (str,), "tokens": _INT, "documents": _INT, "sha256": (str,)}
_TYPE_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "a list"}


def _check_manifest(manifest: dict, path: Path) -> None:
    """Every key the readers use is there with its type, ids and counts are not negative, the
    dtype is one prepare writes, and the tokenizer file is inside the directory."""
    _check_keys(manifest, _MANIFEST_KEYS, "", path)
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise ShardCorrupt(f"{path}: dtype is {manifest['dtype']!r}; expected 'uint16' or 'uint32'")
    if manifest["vocab_size"] < 1:
        raise ShardCorrupt(f"{path}: vocab_size must be positive, got {manifest['vocab_size']}")
    eot = manifest.get("eot_id")
    if eot is not None and (not isinstance(eot, int) or isinstance(eot, bool) or not 0 <= eot < manifest["vocab_size"]):
        raise ShardCorrupt(f"{path}: eot_id must be null or an id below vocab_size, got {eot!r}")
    try:
        safe_join(path.parent, manifest["tokenizer"])
    except UnsafePath as e:  # the manifest is input: it must not make temper read /etc/passwd
        raise UnsafePath(f"{path}: tokenizer: {e}") from None
    for name, split in manifest["splits"].items():
        if not isinstance(split, dict):
            raise ShardCorrupt(f"{path}: splits.{name} must be an object, got {type(split).__name__}")
        _check_keys(split, _SPLIT_KEYS, f"splits.{name}.", path)
        for i, shard in enumerate(split["shards"]):
            where = f"splits.{name}.shards[{i}]"
            if not isinstance(shard, dict):
                raise ShardCorrupt(f"{path}: {where} must be an object, got {type(shard).__name__}")
            _check_keys(shard, _SHARD_KEYS, where + ".", path)
            if shard.get("index_sha256") is not None and not isinstance(shard["index_sha256"], str):
                raise ShardCorrupt(f"{path}: {where}.index_sha256 must be a string")


def _check_keys(obj: dict, keys: dict[str, tuple[type, ...]], prefix: str, path: Path) -> None:
    for key, types in keys.items():
        if key not in obj:
            raise ShardCorrupt(f"{path}: {prefix}{key} is missing: run `temper prepare` again")
        value = obj[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ShardCorrupt(f"{path}: {prefix}{key} must be {_TYPE_NAMES[types[0]]}, got {type(value).__name__}")
        if types is _INT and value < 0:
            raise ShardCorrupt(f"{path}: {prefix}{key} must not be negative, got {value}")


def load_split(data_dir: str | os.PathLike, split: str, verify: bool = True) -> list[np.ndarray]:
    """Read-only memory maps of the token shards of `split`, in order.

    Sizes are always checked; with `verify` the sha256 of every shard too (it reads them once).
    """
    manifest = read_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    arrays = []
    for shard in _shards(manifest, data_dir, split):
        path = _checked(data_dir, shard["file"], shard["tokens"] * dtype.itemsize,
                        shard["sha256"] if verify else None)
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return arrays


def load_index(data_dir: str | os.PathLike, split: str, verify: bool = True) -> list[np.ndarray]:
    """The document start offsets of each shard of `split` (int64 arrays, loaded in memory)."""
    manifest = read_manifest(data_dir)
    out = []
    for shard in _shards(manifest, data_dir, split):
        path = _checked(data_dir, shard["index"], shard["documents"] * 8,
                        shard.get("index_sha256") if verify else None)
        out.append(np.fromfile(path, dtype="<i8"))
    return out


def _shards(manifest: dict, data_dir: str | os.PathLike, split: str) -> list[dict]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(f"{data_dir} has no split {split!r} (it has: {', '.join(splits) or 'none'})")
    return splits[split]["shards"]  # checked by read_manifest


def _checked(data_dir: str | os.PathLike, name: str, size: int, sha256: str | None) -> Path:
    """Path of a file named by the manifest, after checking that it exists with the promised
    size and checksum. safe_join: the manifest is input too, and must not point outside."""
    path = safe_join(data_dir, name)
    if not path.is_file():
        raise ShardCorrupt(f"{path} is missing: run `temper prepare` again")
    actual = path.stat().st_size
    if actual != size:
        raise ShardCorrupt(f"{path} has {actual} bytes, the manifest says {size} (truncated or overwritten)")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ShardCorrupt(f"{path} sha256 mismatch: the file changed after prepare wrote it")
    return path
