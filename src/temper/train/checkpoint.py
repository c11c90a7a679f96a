"""Training checkpoints: atomic save, verified load, resume selection, retention.

Layout under `<run_dir>/checkpoints/`:

    step-0000004/
      model.safetensors   weights (tied duplicates stored once, their names in the file's metadata)
      optim.pt            optimizer.state_dict(), read back only with weights_only=True
      rng-rank{r}.pt      python / numpy / torch CPU / CUDA RNG states of rank r (tensors, ints, lists)
      state.json          the caller's trainer state: step, loader position, scheduler, scaler, config ...
      manifest.json       written last: {"step", "files": {name: {"sha256", "bytes"}}, "world_size", "complete"}
    latest                text file naming the newest complete directory (for people and tools)

A save writes everything into `step-0000004.tmp/`, fsyncs it, renames it to `step-0000004/` and
only then updates `latest` and applies retention (OLMo writes into a temporary dir the same way;
torchtitan treats a step dir without its `.metadata` as absent). A process killed mid-save leaves
only a `.tmp` dir, which is ignored and removed by the next save or resume. On load every file is
checked against the manifest's sha256, and `resume="auto"` skips a corrupt newest checkpoint
with a warning, falling back to the previous valid one; when every one is corrupt it refuses
(`NoValidCheckpoint`, naming each and why) rather than start again from step 0 unasked.

Under torch.distributed every rank calls `save_checkpoint`. With replicated parameters (DDP) rank 0
writes model, optimizer and state, each rank its own RNG file. With sharded parameters (FSDP2,
tensor or pipeline parallel: DTensors) the model and optimizer go to `dcp/` through
`torch.distributed.checkpoint` instead, every rank writing its own shards (`__<rank>_0.distcp`, and
`.metadata` from rank 0), keyed by parameter name: a load reshards them to whatever layout the
resuming run has (4 ranks to 2, to 1 process, to DDP), and a replicated checkpoint loads into a
sharded run as well. The run dir must be on a filesystem that all ranks see.

It does not export Hugging Face models (model/hf/checkpoint.py) and does not decide when to save (the
recipe's loop does).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from temper import faults
from temper.config import ConfigError
from temper.errors import InputError
from temper.files import (
    atomic_write_text,
    fsync_dir,
    safe_join,
    safe_torch_load,
    save_safetensors,
    sha256_file,
)
from temper.train.parallel import is_sharded, unwrap

_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."

MODEL_FILE = "model.safetensors"
DCP_DIR = "dcp"
"""A sharded checkpoint's model and optimizer, written by torch.distributed.checkpoint (every rank its shards)."""
OPTIM_FILE = "optim.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
"""A sharded checkpoint's optimizer states and hyperparameters keyed by parameter name (`param_groups.<name>.lr`):
pipeline stages hold different parameters, so one list of names per group would differ between ranks."""
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ALIASES_KEY = "temper.aliases"  # safetensors metadata: {"dropped name": "stored name"}


class CheckpointCorrupt(InputError):
    """A checkpoint is incomplete or its files do not match its manifest."""


class NoValidCheckpoint(CheckpointCorrupt):
    """resume=auto found checkpoints but none verifies: starting over would silently drop the run's
    progress, so the caller decides (`corrupt` lists each directory and why it failed)."""

    def __init__(self, root: Path, corrupt: list[tuple[Path, str]]) -> None:
        detail = "; ".join(why for _, why in corrupt)  # each message names its directory
        super().__init__(f"every checkpoint in {root} is corrupt ({detail})")
        self.corrupt = corrupt


