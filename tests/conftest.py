"""Shared test harness (see ../shared/RELIABILITY.md): one thread, deterministic algorithms, float32."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED_DATA.exists():  # CI clones main with shared/ beside it, as in the workplace
    SHARED_DATA = Path(os.environ.get("TEMPER_SHARED_DATA", "../shared/data")).resolve()


@pytest.fixture(autouse=True)
def _deterministic(request):
    torch.set_num_threads(1)
    # On a GPU some kernels (e.g. the embedding's backward) have no deterministic variant: GPU tests
    # check behaviour, not bits, so there a non-deterministic kernel warns instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=request.node.get_closest_marker("gpu") is not None)
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the tests' ids
def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (`--dist loadgroup`, as scripts/test.sh runs the suite), tests that spawn
    # several processes run one after another on one worker, so ranks never crowd each other out of
    # the cores; every other test file runs whole on one worker, so its module fixtures are built once.
    for item in items:
        group = "distributed" if "distributed" in item.keywords else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_collection_finish(session):
    # Lost groups would not fail a test, only run the suite far slower (every test alone, module fixtures built on
    # both workers, ranks crowding each other): stop instead.
    if getattr(session.config.option, "loadgroup", False) and session.items and "@" not in session.items[0].nodeid:
        raise pytest.UsageError("pytest-xdist did not group the tests (--dist loadgroup): xdist 3.8 cannot under "
                                "pytest 9; install pyproject's pytest<9")
