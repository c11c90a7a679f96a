"""The per-rank memory estimate of each parallel layout against a real sharded step on gloo ranks.

A model whose parameters dominate its memory (dim 128, 4 blocks: 0.82M parameters, 13 MB of weights,
gradients and AdamW states against ~1 MB of activations) trains a few steps under each layout; on the
third step every rank measures (`measure_train_step`) the parameters, gradients and optimizer states it
holds as the optimizer step starts (its local storages: DTensor shards with FSDP2's padding, DDP's
buckets) and the peak of live tensor bytes over the step. Then:

  * FSDP2 over N ranks holds 1/N of what DDP holds per rank (parameters + gradients + optimizer states,
    DDP's buckets left out): measured, within 3% of 1/N (dim-0 padding and the replicated RoPE tables
    make it slightly more, never less);
  * the estimate's per-rank parameters, gradients and optimizer states are within 1% of the measured
    ones (ZeRO-1 partitions whole tensors, unevenly: there the mean over the ranks), and its peak within
    5% of the measured one, the bar of the single-device check (test_memory.py); on this model they land
    within 3%.

gloo runs collectives on its own threads, and a buffer that an asynchronous reduce-scatter still holds is
freed when that thread lets go of it: now and then one rank's step peaks a block's buffer higher than
the same step elsewhere (+3.8% seen under FSDP2). The measured peak is the smallest over both ranks and
two steps (a late free only adds), and no rank's step may exceed the estimate by more than 10%.

A pipeline (pp=2, 1F1B, two pipeline micro-batches; the model untied, as pipelines require) is checked
per stage: each rank against the estimate of its stage (`estimate(..., stage=)`), with the same bars.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.memory import RunShape, estimate, human_bytes, measure_train_step
from temper.train.optim import OptimConfig, build_optimizer
from temper.train.parallel import ParallelConfig, init_distributed, parallelize, shutdown_distributed
from temper.train.step import train_step
from tests.ranks import fork_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CFG = replace(PRESETS["debug-llama"], dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=32)
BATCH, SEQ = 2, 32
PARTS = ("parameters", "gradients", "optimizer states")

TWO = {
    "ddp": (ParallelConfig(), 1),
    "zero1": (ParallelConfig(zero1=True), 1),
    "fsdp": (ParallelConfig(dp_shard=2), 1),
    "zero2": (ParallelConfig(dp_shard=2, reshard_after_forward=False), 1),
    "fsdp_accum": (ParallelConfig(dp_shard=2), 2),  # 2 micro-batches of 1: FSDP2 sums whole gradients until the last
    "tp": (ParallelConfig(tp=2, sequence_parallel=False), 1),
    "tp_sp": (ParallelConfig(tp=2, sequence_parallel=True), 1),
    "pp": (ParallelConfig(pp=2), 1),  # 1F1B, 2 pipeline micro-batches of 1 sequence; the model untied (`_cfg`)
}
"""name: (layout, micro-batches the step accumulates over: BATCH sequences in all)."""
FOUR = {
    "ddp": (ParallelConfig(), 1),
    "fsdp": (ParallelConfig(dp_shard=4), 1),
    "hsdp": (ParallelConfig(dp_shard=2, dp_replicate=2), 1),
    "tp_fsdp": (ParallelConfig(tp=2, dp_shard=2), 1),
    "pp_fsdp": (ParallelConfig(pp=2, dp_shard=2), 1),
}


def _worker(rank: int, world: int, out_dir: str, layouts: dict[str, tuple[ParallelConfig, int]]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port another test could hold; a timeout turns a lost peer into a failure.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name, (layout, accumulation) in layouts.items():
            d = init_distributed("cpu", layout)  # the group exists: lays the ranks out on a mesh
            torch.manual_seed(0)
            model = Transformer(_cfg(layout))
            train_model = parallelize(model, d)
            optimizer = build_optimizer(model, OptimConfig(), "cpu", shard_states=layout.zero1)
            x = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1))  # the same on every rank (tp ranks share it)
            rows = BATCH // accumulation
            batches = [(x[i : i + rows, :-1], x[i : i + rows, 1:]) for i in range(0, BATCH, rows)]
            for step in range(2):  # AdamW's states exist from the 2nd step; DDP re-allocates its buckets in it
                train_step(train_model, optimizer, batches, step=step)
            measured = [measure_train_step(train_model, optimizer, batches,
                                           functools.partial(train_step, train_model, optimizer, batches, step=step))
                        for step in (2, 3)]
            results[name] = {"peaks": [m.peak for m in measured], "at_step": measured[0].at_step,
                             "buckets": measured[0].buckets, "stage": _stage(d)}
            # DDP's reducer holds the group: free it while every rank is still here (test_step_distributed.py).
            del train_model, model, optimizer
            dist.barrier()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        shutdown_distributed()  # as a recipe leaves: DTensor's caches let go of the groups


def _cfg(layout: ParallelConfig):
    """The model of `layout`: a pipeline holds the embedding and the head on different stages, so untied."""
    return replace(CFG, tie_embeddings=False) if layout.pp > 1 else CFG


def _stage(d) -> str | None:
    """This rank's pipeline stage as the estimate names it (None without a pipeline)."""
    if d.mesh is None or d.degree("pp") == 1:
        return None
    return "first" if d.mesh["pp"].get_local_rank() == 0 else "last"