class CheckpointNotFound(InputError, FileNotFoundError):
    """An explicitly named checkpoint to resume from does not exist."""


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# ---------------------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last_n: int = 3,
    module: nn.Module | None = None,
    async_write: bool = False,
) -> Path | PendingSave:
    """Write the checkpoint for `step` atomically and return its directory. Every rank must call it.

    `keep_last_n` complete checkpoints are kept (0 keeps all); older ones are deleted only after
    the new one is complete. Saving a step that already exists replaces it. module: the model whose
    parameters the optimizer holds, when `model` is a state dict (it names the optimizer's states in a
    sharded checkpoint).

    async_write (sharded models only): copy the shards to CPU memory now and write them in a background thread
    while training goes on (`dcp.async_save`); returns a `PendingSave` whose `wait()` (every rank) finishes the
    write and commits the checkpoint. Until then it is a `.tmp` directory, invisible to resume.
    """
    _check_keep_last_n(keep_last_n)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    rank, world = _rank_world()
    root = Path(run_dir) / "checkpoints"
    name = checkpoint_dir_name(step)
    tmp, final = root / f"{name}.tmp", root / name

    ok = True
    if rank == 0:
        ok = _attempt(_prepare_tmp, root, tmp)
    _all_ok(ok, "preparing", tmp)

    if isinstance(optimizer, ZeroRedundancyOptimizer):  # ZeRO-1: every rank sends rank 0 its shard of the states
        optimizer.consolidate_state_dict(to=0)
    pending = None
    if is_sharded(model):
        box: list[PendingSave | None] = []
        written = _attempt(lambda: box.append(_write_sharded(tmp, model, optimizer, module, async_write)))
        _all_ok(written, "writing shards of", tmp)
        pending = box[0]
        model, optimizer = None, None  # in dcp/ (or on their way); rank 0 writes the state, every rank its RNG
    ok = _attempt(_write_rank_files, tmp, rank, step, model, optimizer, state)
    _all_ok(ok, "writing", tmp)
    if pending is not None:
        pending.commit = lambda: _commit_all(root, tmp, final, step, world, keep_last_n)
        return pending
    _commit_all(root, tmp, final, step, world, keep_last_n)
    return final


def _commit_all(root: Path, tmp: Path, final: Path, step: int, world: int, keep_last_n: int) -> None:
    """Rank 0 commits the written directory; every rank learns whether it succeeded."""
    rank, ok = _rank_world()[0], True
    if rank == 0:
        ok = _attempt(_commit, root, tmp, final, step, world, keep_last_n)
    _all_ok(ok, "committing", tmp)


class PendingSave:
    """A checkpoint whose shards are being written in the background (`save_checkpoint(async_write=True)`).

    The shards were copied to CPU memory before `save_checkpoint` returned, so the training steps that follow
    cannot change what is written. `wait()` on every rank joins the writer, then commits
    the checkpoint (manifest, rename, `latest`, retention) exactly as a synchronous save does."""

    def __init__(self, future: Any, tmp: Path) -> None:
        self.future, self.tmp = future, tmp
        self.commit: Callable[[], None] = lambda: None
        self.final = tmp.with_name(tmp.name.removesuffix(".tmp"))

    def wait(self) -> Path:
        _all_ok(_attempt(self.future.result), "writing shards of", self.tmp)
        self.commit()
        return self.final


_ASYNC_GROUPS: weakref.WeakKeyDictionary[dist.ProcessGroup, dist.ProcessGroup] = weakref.WeakKeyDictionary()
"""The default group -> its gloo group for background writes. Keyed by the group itself, not its id(): a
process that leaves and joins again (a sweep, the tests) could get a new default group at the freed one's
address and be handed the old, destroyed gloo group."""


def _async_group() -> dist.ProcessGroup | None:
    """A gloo group for the background writer's collectives (NCCL must not be driven from a second thread
    while training uses it); created on the first asynchronous save of a process group, by every rank."""
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if world not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[world] = dist.new_group(backend="gloo")
    return _ASYNC_GROUPS[world]


def _check_keep_last_n(keep_last_n: int) -> None:
    # torchtitan rejects keep_latest_k == 1 for the same reason: the only checkpoint would be
    # deleted as soon as the next one starts to count, and a crash then leaves none.
    if keep_last_n == 1:
        raise ValueError(
            "keep_last_n=1 is not allowed: a crash while writing the next checkpoint could leave no "
            "valid one. Use keep_last_n >= 2, or 0 to keep all."
        )
    if keep_last_n < 0:
        raise ValueError(f"keep_last_n must be 0 (keep all) or >= 2, got {keep_last_n}")


def _prepare_tmp(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root)
    tmp.mkdir()


