"""Safety: unsafe pickles refused (RELIABILITY.md row 25), path traversal refused (row 27), lint
rules on src/ (no unrestricted torch.load, no literal trust_remote_code=True), and the
TEMPER_FAULT hook that the reliability tests depend on."""

from __future__ import annotations

import ast
import builtins
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from temper import faults
from temper.errors import InputError
from temper.files import UnsafePath, safe_join, safe_name, safe_torch_load, sha256_file
from temper.train.checkpoint import load_checkpoint, save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "temper"


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _write_payload(path: Path, marker: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, path)


# --- row 25: unsafe deserialization ------------------------------------------------------------


def test_payload_is_live_when_loaded_unsafely(tmp_path: Path) -> None:
    # Proves the test payload really runs code, so its absence below means something.
    marker = tmp_path / "pwned-control"
    _write_payload(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_safe_torch_load_refuses_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _write_payload(tmp_path / "evil.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_load_checkpoint_refuses_payload_in_optim(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={})
    marker = tmp_path / "pwned"
    _write_payload(path / "optim.pt", marker)
    # The attacker rewrites the manifest too, so the checksums pass and only weights_only stops it.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optim.pt"] = {"sha256": sha256_file(path / "optim.pt"), "bytes": (path / "optim.pt").stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, model=nn.Linear(4, 4), optimizer=torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


# --- row 27: path traversal ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../../b", "a\x00b", "..", "a/../../../etc/passwd"])
def test_safe_join_rejects_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafePath):
        safe_join(tmp_path, bad)


def test_safe_join_rejects_symlink_escape(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePath):
        safe_join(root, "link", "file.txt")
    os.symlink(root / "inside", root / "ok-link")  # a link that stays inside is fine
    assert safe_join(root, "ok-link") == (root / "inside").resolve()


def test_safe_join_accepts_nested_names(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "runs", "exp1", "checkpoints") == (tmp_path / "runs/exp1/checkpoints").resolve()
    assert safe_join(tmp_path, "a/b/../c") == (tmp_path / "a/c").resolve()


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../../b", "a/b", "a\\b", "a\x00b", "", ".", ".."])
def test_safe_name_rejects(bad: str) -> None:
    with pytest.raises(UnsafePath):
        safe_name(bad)


@pytest.mark.parametrize("good", ["exp1", "my-run_2024.05", "lora.adapter"])
def test_safe_name_accepts(good: str) -> None:
    assert safe_name(good) == good


# --- lint: the rules DESIGN.md "Checkpoints" and row 29 state, checked on every file in src/ ----


def _calls(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def _is_torch_load(call: ast.Call, bare_load: bool) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr == "load":
        return ast.unparse(f.value) in ("torch", "torch.serialization")
    return bare_load and isinstance(f, ast.Name) and f.id == "load"


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_unrestricted_torch_load_or_trusted_remote_code_in_src() -> None:
    problems = []
    files = sorted(SRC.rglob("*.py"))
    assert files, SRC
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        # `from torch import load` would hide a call as plain `load(...)`.
        bare_load = any(
            isinstance(n, ast.ImportFrom) and n.module in ("torch", "torch.serialization")
            and any(a.name == "load" for a in n.names)
            for n in ast.walk(tree)
        )
        for call in _calls(tree):
            where = f"{path.relative_to(SRC.parent)}:{call.lineno}"
            if _is_torch_load(call, bare_load):
                if not any(k.arg == "weights_only" and _is_true(k.value) for k in call.keywords):
                    problems.append(f"{where}: torch.load without weights_only=True")
            for k in call.keywords:
                if k.arg == "trust_remote_code" and _is_true(k.value):
                    problems.append(f"{where}: literal trust_remote_code=True")
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                        problems.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: literal trust_remote_code True")
    assert not problems, "\n".join(problems)


# Third-party entry points that run a repository's code when told to: a call in src must say
# trust_remote_code=<a variable> (threaded from the user's flag), never leave it to the library's default.
_REMOTE_CODE_CALLS = ("from_pretrained", "load_dataset", "pipeline", "AutoConfig", "AutoModel", "AutoTokenizer")


def _implicit_remote_code(tree: ast.AST) -> list[ast.Call]:
    def name(call: ast.Call) -> str:
        return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")

    return [c for c in _calls(tree)
            if name(c) in _REMOTE_CODE_CALLS and not any(k.arg == "trust_remote_code" for k in c.keywords)]


def test_remote_code_flag_is_explicit_at_every_third_party_loader_in_src() -> None:
    problems = [f"{path.relative_to(SRC.parent)}:{call.lineno}: {ast.unparse(call.func)}(...) without trust_remote_code="
                for path in sorted(SRC.rglob("*.py"))
                for call in _implicit_remote_code(ast.parse(path.read_text(encoding="utf-8")))]
    assert not problems, "\n".join(problems)
    caught = _implicit_remote_code(ast.parse("AutoModel.from_pretrained(p)\nload_dataset(d, trust_remote_code=t)"))
    assert [c.lineno for c in caught] == [1]


def test_every_checkpoint_loader_takes_the_flag_and_refuses_true_without_a_pinned_commit(tmp_path) -> None:
    """Row 29: the flag reaches every loader (lm-eval's --trust_remote_code arrives as model_args), False by
    default, and True is refused unless `revision` is a 40-hex commit, before anything is read."""
    import inspect

    from temper.infer.load import load_for_inference, open_checkpoint
    from temper.model.hf.checkpoint import load_hf
    from temper.recipes.lm_eval import load_checkpoint

    loaders = (load_hf, open_checkpoint, load_for_inference, load_checkpoint)
    for fn in loaders:
        params = inspect.signature(fn).parameters
        assert params["trust_remote_code"].default is False and params["revision"].default is None, fn.__name__
        for revision in (None, "main", "v1.0", "0" * 39, "g" * 40):
            with pytest.raises(InputError, match="trust_remote_code needs revision=<a 40-hex commit id>"):
                fn(tmp_path, trust_remote_code=True, revision=revision)
        with pytest.raises(InputError, match="no config.json|not a directory"):  # pinned: on to reading the files
            fn(tmp_path / "nowhere", trust_remote_code=True, revision="0123456789abcdef" * 2 + "01234567")
    pytest.importorskip("lm_eval")
    from temper.recipes.lm_eval import register

    with pytest.raises(InputError, match="trust_remote_code needs revision"):  # --trust_remote_code
        register()(checkpoint=str(tmp_path), trust_remote_code="True")


def test_lint_catches_what_it_should() -> None:
    bad = ast.parse("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\nf(trust_remote_code=True)\n")
    calls = list(_calls(bad))
    assert _is_torch_load(calls[0], False) and _is_torch_load(calls[1], False)
    assert not any(k.arg == "weights_only" and _is_true(k.value) for k in calls[1].keywords)
    assert _is_true(calls[2].keywords[0].value)


# --- the TEMPER_FAULT hook ----------------------------------------------------------------------


def test_faults_inactive_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert not faults.active("crash", step=5)


def test_faults_parse() -> None:
    specs = faults.parse(" kill_during_save:step=6 ; nan_loss:step=3:rank=1;crash:step=5:rank=1:once=/tmp/m;boom ")
    assert specs == (
        faults.FaultSpec("kill_during_save", step=6),
        faults.FaultSpec("nan_loss", step=3, rank=1),
        faults.FaultSpec("crash", step=5, rank=1, once="/tmp/m"),
        faults.FaultSpec("boom"),
    )


@pytest.mark.parametrize("bad", ["crash:step=x", "crash:steps=5", "crash:step", "step=5", "crash:once="])
def test_faults_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="TEMPER_FAULT"):
        faults.parse(bad)


def test_faults_step_and_rank_matching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV_VAR, "nan_loss:step=3:rank=1;kill_during_save:step=6")
    assert faults.active("nan_loss", step=3, rank=1)
    assert not faults.active("nan_loss", step=3, rank=0)
    assert not faults.active("nan_loss", step=4, rank=1)
    assert not faults.active("crash", step=3, rank=1)
    # No rank in the spec: any rank fires.
    assert faults.active("kill_during_save", step=6, rank=0)
    assert faults.active("kill_during_save", step=6, rank=3)
    assert not faults.active("kill_during_save", step=5)
    monkeypatch.setenv(faults.ENV_VAR, "crash")  # a new value is picked up in the same process
    assert faults.active("crash", step=123, rank=7)


def test_faults_once_marker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "sub" / "fired"
    monkeypatch.setenv(faults.ENV_VAR, f"crash:step=5:rank=1:once={marker}")
    assert not faults.active("crash", step=5, rank=0)
    assert not marker.exists(), "a non-matching call does not consume the once-marker"
    assert faults.active("crash", step=5, rank=1)
    assert marker.exists()
    assert not faults.active("crash", step=5, rank=1), "a restarted process does not fail again"
