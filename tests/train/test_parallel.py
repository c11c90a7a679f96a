"""Wrapping for training: per-block compile (one graph for identical blocks, the plain model's names)
and activation checkpointing with the checkpointed inputs offloaded to CPU memory (same gradients)."""

import copy
import functools
import weakref
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.parallel import (
    DistInfo,
    apply_activation_checkpointing,
    parallelize,
    shared_store_restarts,
    shutdown_distributed,
)

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def _grads(model, x):
    model(x).float().pow(2).mean().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_with_and_without_offload_gives_the_same_gradients(offload):
    torch.manual_seed(0)
    plain = Transformer(PRESETS["debug-llama"])
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped, 1, offload=offload)
    x = torch.randint(0, 256, (2, 24))
    ref, got = _grads(plain, x), _grads(wrapped, x)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiling_per_block_keeps_names_and_compiles_one_graph(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    model = Transformer(replace(PRESETS["debug-llama"], n_layers=6))
    names = list(model.state_dict())
    out = parallelize(model, CPU, activation_checkpointing=1, compile=True)
    assert out is model and list(model.state_dict()) == names
    x = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        model(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1  # six identical blocks, one compiled graph
    torch._dynamo.reset()


def test_torchrun_restarts_over_a_shared_store_are_flagged(monkeypatch):
    """Row 16: torchrun keeps one TCP store across --max-restarts restarts, and a restarted group can read the
    dead workers' addresses from it (pytorch#135712): init_distributed warns unless each attempt gets its own
    store (ELASTIC_STORE_FIX, which test_pretrain_reliability's elastic restart uses)."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert shared_store_restarts()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: the shared store is harmless
    assert not shared_store_restarts()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what ELASTIC_STORE_FIX makes torchrun set
    assert not shared_store_restarts()


def test_leaving_on_an_exception_frees_the_model_before_the_group(tmp_path, monkeypatch):
    """Row 14 (`fail` on 2 ranks): a recipe's `finally: shutdown_distributed()` runs while the exception's
    traceback still holds the DDP model. Freed after the group was destroyed, gloo's teardown could wait for
    a peer that had left (one run in two hung with 2 CPU ranks); the model must be gone before the group."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    model_ref, alive_at_destroy = [], []
    destroy = dist.destroy_process_group

    def watched_destroy():
        alive_at_destroy.append(model_ref[0]() is not None)
        destroy()

    monkeypatch.setattr(dist, "destroy_process_group", watched_destroy)

    def failing_loop():
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        model_ref.append(weakref.ref(model))
        raise RuntimeError("non-finite loss")

    with pytest.raises(RuntimeError, match="non-finite loss"):
        try:
            failing_loop()
        finally:
            shutdown_distributed()
    assert alive_at_destroy == [False] and not dist.is_initialized()