def _write_sharded(tmp: Path, model: nn.Module | Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
                   module: nn.Module | None, async_write: bool = False) -> PendingSave | None:
    """Every rank writes its shards of the model and optimizer into `tmp/dcp` (names, not ids, key the states)."""
    owner = unwrap(model) if isinstance(model, nn.Module) else module
    content: dict[str, Any] = {"model": get_model_state_dict(owner) if isinstance(model, nn.Module) else dict(model)}
    if optimizer is not None:
        if owner is None:
            raise ValueError("saving a sharded optimizer needs the model (module=) to name its states")
        content["optim"] = get_optimizer_state_dict(owner, optimizer, options=FLAT_OPTIM)
    writer = dcp.FileSystemWriter(tmp / DCP_DIR, sync_files=True)
    if async_write:
        return PendingSave(dcp.async_save(content, storage_writer=writer, process_group=_async_group()), tmp)
    dcp.save(content, storage_writer=writer)
    return None


def _write_rank_files(
    tmp: Path,
    rank: int,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> None:
    if rank == 0:
        try:
            state_text = json.dumps({"step": step, **state}, indent=2, sort_keys=True) + "\n"
        except TypeError as e:
            raise TypeError(f"checkpoint state must be JSON-serialisable: {e}") from e
        if model is not None:
            _write_model(tmp / MODEL_FILE, model, step)
        if optimizer is not None:
            with open(tmp / OPTIM_FILE, "wb") as f:
                torch.save(optimizer.state_dict(), f)
                _flush(f)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            f.write(state_text)
            _flush(f)
    with open(tmp / _rng_file(rank), "wb") as f:
        torch.save(_rng_state(), f)
        _flush(f)


def _commit(root: Path, tmp: Path, final: Path, step: int, world: int, keep_last_n: int) -> None:
    missing = [_rng_file(r) for r in range(world) if not (tmp / _rng_file(r)).exists()]
    if missing:
        raise RuntimeError(f"{tmp}: missing {missing}; does every rank see the same run dir?")
    files = {
        p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    manifest = {"step": step, "files": files, "world_size": world, "complete": True}
    # The manifest goes last: its presence is what makes the directory a checkpoint.
    with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        _flush(f)
    fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. a SIGTERM save right after a periodic one)
        final.rename(root / f"{final.name}.replaced.tmp")
    tmp.rename(final)
    fsync_dir(root)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    _apply_retention(root, keep_last_n, keep=final)
    clean_stale_tmp(root)


def _apply_retention(root: Path, keep_last_n: int, keep: Path) -> None:
    """Delete all but the newest `keep_last_n` complete checkpoints (never `keep`, the new one)."""
    if keep_last_n == 0:
        return
    old = [p for p in list_checkpoints(root.parent) if p != keep][: -(keep_last_n - 1)]
    for path in old:
        # Rename first so a crash mid-delete leaves a `.tmp` dir, not a half-deleted checkpoint.
        doomed = path.with_name(f"{path.name}.deleting.tmp")
        path.rename(doomed)
        shutil.rmtree(doomed)


def set_aside(paths: list[Path]) -> list[Path]:
    """Rename checkpoint directories to `<name>.corrupt` (`.corrupt.1`, ... if taken): kept for a
    post-mortem, but no longer a step directory, so neither resume, retention nor a new save of the
    same step touches them."""
    moved = []
    for path in paths:
        target, n = path.with_name(f"{path.name}.corrupt"), 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt.{n}")
        path.rename(target)
        moved.append(target)
    return moved


def clean_stale_tmp(checkpoints_dir: str | os.PathLike) -> None:
    """Remove `*.tmp` leftovers of saves, deletions or `latest` updates that a crash interrupted."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return
    for p in root.glob("*.tmp"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _write_model(path: Path, model: nn.Module | Mapping[str, torch.Tensor], step: int) -> None:
    sd = unwrap(model).state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors, aliases = _dedup_shared(sd)
    metadata = {_ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    if faults.active("kill_during_save", step=step):
        # Emulate SIGKILL in the middle of the write: half the bytes reach the disk, then death.
        blob = safetensors.torch.save(tensors, metadata=metadata)
        with open(path, "wb") as f:
            f.write(blob[: len(blob) // 2])
            _flush(f)
        faults.kill_now()
    save_safetensors(tensors, path, metadata=metadata)  # the mode of every other file, not 0600
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _dedup_shared(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory. Exact aliases (tied embeddings) are stored
    once and their other names recorded; partial overlaps (views) are cloned."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[int, int] = {}
    for name, t in sd.items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
        ptr = t.untyped_storage().data_ptr()
        storages[ptr] = storages.get(ptr, 0) + 1
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        shared = storages[ptr] > 1 and t.numel() > 0
        t = t.to("cpu").contiguous()
        tensors[name] = t.clone() if shared else t
    return tensors, aliases


# ------------------------------------------------------------------------------- find / verify


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories that have a manifest (not yet verified), oldest step first."""
    return [p for p in _step_dirs(run_dir) if (p / MANIFEST_FILE).is_file()]


def _step_dirs(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check that the manifest is complete and every file matches its size and sha256."""
    _read_manifest(Path(path), verify=True)


def _read_manifest(path: Path, *, verify: bool) -> dict[str, Any]:
    label = path.name
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointCorrupt(f"{label}: missing {MANIFEST_FILE} (incomplete save?)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files, step, world = manifest["files"], manifest["step"], manifest["world_size"]
        if manifest.get("complete") is not True or not isinstance(files, dict):
            raise ValueError("not marked complete")
        if not isinstance(step, int) or not isinstance(world, int):
            raise ValueError("step/world_size are not integers")
        for entry in files.values():
            if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
                raise ValueError("a file entry lacks sha256/bytes")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorrupt(f"{label}/{MANIFEST_FILE} unreadable: {e}") from e
    weights = f"{DCP_DIR}/.metadata" if any(n.startswith(f"{DCP_DIR}/") for n in files) else MODEL_FILE
    required = [weights, STATE_FILE] + [_rng_file(r) for r in range(world)]
    for name in required:
        if name not in files:
            raise CheckpointCorrupt(f"{label}/{MANIFEST_FILE} does not list {name}")
    if not verify:
        return manifest
    for name, entry in files.items():
        try:
            fpath = safe_join(path, name)  # a tampered manifest must not point outside the dir
        except ValueError as e:
            raise CheckpointCorrupt(f"{label}/{MANIFEST_FILE}: bad file name {name!r}") from e
        if not fpath.is_file():
            raise CheckpointCorrupt(f"{label}: missing {name}")
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointCorrupt(f"{label}/{name} size mismatch ({size} bytes, manifest says {entry['bytes']})")
        if sha256_file(fpath) != entry["sha256"]:
            raise CheckpointCorrupt(f"{label}/{name} sha256 mismatch")
    return manifest


def find_resume_checkpoint(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """Pick the checkpoint to resume from.

    "never" / "" / None: None. "auto": the newest checkpoint that verifies; corrupt newer ones
    are skipped with a warning; None when there is no checkpoint, `NoValidCheckpoint` when there
    are some and none verifies. Anything else is a path (absolute, or a directory name under
    `<run_dir>/checkpoints/`), which must verify: no fallback.
    """
    if resume in (None, "", "never"):
        return None
    root = Path(run_dir) / "checkpoints"
    if resume == "auto":
        # One cleaner: ranks may get here before joining the process group, hence RANK too.
        if _rank_world()[0] == 0 and os.environ.get("RANK", "0") == "0":
            clean_stale_tmp(root)
        corrupt: list[tuple[Path, str]] = []
        for path in reversed(_step_dirs(run_dir)):
            try:
                verify_checkpoint(path)
            except CheckpointCorrupt as e:
                corrupt.append((path, str(e)))  # the message names the directory
                continue
            for bad, why in corrupt:
                warnings.warn(f"skipping checkpoint {bad}: CheckpointCorrupt: {why}", stacklevel=2)
            return path
        if corrupt:
            raise NoValidCheckpoint(root, corrupt)
        return None
    path = Path(resume)
    if not path.is_absolute() and not path.exists() and root.is_dir():
        path = safe_join(root, resume)
    if not path.is_dir():
        raise CheckpointNotFound(f"resume checkpoint {resume!r} not found")
    verify_checkpoint(path)
    return path


# ---------------------------------------------------------------------------------------- load


def trainable_names(model: nn.Module) -> list[str]:
    """State-dict names of the parameters that train: as `state_dict()` spells them, without the
    `_checkpoint_wrapped_module.` that activation checkpointing adds to module paths."""
    return [n.replace(_CHECKPOINT_PREFIX, "") for n, p in model.named_parameters() if p.requires_grad]


def weights_to_save(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """`model`'s state dict, detached, for `save_checkpoint`: with `trainable_only`, just the parameters that train
    (adapters over a frozen base loaded from elsewhere), as `load_checkpoint(..., trainable_only=True)` reads them."""
    names = set(trainable_names(model)) if trainable_only else None
    return {k: v.detach() for k, v in model.state_dict().items() if names is None or k in names}


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's state.json (step, the run's resolved config, the recipe's counters), without
    reading weights: a resume checks its settings first."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    map_location: str | torch.device = "cpu",
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Verify `path`, load weights into `model` and state into `optimizer` in place; return state.json.

    trainable_only: the checkpoint holds exactly the parameters that require grad (adapters over a
    frozen base loaded from elsewhere); a missing or an extra one is an error, as in a full load.

    RNG is restored separately by `restore_rng`, after the caller has fast-forwarded its data
    loader: restoring it before would let the fast-forward consume it, and a resumed run with dropout
    would then draw other masks than the uninterrupted one.

    The optimizer's state (moments, step counts) comes from the checkpoint, its hyperparameters (betas, eps,
    weight decay, Muon's momentum: every param-group setting) from the run's config as the optimizer was built:
    `load_state_dict` would put the checkpoint's back, and a resume with another --optim.beta2 (lowered after a
    loss spike, say) would silently keep the old one. The same config gives the same values, so an exact resume
    stays exact.
    """
    if optimizer is None:
        return _load_checkpoint(path, model, optimizer, map_location, trainable_only)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = _load_checkpoint(path, model, optimizer, map_location, trainable_only)
    for group, kept in zip(optimizer.param_groups, settings, strict=True):  # the loaded groups: new dicts
        group.update(kept)
    return state


def _load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     map_location: str | torch.device, trainable_only: bool) -> dict[str, Any]:
    path = Path(path)
    _read_manifest(path, verify=True)
    if (path / DCP_DIR).is_dir():
        _load_sharded(path, model, optimizer, trainable_only)
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    model_path = path / MODEL_FILE
    sd = safetensors.torch.load_file(model_path, device="cpu")
    with safetensors.safe_open(model_path, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    for dropped, stored in aliases.items():
        sd[dropped] = sd[stored]
    target = unwrap(model)
    if trainable_only:
        expected = set(trainable_names(target))
        missing, extra = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
        if missing or extra:
            raise ValueError(f"{path.name} does not hold the trainable parameters: missing {missing[:8]}, "
                             f"unexpected {extra[:8]}")
    if optimizer is not None and not (path / OPTIM_FILE).is_file():
        raise ValueError(f"{path.name} has no {OPTIM_FILE}: it was saved without an optimizer")
    if getattr(target, "pipeline_stages", None) is not None:
        # Its optimizer states are keyed by position in the whole model's optimizer, which a stage does not hold.
        raise ConfigError(f"{path.name} is a replicated checkpoint (model.safetensors): it cannot resume a pipeline-"
                          f"parallel run (train.parallel.pp > 1); resume it without pp, or start from its weights "
                          f"with init.from")
    if is_sharded(target):  # a replicated checkpoint into a sharded run: each rank keeps its slices
        full = StateDictOptions(full_state_dict=True, strict=not trainable_only)
        set_model_state_dict(target, sd, options=full)
        if optimizer is not None:
            saved = safe_torch_load(path / OPTIM_FILE, map_location="cpu")
            set_optimizer_state_dict(target, optimizer, _named_optim_state(target, optimizer, saved), options=full)
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    target.load_state_dict(sd, strict=not trainable_only)
    if optimizer is not None:
        saved = safe_torch_load(path / OPTIM_FILE, map_location=map_location)
        if len(saved["param_groups"]) != len(optimizer.param_groups):  # written when empty groups were kept
            saved["param_groups"] = [g for g in saved["param_groups"] if g["params"]]
        optimizer.load_state_dict(saved)
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> None:
    """Read `path/dcp` into the model and optimizer in whatever layout they have now: DCP reads, on each rank,
    the slices of the saved shards that this rank's own shards cover."""
    target = unwrap(model)
    content: dict[str, Any] = {"model": get_model_state_dict(target)}
    if trainable_only:
        keep = set(trainable_names(target))
        content["model"] = {k: v for k, v in content["model"].items() if k in keep}
    if optimizer is not None:
        content["optim"] = get_optimizer_state_dict(target, optimizer, options=FLAT_OPTIM)
    try:
        dcp.load(content, checkpoint_id=path / DCP_DIR)
    except Exception as e:  # DCP names the missing or mismatched key
        raise CheckpointCorrupt(f"{path.name}/{DCP_DIR}: cannot load into this model: {e}") from e
    set_model_state_dict(target, content["model"], options=StateDictOptions(strict=not trainable_only))
    if optimizer is not None:
        set_optimizer_state_dict(target, optimizer, content["optim"], options=FLAT_OPTIM)


def _named_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """`optimizer.state_dict()` as saved by a replicated run (states keyed by position) keyed by parameter name,
    as `set_optimizer_state_dict` takes it: the i-th saved position is the i-th parameter this optimizer holds
    (both built by the same `param_groups`)."""
    names = {id(p): n.replace(_CHECKPOINT_PREFIX, "") for n, p in model.named_parameters()}
    now = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ids) != len(now):
        raise CheckpointCorrupt(f"the checkpoint's optimizer holds {len(ids)} parameters, this run's {len(now)}")
    name_of = dict(zip(ids, now, strict=True))
    return {"state": {name_of[i]: st for i, st in saved["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]]}


# ----------------------------------------------------------------------------------------- RNG


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _rng_state() -> dict[str, Any]:
    # Only tensors, ints, floats, strings and lists, so that weights_only=True can read it back
    # (torch 2.6 made weights_only the default and broke pickled numpy RNG states: HF #34631).
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(path: str | os.PathLike, rank: int) -> None:
    """Restore this rank's python / numpy / torch / CUDA RNG from checkpoint `path`.

    If the checkpoint has no file for `rank` (it was written with fewer ranks), reseed every
    generator from (step, rank) instead and warn: the run continues deterministically but not
    bit-identically to an uninterrupted one.
    """
    path = Path(path)
    manifest = _read_manifest(path, verify=False)
    name = _rng_file(rank)
    if name not in manifest["files"]:
        seed = (manifest["step"] * 1_000_003 + rank) % (2**32)
        warnings.warn(
            f"{path.name} was saved by {manifest['world_size']} ranks and has no {name}; "
            f"reseeding rank {rank}'s RNG from step {manifest['step']} (seed {seed})",
            stacklevel=2,
        )
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
        return
    if sha256_file(path / name) != manifest["files"][name]["sha256"]:
        raise CheckpointCorrupt(f"{path.name}/{name} sha256 mismatch")
    s = safe_torch_load(path / name)
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = s["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(s["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device=i)


# --------------------------------------------------------------------------------- distributed


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _attempt(fn: Callable[..., None], *args: Any) -> bool | BaseException:
    """Run one save phase; return True, or the exception so that all ranks can agree to fail."""
    try:
        fn(*args)
        return True
    except Exception as e:  # re-raised by _all_ok after every rank knows
        return e


def _all_ok(ok: bool | BaseException, phase: str, tmp: Path) -> None:
    """Barrier that also tells every rank whether all ranks succeeded, so a failure on one rank
    raises everywhere instead of leaving the others blocked in the next barrier."""
    good = ok is True
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        flag = torch.tensor([1 if good else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        all_good = bool(flag.item())
    else:
        all_good = good
    if isinstance(ok, BaseException):
        raise ok
    if not all_good:
        raise RuntimeError(f"checkpoint save failed on another rank while {phase} {tmp}")


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
