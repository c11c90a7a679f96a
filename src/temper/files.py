"""Safe file handling shared by every stage: path containment, atomic writes, checksums, safe loads.

It sits below `data`, `model` and `train` (it imports nothing from temper) so that each stage
can use it. It does not know about checkpoints or shards: only about bytes on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from temper.errors import InputError


class UnsafePath(InputError):
    """A user-supplied name would resolve outside the directory it must stay in."""


def safe_name(name: str, *, what: str = "name") -> str:
    """Check a single path component (a run or adapter name): no separators, no `..`, no NUL."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePath(f"invalid {what} {name!r}: use a plain name without '/', '..' or NUL")
    return name


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join `parts` under `root`, refusing anything that escapes it.

    Rejects absolute parts, `..` that climbs out, NUL bytes and symlinks that point outside
    root (checked on the resolved path, so a link anywhere along the way is caught).
    """
    for part in parts:
        if "\x00" in str(part):
            raise UnsafePath(f"path {part!r} contains a NUL byte")
        if os.path.isabs(part):
            raise UnsafePath(f"path {part!r} is absolute; expected a path inside {root}")
    root_resolved = Path(root).resolve()
    candidate = Path(root, *parts).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise UnsafePath(f"path {os.path.join(*parts)!r} escapes {root}")
    return candidate


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so memory stays bounded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry so that a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """The only way temper reads a torch pickle: `weights_only=True`, so no code can run.

    A file that needs arbitrary unpickling raises `pickle.UnpicklingError` instead of running it.
    """
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)
