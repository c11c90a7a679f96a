"""Rows 10 and 14 on real gloo process groups: 2-rank DDP == one process with the same global
batch (padded, unequal lengths), and a NaN on rank 1 stops the update on both ranks."""

import datetime
import functools
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from temper.train.losses import CompiledLoss, LMLoss
from temper.train.parallel import DistInfo, parallelize
from temper.train.step import NonFiniteLoss, train_step
from tests.ranks import fork_ranks

from .test_step import TinyLM, padded_batch

pytestmark = pytest.mark.distributed


def _worker(rank, world, out_dir, fault, compiled=False):
    if fault:
        os.environ["TEMPER_FAULT"] = fault
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # A file rendezvous: no TCP port that another test's processes could still hold, and a
    # timeout so that a lost peer fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg-store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        loss_fn = None
        if compiled:  # train.compile_scope=model: compiled in place, then DDP; the loss compiled with the forward
            torch.compile = functools.partial(torch.compile, backend="aot_eager")
            model = parallelize(TinyLM(), DistInfo(rank, rank, world, torch.device("cpu")), compile=True,
                                compile_scope="model")
            loss_fn = CompiledLoss(LMLoss())
        else:
            model = nn.parallel.DistributedDataParallel(TinyLM())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, error = [], None
        for step in range(5):
            x, y = padded_batch(step)
            half = slice(rank * 2, rank * 2 + 2)  # this rank's half of the global batch of 4
            try:
                losses.append(train_step(model, opt, [(x[half], y[half])], step=step, loss_fn=loss_fn).loss)
            except NonFiniteLoss:
                error = step
                break
        torch.save({"losses": losses, "error": error, "params": [p.detach() for p in model.module.parameters()]},
                   f"{out_dir}/rank{rank}.pt")
        # DDP's reducer holds the process group: freed after destroy_process_group, gloo's teardown
        # can wait forever on a peer that already left (seen with torch 2.13). Free it while both
        # ranks are still here.
        del model, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, fault=None, compiled=False):
    fork_ranks(_worker, (2, str(tmp_path), fault, compiled), 2)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "whole-model-compiled"])
def test_ddp_equals_single_process(tmp_path, compiled):
    """2 DDP ranks give the single eager process's losses and weights; also with train.compile_scope=model under
    DDP (the model compiled in place, DDP around it, the loss compiled with the forward: dynamo breaks at DDP's
    forward; aot_eager), to the looser tolerance of a traced graph's reordered sums."""
    ranks = run_ranks(tmp_path, compiled=compiled)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    single = [train_step(model, opt, [padded_batch(step)], step=step).loss for step in range(5)]
    loss_tol, param_tol = ((1e-5, 1e-6), (1e-5, 1e-5)) if compiled else ((1e-6, 1e-7), (1e-6, 1e-7))
    for r in ranks:
        torch.testing.assert_close(r["losses"], single, rtol=loss_tol[0], atol=loss_tol[1])
        for a, b in zip(r["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=param_tol[0], atol=param_tol[1])


def test_nan_on_one_rank_fails_on_both_before_the_update(tmp_path):
    ranks = run_ranks(tmp_path, fault="nan_loss:step=3:rank=1")
    assert [r["error"] for r in ranks] == [3, 3]
    assert torch.equal(torch.cat([p.flatten() for p in ranks[0]["params"]]),
                       torch.cat([p.flatten() for p in ranks[1]["params"]]))
    # The parameters are those after step 2: replay three good steps in one process.
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        train_step(model, opt, [padded_batch(step)], step=step)
    for a, b in zip(ranks[0]["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
