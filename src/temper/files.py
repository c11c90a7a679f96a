"""Safe file handling shared by every stage: path containment, the one rule for files (and their
symlinks) in a directory the user names, atomic writes with the usual file mode, checksums, safe loads.

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


def checkpoint_file(root: str | os.PathLike, name: str) -> Path:
    """`root/name`, a file of a directory the user pointed us at (a checkpoint, a tokenizer): the one
    rule for names and symlinks that every loader of such a directory follows.

    The *name* must stay inside root (no absolute path, no `..`, no NUL): names come from fixed
    file names or from files in the directory (an index's weight_map), and those must not reach
    out. Where a symlink *points* is not checked: a Hugging Face hub-cache snapshot is made of
    symlinks into `../../blobs/`, and a directory the user chose is theirs to lay out. It must
    resolve to a regular file, though: a dangling link is named as such, and a FIFO or a device
    (`config.json -> /dev/zero`) would hang a reader. The file need not exist (callers check).
    """
    parts = Path(name).parts
    if not parts or "\x00" in name or Path(name).is_absolute() or ".." in parts:
        raise UnsafePath(f"path {name!r} escapes {root}")
    path = Path(root, name)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: a broken symlink (to {os.readlink(path)})")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: not a regular file")
    return path


def read_json_object(path: str | os.PathLike, error: type[InputError] = InputError) -> dict[str, Any]:
    """The JSON object in file `path`; anything else (not UTF-8, not JSON, not an object) is `error`
    naming the file, so a user's file never surfaces as a raw decoding traceback."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: must be a JSON object, got {type(obj).__name__}")
    return obj


def check_remote_code(trust_remote_code: bool, revision: str | None) -> None:
    """Refuse a true `trust_remote_code` unless `revision` pins a commit (40 hex digits).

    temper's own loaders never run a repository's code (they map known architectures onto their
    own model), but every loader takes the flag so that a caller forwarding one (lm-eval's
    `--trust_remote_code`) meets this rule: a branch or tag can be moved to new code after it was
    reviewed, a commit cannot (vLLM CVE-2026-4944).
    """
    if trust_remote_code is not False and not (
        isinstance(revision, str) and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)):
        raise InputError(f"trust_remote_code needs revision=<a 40-hex commit id> so that the code is the "
                         f"code reviewed, got revision={revision!r}")


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


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with the mode every other file gets (0666 less the umask):
    safetensors creates its files 0600, so saved weights were unreadable to the group alone."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


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
