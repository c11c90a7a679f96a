"""The weight files of a Hugging Face checkpoint directory, read tensor by tensor, and `CheckpointError`, the one
error of a checkpoint that cannot be read as it is.

Directories hold `config.json` + `model.safetensors` or shards with `model.safetensors.index.json`, named and their
symlinks followed by `temper.files.checkpoint_file` (so a `huggingface_hub` snapshot reads as it is, and an index
cannot name a file outside the directory); pickled `pytorch_model*.bin` files are read only when asked, with
`torch.load(weights_only=True)`. Every fault of the input is a CheckpointError naming the file (and the key or tensor).

It does not know architectures or tensor names (config.py, weights.py), build a model or write a checkpoint
(checkpoint.py).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from temper.errors import InputError
from temper.files import UnsafePath, checkpoint_file, read_json_object


class CheckpointError(InputError):
    """A checkpoint directory or file that cannot be read as it is: the message names the file."""


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


MAX_HEADER_BYTES = 100 << 20  # the safetensors reader's own limit: a bigger header is an attack, not a model


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook that refuses a key given twice (json.loads would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice")
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_entry(path: Path, name: str, e: Any, data: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against a data section of `data` bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: header entry must be an object, got {e!r}")
    if not isinstance(e.get("dtype"), str) or e["dtype"] not in _DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {e.get('dtype')!r} (temper reads {', '.join(_DTYPES)})")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end], got {offsets!r}")
    dtype, (begin, end) = _DTYPES[e["dtype"]], offsets
    if not 0 <= begin <= end <= data:
        raise CheckpointError(f"{where} has out-of-range offsets [{begin}, {end}] (data section {data} bytes)")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: offsets [{begin}, {end}] hold {end - begin} bytes, but {e['dtype']} "
                              f"shape {shape} needs {nbytes}")
    return dtype, tuple(shape), begin, end


def _check_no_overlap(path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]) -> None:
    """Two tensors whose bytes overlap would alias each other once mapped: refuse the file."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (prev_begin, prev_end, prev), (begin, end, name) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:  # sorted by begin: any overlap shows up between neighbours
            raise CheckpointError(f"{path}: tensor {name!r} (offsets [{begin}, {end}]) overlaps tensor {prev!r} "
                                  f"([{prev_begin}, {prev_end}])")


class SafetensorsFile:
    """A safetensors file read tensor by tensor: memory-mapped, or copied out with plain reads.

    Written here rather than taken from `safetensors.safe_open` for two reasons: its tensors are
    copies out of a memory map whose touched pages count again towards the process's memory (a
    loaded model would be held ~twice at the peak), and a damaged header is reported here by file
    and tensor. A tensor used as it is stored is a copy-on-write view of the file (`mapped`): no
    copy, and its pages are read on first use. The format: an 8-byte little-endian header size, a
    JSON header {name: {dtype, shape, data_offsets: [begin, end]}} and the data, offsets relative
    to its start.

    Every entry is checked as the format's own reader checks it: a header of at
    most 100 MiB, a known dtype, a shape of non-negative integers, integer offsets inside the data
    section that hold exactly dtype x shape bytes, and no two tensors sharing bytes (overlapping
    offsets would alias one tensor's memory as another's).
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} bytes, over the "
                                      f"{MAX_HEADER_BYTES >> 20} MiB limit)")
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.start, data = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: _header_entry(path, name, e, data) for name, e in header.items()}
        _check_no_overlap(path, self.entries)
        self._map: mmap.mmap | None = None

    def mapped(self, name: str) -> torch.Tensor | None:
        """Tensor `name` as a copy-on-write view of the file (writes stay in memory), or None when
        its bytes are not aligned to its dtype."""
        dtype, shape, begin, _ = self.entries[name]
        offset = self.start + begin
        if offset % dtype.itemsize or not math.prod(shape):
            return None
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():  # "non-writable buffer": ACCESS_COPY is writable, copy on write
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)

    def read(self, name: str, rows: slice = slice(None), scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` (or some of its rows) copied with plain reads into a new CPU tensor, or
        into the bytes of `scratch` (uint8, big enough) when given. A scalar (xIELU's beta) is read as one row."""
        dtype, scalar_or_shape, begin, _ = self.entries[name]
        shape = scalar_or_shape or (1,)
        start, stop, _ = rows.indices(shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        nbytes = (stop - start) * row_bytes
        if scratch is None:
            out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        else:
            out = scratch[:nbytes].view(dtype).view(stop - start, *shape[1:])
        if nbytes:
            with open(self.path, "rb") as f:
                f.seek(self.start + begin + start * row_bytes)
                if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != nbytes:
                    raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
        return out if scalar_or_shape else out.view(())


class _PickledFile:
    """A `pytorch_model*.bin` file, read with torch.load(weights_only=True): no code runs."""

    def __init__(self, path: Path):
        self.path = path
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many kinds for a damaged or unsafe pickle
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        self.tensors = sd
        self.entries = {k: (v.dtype, tuple(v.shape), 0, 0) for k, v in sd.items()}

    def mapped(self, name: str) -> torch.Tensor | None:
        return self.tensors[name]  # already a map of the file (loaded with mmap=True)

    def read(self, name: str, rows: slice = slice(None), scratch: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t[rows] if t.dim() else t  # (a scalar, xIELU's beta: whole)


def _member(root: Path, name: str) -> Path:
    """`checkpoint_file` (the one rule for names and symlinks in a checkpoint directory), its
    errors as CheckpointError."""
    try:
        return checkpoint_file(root, name)
    except InputError as e:
        raise CheckpointError(str(e)) from None


def _index_members(root: Path, index: Path) -> list[Path]:
    """The files an index's weight_map names, each refused when its name leaves the directory."""
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a weight index (weight_map must map tensor names to file names)")
    for tensor, name in weight_map.items():
        try:
            checkpoint_file(root, name)
        except UnsafePath:
            raise CheckpointError(f"{index}: tensor {tensor!r} is mapped to {name!r}, which escapes {root}") from None
    return [_member(root, n) for n in sorted(set(weight_map.values()))]


def _weight_files(root: Path, allow_pickle: bool) -> list[SafetensorsFile | _PickledFile]:
    """The weight files of a checkpoint directory, safetensors first."""
    for single, index, kind in (("model.safetensors", "model.safetensors.index.json", SafetensorsFile),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json", _PickledFile)):
        names: list[Path] = []
        if _member(root, single).is_file():
            names = [root / single]
        elif _member(root, index).is_file():
            names = _index_members(root, root / index)
        if not names:
            continue
        if kind is _PickledFile and not allow_pickle:
            raise CheckpointError(
                f"{root}: only pickled weights ({names[0].name}); pass allow_pickle=True (--allow-pickle) to read "
                "them with torch.load(weights_only=True), or convert them to safetensors")
        missing = [p.name for p in names if not p.is_file()]
        if missing:
            raise CheckpointError(f"{root}: the index names missing files {missing[:3]}")
        return [kind(p) for p in names]
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise CheckpointError(f"{root}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                            f"(found {found[:10]})")
