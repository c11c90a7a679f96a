"""Checkpoints: bitwise round trip, kill -9 mid-save, retention, corruption, 2-rank save
(../shared/RELIABILITY.md rows 6, 7, 8; rows 1-4 are the lead's end-to-end resume tests)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from torch import nn

from temper.errors import InputError
from temper.train.checkpoint import (
    CheckpointCorrupt,
    NoValidCheckpoint,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    set_aside,
    verify_checkpoint,
)


class Tiny(nn.Module):
    """Embedding tied to the output head, as in GPT-2: the state dict holds one tensor twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(x)))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randint(0, 16, (2, 5))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fresh(seed: int = 0) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tiny()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def _assert_same_optim(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), (k, name)


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    model, opt = _fresh()
    _train(model, opt, 3)
    random.seed(1)
    np.random.seed(2)
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state={"loader": {"index": 12}})
    expected = _draws()

    model2, opt2 = _fresh(seed=7)
    state = load_checkpoint(path, model=model2, optimizer=opt2)
    restore_rng(path, rank=0)
    got = _draws()

    assert state == {"step": 3, "loader": {"index": 12}}
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    _assert_same_optim(opt, opt2)
    assert model2.head.weight is model2.emb.weight, "tie survives loading"
    with safetensors.safe_open(path / "model.safetensors", "pt") as f:
        assert "head.weight" not in f.keys(), "a tied tensor is stored once"
    # The next update is identical too: nothing the optimizer needs was lost.
    torch.manual_seed(5)
    _train(model, opt, 1)
    torch.manual_seed(5)
    _train(model2, opt2, 1)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_layout_latest_and_unwrapped_names(tmp_path: Path) -> None:
    model, opt = _fresh()
    compiled = torch.compile(model)  # state_dict keys gain `_orig_mod.`; never compiled: no forward
    path = save_checkpoint(tmp_path, 4, model=compiled, optimizer=opt, state={})
    assert path == tmp_path / "checkpoints" / "step-0000004"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "optim.pt", "rng-rank0.pt", "state.json"
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["step"] == 4 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "optim.pt", "rng-rank0.pt", "state.json"}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    with safetensors.safe_open(path / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["emb.weight", "norm.bias", "norm.weight"]
    # A plain dict of tensors and optimizer=None are accepted too.
    p2 = save_checkpoint(tmp_path, 5, model=dict(model.state_dict()), optimizer=None, state={})
    assert not (p2 / "optim.pt").exists()
    load_checkpoint(p2, model=torch.compile(Tiny()), optimizer=None)
    with pytest.raises(ValueError, match="without an optimizer"):
        load_checkpoint(p2, model=Tiny(), optimizer=opt)


def test_state_must_be_json(tmp_path: Path) -> None:
    model, opt = _fresh()
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"x": object()})
    assert list_checkpoints(tmp_path) == []


def test_retention_and_resave(tmp_path: Path) -> None:
    model, opt = _fresh()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={"v": step}, keep_last_n=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000005"]
    # Saving a step that exists replaces it, and never counts as two checkpoints.
    p = save_checkpoint(tmp_path, 5, model=model, optimizer=opt, state={"v": 55}, keep_last_n=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000005"]
    assert load_checkpoint(p, model=Tiny(), optimizer=None)["v"] == 55
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    for step in (6, 7):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={}, keep_last_n=0)
    assert len(list_checkpoints(tmp_path)) == 4


def test_keep_last_n_one_is_rejected(tmp_path: Path) -> None:
    model, opt = _fresh()
    with pytest.raises(ValueError, match="keep_last_n=1 is not allowed"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={}, keep_last_n=1)
    with pytest.raises(ValueError, match="keep_last_n"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={}, keep_last_n=-1)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_never_and_empty(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path, "never") is None
    assert find_resume_checkpoint(tmp_path, "") is None
    assert find_resume_checkpoint(tmp_path, "auto") is None
    with pytest.raises(FileNotFoundError):
        find_resume_checkpoint(tmp_path, "step-0000009")


# --- rows 6 and 7: SIGKILL while writing step 6 (keep_last_n=2) -----------------------------

_TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from temper.train.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 7):
        x = torch.randint(0, 16, (2, 5))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 2 == 0:
            save_checkpoint(sys.argv[1], step, model=model, optimizer=opt, state={"n": step}, keep_last_n=2)
            print("saved", step, flush=True)
    print("finished", flush=True)
    """
)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **extra}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose process was SIGKILLed by the fault hook half way through writing step 6."""
    tmp = tmp_path_factory.mktemp("killed")
    script = tmp / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    run = tmp / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(run)], capture_output=True, text=True, timeout=120,
        env=_env(TEMPER_FAULT="kill_during_save:step=6"),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["saved", "2", "saved", "4"]
    return run


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))


def test_kill_during_save_resumes_from_previous(killed_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    ckpts = run / "checkpoints"
    tmp_dir = ckpts / "step-0000006.tmp"
    assert tmp_dir.is_dir() and not (tmp_dir / "manifest.json").exists()
    assert (tmp_dir / "model.safetensors").stat().st_size > 0, "the kill came mid-write"
    assert (ckpts / "latest").read_text().strip() == "step-0000004"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the .tmp dir is not a candidate: no warning about it
        path = find_resume_checkpoint(run, "auto")
    assert path == ckpts / "step-0000004"
    assert not tmp_dir.exists(), "resume cleans stale .tmp dirs"

    # The restarted run saves step 6 again; the old .tmp (recreated here) is cleaned by that save.
    tmp_dir.mkdir()
    model = _sequential()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_checkpoint(path, model=model, optimizer=opt) == {"step": 4, "n": 4}
    save_checkpoint(run, 6, model=model, optimizer=opt, state={"n": 6}, keep_last_n=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000004", "step-0000006"]
    assert find_resume_checkpoint(run, "auto") == ckpts / "step-0000006"


def test_retention_never_deletes_before_new_is_complete(killed_run: Path) -> None:
    # keep_last_n=2 and the kill came while writing the 3rd: the 1st and 2nd both survive.
    assert [p.name for p in list_checkpoints(killed_run)] == ["step-0000002", "step-0000004"]
    for path in list_checkpoints(killed_run):
        model = _sequential()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = load_checkpoint(path, model=model, optimizer=opt)
        assert state["n"] == int(path.name.split("-")[1])


# --- row 8: corruption is detected; auto falls back, an explicit path does not ---------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "flip_model_byte": (lambda p: _flip_byte(p / "model.safetensors"), "step-0000004/model.safetensors sha256 mismatch"),
    "delete_optim": (lambda p: (p / "optim.pt").unlink(), "step-0000004: missing optim.pt"),
    "truncate_manifest": (lambda p: _truncate(p / "manifest.json"), "step-0000004/manifest.json unreadable"),
    "delete_manifest": (lambda p: (p / "manifest.json").unlink(), "step-0000004: missing manifest.json"),
    "flip_rng_byte": (lambda p: _flip_byte(p / "rng-rank0.pt"), "step-0000004/rng-rank0.pt sha256 mismatch"),
    "truncate_state": (lambda p: _truncate(p / "state.json"), "step-0000004/state.json size mismatch"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_checkpoint_detected(tmp_path: Path, corruption: str) -> None:
    model, opt = _fresh()
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={})
    _train(model, opt, 1)
    path = save_checkpoint(tmp_path, 4, model=model, optimizer=opt, state={})
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(path)

    with pytest.raises(CheckpointCorrupt, match=message):
        verify_checkpoint(path)
    with pytest.raises(CheckpointCorrupt, match=message):
        load_checkpoint(path, model=Tiny(), optimizer=None)
    with pytest.raises(CheckpointCorrupt, match=message):
        find_resume_checkpoint(tmp_path, str(path))  # explicit: no fallback
    with pytest.raises(CheckpointCorrupt, match=message):
        find_resume_checkpoint(tmp_path, "step-0000004")  # a name under checkpoints/ works too
    with pytest.warns(UserWarning, match=message):
        assert find_resume_checkpoint(tmp_path, "auto") == tmp_path / "checkpoints" / "step-0000002"


def test_auto_refuses_when_every_checkpoint_is_corrupt(tmp_path: Path) -> None:
    """Issue 13: not a silent fresh start. Each checkpoint is named with why it failed; set_aside keeps them
    out of the way (a new save of the same step leaves them alone)."""
    model, opt = _fresh()
    two = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={})
    four = save_checkpoint(tmp_path, 4, model=model, optimizer=opt, state={})
    _flip_byte(two / "model.safetensors")
    (four / "manifest.json").unlink()
    with pytest.raises(NoValidCheckpoint) as e:
        find_resume_checkpoint(tmp_path, "auto")
    assert isinstance(e.value, CheckpointCorrupt) and isinstance(e.value, InputError)
    assert str(e.value) == (f"every checkpoint in {tmp_path / 'checkpoints'} is corrupt (step-0000004: missing "
                            "manifest.json (incomplete save?); step-0000002/model.safetensors sha256 mismatch)")
    assert [p for p, _ in e.value.corrupt] == [four, two]
    assert set_aside([two]) == [two.with_name("step-0000002.corrupt")]
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={})
    _flip_byte(two / "model.safetensors")
    assert set_aside([two, four]) == [two.with_name("step-0000002.corrupt.1"), four.with_name("step-0000004.corrupt")]
    assert find_resume_checkpoint(tmp_path, "auto") is None
    assert (tmp_path / "checkpoints" / "step-0000002.corrupt" / "model.safetensors").exists()


