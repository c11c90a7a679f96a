"""The README's "where does X happen" table, the import-direction rule of DESIGN.md, and nothing shipped
leaning on this workplace's ../shared folder, stay true."""

import ast
import re
from pathlib import Path

import pytest

from temper.eval.tasks import DEFAULT_DATA_ROOT, TaskError, load_task

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "temper"

# stage -> temper stages it may import (DESIGN.md "Import direction"); top-level helper modules
# (config, files, faults, errors, sandbox) sit below every stage.
ALLOWED = {
    "data": set(),
    "model": set(),
    "train": {"data", "model"},
    "infer": {"model", "data"},
    "align": {"train", "infer", "data", "model"},
    "eval": {"infer", "model", "data"},
    "rag": {"infer", "data", "model"},
    "serve": {"infer", "data", "model"},
    "recipes": {"data", "model", "train", "infer", "align", "eval", "rag", "serve"},
}
BASE = {"config", "files", "faults", "errors", "sandbox"}


def test_readme_table_paths_exist():
    text = (ROOT / "README.md").read_text()
    paths = re.findall(r"\| `([^`]+\.(?:py|sh)|[^`]+/)` \|", text)
    assert len(paths) > 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README names files that do not exist: {missing}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("temper"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("temper"))
    return out


def test_import_direction():
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        if len(rel) == 1:
            if rel[0] == "__main__.py":
                stages = {m.split(".")[1] for m in _imports(path) if m.count(".") >= 1}
                bad += [f"__main__ imports {s}" for s in stages - {"recipes", "config", "errors"}]
            continue
        stage = rel[0]
        for mod in _imports(path):
            parts = mod.split(".")
            if len(parts) < 2 or parts[1] in BASE or parts[1] == stage:
                continue
            if stage == "recipes" and parts[1] == "recipes" and len(parts) > 2 and path.stem != "__init__":
                bad.append(f"{path.relative_to(ROOT)} imports another recipe {mod}")
            elif parts[1] not in ALLOWED[stage]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_nothing_shipped_depends_on_the_workplace_shared_folder():
    """../shared holds this project's tests' data and design notes; a user's machine has neither, so no
    module reads from it, defaults to it or points a reader at it."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "shared/" in line or "RELIABILITY" in line]
    assert not hits, hits


def test_a_task_without_its_file_names_the_file_and_how_to_give_it(tmp_path):
    assert not DEFAULT_DATA_ROOT.startswith("..")
    with pytest.raises(TaskError, match=r"arc_easy: no data file .*arc-easy/test.jsonl: give one as arc_easy=path"):
        load_task("arc_easy", tmp_path)
