"""Monitoring by parameter group (`train.monitor`, `log.monitor_every`): roles from temper's parameter names; the
groups' gradient norms combine to the logged global norm and equal a by-hand backward; update/weight ratios equal
a by-hand step with SGD and AdamW; a skipped step has none; the report's panels and summary rows.

Distributed (2 gloo ranks, `temper pretrain` on the GPT-like debug model with an untied head, 4 sequences a step
as one process): DDP, FSDP2 (dp_shard=2) and tensor parallel (tp=2) log the per-group norms and ratios of one
process, and DDP a communication share in (0, 1). Tolerances as the layout tests': reductions sum in another
order, so norms and ratios match to 1e-5 relative.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from temper.model.config import PRESETS
from temper.model.lora import ATTENTION_TARGETS, apply_lora
from temper.model.transformer import Transformer
from temper.train.log import RunLogger, write_report
from temper.train.losses import Batch, LMLoss
from temper.train.monitor import ROLES, Monitor, param_role, role_groups
from temper.train.optim import OptimConfig, build_optimizer
from temper.train.run import LogSection
from temper.train.step import train_step
from tests.recipes import test_pretrain
from tests.recipes.test_pretrain import metrics, ranks_train, train

char_data = test_pretrain.char_data


def tiny(**changes) -> Transformer:
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["debug"], dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seq_len=16, **changes)
    model = Transformer(cfg)
    model.init_weights()
    return model


def batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
            for _ in range(n)]


def by_role(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norm per role of `values` (parameter name -> tensor), by hand."""
    sums: dict[str, float] = {}
    for name, t in values.items():
        role = param_role(name)
        sums[role] = sums.get(role, 0.0) + float(t.double().pow(2).sum())
    return {role: math.sqrt(s) for role, s in sums.items()}


def test_roles_of_temper_parameter_names():
    model = tiny(tie_embeddings=False)
    roles = {name: param_role(name) for name, _ in model.named_parameters()}
    assert roles["tok_emb.weight"] == "embedding" and roles["head.weight"] == "head"
    assert roles["layers.0.attn.q_proj.weight"] == roles["layers.1.attn.o_proj.weight"] == "attention"
    assert roles["layers.0.mlp.up_proj.weight"] == "mlp" and roles["norm.weight"] == "norm"
    assert roles["layers.1.attn_norm.weight"] == roles["layers.1.mlp_norm.weight"] == "norm"
    assert set(roles.values()) <= set(ROLES) and "other" not in roles.values()
    # wrappers' prefixes (DDP, activation checkpointing, pipeline stages) do not change a role
    assert param_role("module.layers.0._checkpoint_wrapped_module.mlp.down_proj.weight") == "mlp"
    assert param_role("stages.0.tok_emb.weight") == "embedding"
    assert param_role("layers.0.attn.prefix.mlp.0.weight") == "prefix"
    assert param_role("value.score.weight") == "head"  # PPO's value head
    # the norms of Qwen3, Gemma 3 and OLMo 2 (on queries and keys, on the sublayers' outputs); a mixture's router
    assert {param_role(f"layers.0.{n}.weight") for n in ("attn.q_norm", "attn.k_norm", "attn_out_norm",
                                                           "mlp_out_norm")} == {"norm"}
    assert param_role("layers.0.mlp.router.weight") == param_role("layers.0.mlp.experts.3.up_proj.weight") == "mlp"
    apply_lora(model, rank=2, alpha=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    groups = role_groups(model, optimizer)
    assert [r for r in ROLES if groups[r]] == ["lora"]  # only what trains; the frozen base is left out
    assert len(groups["lora"]) == 2 * len(ATTENTION_TARGETS) * 2  # a and b of each target, 2 layers


def test_group_gradient_norms_combine_to_the_global_norm_and_equal_a_backward_by_hand():
    """Two accumulated micro-batches, clipping on (the norms are measured before it)."""
    model = tiny(tie_embeddings=False)
    reference = copy.deepcopy(model)
    data = batches(2)
    loss_fn = LMLoss()
    count = sum(int(loss_fn.count(Batch.of(mb))) for mb in data)
    for mb in data:
        (loss_fn(reference, Batch.of(mb)).loss_sum / count).backward()
    expected = by_role(reference, {n: p.grad for n, p in reference.named_parameters()})

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_step(model, optimizer, data, step=0, clip_norm=0.01, monitor=Monitor())
    got = {k.split("/")[1]: v for k, v in result.monitored.items() if k.startswith("grad_norm/")}
    assert set(got) == set(expected) == {"embedding", "attention", "mlp", "norm", "head"}
    for role in got:
        assert got[role] == pytest.approx(expected[role], rel=1e-5), role
    assert math.sqrt(sum(v * v for v in got.values())) == pytest.approx(result.grad_norm, rel=1e-5)
    assert result.grad_norm > 0.01  # clipping acted, after the norms were taken


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_update_ratio_equals_a_step_by_hand(kind):
    model = tiny()
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    else:  # temper's two groups: matrices decay, the rest does not
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, fused=False), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(model, optimizer, batches(1), step=0, clip_norm=1.0, monitor=Monitor())
    after = dict(model.named_parameters())
    updates = by_role(model, {n: after[n].detach() - before[n] for n in before})
    weights = by_role(model, before)
    got = {k.split("/")[1]: v for k, v in result.monitored.items() if k.startswith("update_ratio/")}
    assert set(got) == set(weights)
    for role in got:
        assert got[role] == pytest.approx(updates[role] / weights[role], rel=1e-5), role
        assert got[role] > 0
    lrs = {k: v for k, v in result.monitored.items() if k.startswith("lr/")}
    assert lrs == ({"lr/no_decay": 0.5} if kind == "sgd" else {"lr/decay": 1e-2, "lr/no_decay": 1e-2})