def test_tampered_manifest_cannot_point_outside(tmp_path: Path) -> None:
    model, opt = _fresh()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../secret"] = {"sha256": "0" * 64, "bytes": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorrupt, match="bad file name"):
        verify_checkpoint(path)


# --- row 8 (last part) and row 13's RNG rule: a checkpoint written by 2 gloo ranks ------------

_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch import nn
    from temper.train.checkpoint import save_checkpoint

    rank, run = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    # A file store instead of a TCP port: no free-port race between concurrent test runs.
    dist.init_process_group("gloo", init_method=f"file://{run}/pg-store", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # each rank's data and dropout stream differ
    x = torch.randint(0, 16, (2, 5))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    save_checkpoint(run, 1, model=model, optimizer=opt, state={"step": 1}, keep_last_n=2)
    expect = {"draws": torch.rand(3), "params": model.module.state_dict()}
    try:  # rank 0 fails to write state.json: both ranks must raise, neither may hang
        save_checkpoint(run, 2, model=model, optimizer=opt, state={"bad": object()})
    except Exception as e:
        expect["error"] = type(e).__name__
    torch.save(expect, f"{run}/expect{rank}.pt")
    # Both ranks done with every collective, and DDP's reducer gone, before the group is torn down: a rank that tore
    # it down under the other, or a reducer outliving it, aborted ("terminate called without an active exception")
    # once in a loaded CI run.
    del model, opt
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_two_rank_checkpoint_loads_in_one_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    run = tmp_path / "run"
    run.mkdir()
    # Two plain processes (what torchrun would start), cheaper than a launcher process on 2 cores.
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(run)], stderr=subprocess.PIPE, text=True, env=_env())
        for rank in (0, 1)
    ]
    try:
        errors = [proc.communicate(timeout=180)[1] for proc in procs]
    finally:
        for proc in procs:  # a rank that died must not leave the other blocked forever
            if proc.poll() is None:
                proc.kill()
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err[-3000:]

    path = find_resume_checkpoint(run, "auto")
    assert path == run / "checkpoints" / "step-0000001"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(manifest["files"])

    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))  # no DDP: names have no "module."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_checkpoint(path, model=model, optimizer=opt)["step"] == 1
    for rank, error in ((0, "TypeError"), (1, "RuntimeError")):
        expect = torch.load(run / f"expect{rank}.pt", weights_only=True)
        assert expect["error"] == error
        for name, t in model.state_dict().items():
            assert torch.equal(t, expect["params"][name]), name
        restore_rng(path, rank)
        assert torch.equal(torch.rand(3), expect["draws"]), f"rank {rank}'s RNG stream"
    # Resuming with more ranks than were saved: rank 2 is reseeded deterministically, with a warning.
    with pytest.warns(UserWarning, match="reseeding rank 2"):
        restore_rng(path, 2)
    a = torch.rand(3)
    with pytest.warns(UserWarning):
        restore_rng(path, 2)
    assert torch.equal(torch.rand(3), a)