def _run(tmp_path, world: int, layouts: dict[str, tuple[ParallelConfig, int]]) -> list[dict]:
    fork_ranks(_worker, (world, str(tmp_path), layouts), world)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _estimate(world: int, layout: ParallelConfig, accumulation: int = 1, stage: str | None = None):
    return estimate(_cfg(layout), RunShape(precision="fp32", micro_batch_size=BATCH // accumulation, seq_len=SEQ,
                                           device="cpu", accumulation_steps=accumulation, world_size=world,
                                           parallel=layout), stage=stage)


def _model_states(rank: dict) -> int:
    """Parameters + gradients + optimizer states this rank held at the step, DDP's buckets left out."""
    return sum(rank["at_step"][p] for p in PARTS) - rank["buckets"]


def _check_estimates(ranks: list[dict], world: int, layouts: dict[str, tuple[ParallelConfig, int]]) -> list[str]:
    rows = []
    for name, (layout, accumulation) in layouts.items():
        for stage in sorted({r[name]["stage"] for r in ranks}, key=str):  # a pipeline's stages hold different parts
            group = [r for r in ranks if r[name]["stage"] == stage]
            est, label = _estimate(world, layout, accumulation, stage), name + (f" ({stage} stage)" if stage else "")
            for part in PARTS:
                mean = sum(r[name]["at_step"][part] for r in group) / len(group)  # ZeRO-1's partitions are uneven
                assert est[part].bytes == pytest.approx(mean, rel=0.01), (label, part, est[part].bytes, mean)
            peaks = [p for r in group for p in r[name]["peaks"]]
            assert est.peak == pytest.approx(min(peaks), rel=0.05), (label, human_bytes(est.peak), human_bytes(min(peaks)))
            assert max(peaks) <= 1.1 * est.peak, (label, human_bytes(est.peak), human_bytes(max(peaks)))
            rows.append(f"{world} ranks {label}: " + ", ".join(
                f"{part} {est[part].bytes} est / {group[0][name]['at_step'][part]} measured" for part in PARTS)
                + f"; peak {est.peak} est / {min(peaks)}..{max(peaks)} measured (est / measured "
                f"{est.peak / min(peaks):.4f}..{est.peak / max(peaks):.4f})")
    print("\n".join(rows))
    return rows


def test_two_ranks_fsdp_holds_half_of_ddp_and_every_layout_matches_its_estimate(tmp_path):
    layouts = dict(TWO)
    try:
        import temper.train.tensor_parallel  # noqa: F401
    except ImportError:  # tensor parallel arrives in its own change
        layouts = {k: v for k, v in layouts.items() if not k.startswith("tp")}
    ranks = _run(tmp_path, 2, layouts)
    for r in ranks:
        ratio = _model_states(r["fsdp"]) / _model_states(r["ddp"])
        assert 0.5 <= ratio <= 0.5 * 1.03, ratio
        assert _model_states(r["zero2"]) == _model_states(r["fsdp"]) == _model_states(r["fsdp_accum"])  # same shards
        assert r["ddp"]["buckets"] == r["ddp"]["at_step"]["gradients"] // 2  # a second copy of the gradients
    _check_estimates(ranks, 2, layouts)


def test_four_ranks_fsdp_holds_a_quarter_of_ddp_and_matches_its_estimate(tmp_path):
    layouts = dict(FOUR)
    try:
        import temper.train.tensor_parallel  # noqa: F401
    except ImportError:
        layouts.pop("tp_fsdp")
    ranks = _run(tmp_path, 4, layouts)
    for r in ranks:
        ratio = _model_states(r["fsdp"]) / _model_states(r["ddp"])
        assert 0.25 <= ratio <= 0.25 * 1.03, ratio
        ratio = _model_states(r["hsdp"]) / _model_states(r["ddp"])  # sharded over dp_shard only
        assert 0.5 <= ratio <= 0.5 * 1.03, ratio
    _check_estimates(ranks, 4, layouts)
