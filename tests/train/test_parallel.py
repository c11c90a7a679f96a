"""Wrapping for training: per-block compile (one graph for identical blocks, the plain model's names)
and activation checkpointing with the checkpointed inputs offloaded to CPU memory (same gradients)."""

import copy
import functools
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.parallel import DistInfo, apply_activation_checkpointing, parallelize

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
