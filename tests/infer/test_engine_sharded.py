"""Generation with a model sharded by FSDP2 over 2 gloo ranks, whose forward pass is a collective: every rank
generates its own prompts, and the ranks' generations differ in everything that sets the number of forward
passes (prompts, max_new_tokens, rows that stop at once, a window that overflows the context and is re-encoded
on one rank only, a rank with nothing to generate that `join`s). The engine keeps them in lockstep
(`engine._Lockstep`): each rank's tokens and log-probs are those of the same weights unsharded in one process,
exactly, in float32 and with bf16 mixed precision (the KV cache then takes the gathered parameters' dtype).
Afterwards the sharded model still trains (generation ran under no_grad, not inference_mode)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.ranks import run_ranks

pytestmark = pytest.mark.distributed


def work(amp: str) -> None:
    """One rank's part; raises on any difference."""
    import torch.distributed as dist

    from temper.infer.engine import generate, generate_with_logprobs, join
    from temper.model.config import PRESETS
    from temper.model.transformer import Transformer
    from temper.train.parallel import ParallelConfig, init_distributed, parallelize, shutdown_distributed

    torch.set_num_threads(1)
    d = init_distributed("cpu", ParallelConfig(dp_shard=2))
    cfg = replace(PRESETS["debug-llama"], vocab_size=100, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    plain = Transformer(cfg)
    plain.load_state_dict(model.state_dict())
    dtype = torch.bfloat16 if amp == "bf16" else None
    parallelize(model, d, amp_dtype=dtype)
    if dtype is not None:  # what FSDP2's mixed precision computes with: the weights rounded to bf16
        plain.to(dtype)
    # rank 0: two short prompts, 3 new tokens; rank 1: a prompt that fills most of the context, 12 new tokens
    # (its window overflows and is re-encoded mid-way, with margin 2)
    prompts = [[1, 2, 3], [4, 5]] if d.rank == 0 else [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    kw = {"max_new_tokens": 3 if d.rank == 0 else 12, "temperature": 1.0, "seed": 5, "window_margin": 2}
    assert generate(model, prompts, **kw) == generate(plain, prompts, **kw), d.rank
    # rank 0's rows all stop after one token; rank 1 goes on
    stop = {"should_stop": lambda row, toks: d.rank == 0, "max_new_tokens": 6, "seed": [1] * len(prompts)}
    got, want = generate_with_logprobs(model, prompts, **stop), generate_with_logprobs(plain, prompts, **stop)
    assert got[0] == want[0], (d.rank, got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5 if dtype is None else 1e-2)
    if d.rank == 0:
        join(model)  # nothing to generate this round
    else:
        assert generate(model, [[3]], max_new_tokens=4, temperature=0) == generate(plain, [[3]], max_new_tokens=4,
                                                                                   temperature=0)
    loss = model(torch.randint(0, 100, (2, 8))).float().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    dist.barrier()
    shutdown_distributed()


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_sharded_generation_runs_in_lockstep_and_equals_the_plain_model(amp, tmp_path):
    run_ranks(lambda argv: work(*argv), [amp], 2, tmp_path, timeout=180)