def test_a_skipped_step_has_gradient_norms_but_no_update_ratio():
    model = tiny()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = train_step(model, optimizer, batches(1), step=0, on_nonfinite="skip", monitor=Monitor())
    assert result.skipped
    assert "grad_norm/mlp" in result.monitored
    assert not [k for k in result.monitored if k.startswith("update_ratio/")]


def test_unmonitored_step_measures_nothing():
    model = tiny()
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), batches(1), step=0)
    assert result.monitored == {}


def test_monitor_every_must_be_a_multiple_of_log_every():
    LogSection(every=5, monitor_every=10)
    with pytest.raises(ValueError, match="multiple"):
        LogSection(every=5, monitor_every=7)


def test_report_draws_the_groups_and_lists_counts_and_comm_share(tmp_path):
    with RunLogger(tmp_path, total_steps=4, progress=False) as log:
        for step in range(1, 5):
            groups = {f"grad_norm/{r}": 0.1 * step for r in ("attention", "mlp")} if step % 2 == 0 else {}
            ratios = {f"update_ratio/{r}": 1e-3 * step for r in ("attention", "mlp")} if step % 2 == 0 else {}
            counts = {"params_total": 1000, "params_trainable": 250} if step == 1 else {}
            share = {"comm_share": 0.25 * step / 2} if step % 2 == 0 else {}
            log.log(step, {"loss": 3.0 / step, "lr": 1e-3, "grad_norm": 1.0, **groups, **ratios, **counts, **share})
    text = write_report(tmp_path).read_text()
    assert "| parameters | 1,000 (250 trainable, 25.00%) |" in text
    assert "all-reduce share of step time (mean, monitored steps) | 37.5% |" in text
    assert "[grad_norm_groups.png](grad_norm_groups.png)" in text and "[update_ratio.png](update_ratio.png)" in text
    assert (tmp_path / "grad_norm_groups.png").stat().st_size > 0 and (tmp_path / "update_ratio.png").is_file()


# ---- distributed: the numbers of one process ---------------------------------------------------------------

MODEL = ["--model.tie_embeddings=false", "--model.vocab_size=64", "--train.steps=4", "--eval.every=0",
         "--checkpoint.every=0", "--log.monitor_every=2", "--log.plots=true"]
"""After TINY: an untied head (a head group), the char vocabulary padded to split over 2 tensor-parallel ranks; the
report's plots, by group."""

LAYOUTS = {"ddp": [], "fsdp2": ["--train.parallel.dp_shard=2"],
           "tp": ["--train.parallel.tp=2", "--train.parallel.sequence_parallel=false"],
           "pp": ["--train.parallel.pp=2", "--train.parallel.pp_schedule=1F1B"]}
"""name: flags on 2 ranks; DDP and FSDP2 with micro-batch 2, tensor and pipeline parallel with 4 (every rank, or
stage, the whole batch)."""


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("monitor")
    torch.set_num_threads(1)
    assert train(char_data, root, "one", *MODEL, "--train.micro_batch_size=4") == 0
    for name, flags in LAYOUTS.items():
        micro = 4 if name in ("tp", "pp") else 2
        ranks_train(char_data, root, name, 2, *MODEL, f"--train.micro_batch_size={micro}", *flags)
    return root


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_monitors_like_one_process(runs, layout):
    one, got = metrics(runs / "one"), metrics(runs / layout)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (1, 3):  # unmonitored
        assert not [k for k in got[step] if "/" in k] and "comm_share" not in got[step]
    for step in (2, 4):
        keys = [k for k in one[step] if k.startswith(("grad_norm/", "update_ratio/", "lr/"))]
        assert {k.split("/")[1] for k in keys if k.startswith("grad_norm/")} == {
            "embedding", "attention", "mlp", "norm", "head"}
        assert {k for k in got[step] if "/" in k} == set(keys)
        for k in keys:
            torch.testing.assert_close(got[step][k], one[step][k], rtol=1e-5, atol=0,
                                       msg=lambda m, s=step, k=k: f"step {s} {k}: {m}")
        grads = [one[step][k] for k in keys if k.startswith("grad_norm/")]
        assert math.sqrt(sum(g * g for g in grads)) == pytest.approx(one[step]["grad_norm"], rel=1e-5)
        if layout == "ddp":
            assert 0 < got[step]["comm_share"] < 1
        else:
            assert "comm_share" not in got[step] and "comm_share" not in one[step]
    # the whole model's counts, not a rank's shard, on the first line
    assert (got[1]["params_total"], got[1]["params_trainable"]) == (one[1]["params_total"], one[1]["params_total"])
    report = (runs / layout / "report.md").read_text()
    assert f"| parameters | {one[1]['params_total']:,} (" in report and "grad_norm_groups.png" in report
    assert ("all-reduce share" in report) == (layout == "ddp")
