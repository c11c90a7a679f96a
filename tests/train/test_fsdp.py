"""FSDP2 and ZeRO layouts of `temper pretrain` against one process, and sharded checkpoints that reshard.

Every layout trains the same global batch (4 sequences per step) as the one-process reference: FSDP2
(ZeRO-3) on 2 and 4 ranks, HSDP (2 replicas x 2 shards), ZeRO-2 with CPU offload, ZeRO-1 under DDP, and
FSDP2 with gradient accumulation (micro-batch 1, no reduce-scatter but on the last micro-batch). Reductions
run in another order than one process's sums, so losses match to 1e-6 relative and weights (after Adam,
which turns 1e-7 into ~1e-6 on near-zero biases) to 1e-5, as for DDP (RELIABILITY row 10).

A 4-rank FSDP2 checkpoint (DCP shards) resumes on 2 FSDP2 ranks, on one process and on 2 DDP ranks, and a
DDP checkpoint (safetensors) on 2 FSDP2 ranks: each continues with the reference's losses (row 13).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.recipes import test_pretrain
from tests.recipes.test_pretrain import final_weights, metrics, ranks_train, train

char_data = test_pretrain.char_data

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]  # the fixture runs 7 jobs

STEPS = ["--train.steps=4", "--eval.every=2"]
"""4 steps, a checkpoint every 2 (TINY), validation at steps 2 and 4: under a sharded layout too."""

LAYOUTS = {
    "fsdp2": (2, 2, ["--train.parallel.dp_shard=2"]),
    "fsdp4": (4, 1, ["--train.parallel.dp_shard=4"]),
    "hsdp": (4, 1, ["--train.parallel.dp_shard=2", "--train.parallel.dp_replicate=2"]),
    "zero2_offload": (2, 2, ["--train.parallel.dp_shard=2", "--train.parallel.reshard_after_forward=false",
                             "--train.parallel.offload=true"]),
    "zero1": (2, 2, ["--train.parallel.zero1=true"]),
    "fsdp2_accum": (2, 1, ["--train.parallel.dp_shard=2", "--train.global_batch_tokens=128"]),
    "fsdp2_async": (2, 2, ["--train.parallel.dp_shard=2", "--checkpoint.async_save=true"]),
}
"""name: (ranks, micro-batch, flags); ranks x micro-batch (x accumulation) = 4 sequences of 32 tokens."""


def on_ranks(root: Path, data: Path, name: str, ranks: int, micro: int, *extra: str) -> str:
    """`temper pretrain` (STEPS, micro-batch `micro`) on `ranks` forked ranks; returns their output."""
    return ranks_train(data, root, name, ranks, *STEPS, f"--train.micro_batch_size={micro}", *extra)


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> Path:
    """The one-process reference (micro-batch 4) and each layout of LAYOUTS, in one directory."""
    root = tmp_path_factory.mktemp("fsdp")
    torch.set_num_threads(1)
    assert train(char_data, root, "ref", *STEPS, "--train.micro_batch_size=4") == 0
    for name, (ranks, micro, flags) in LAYOUTS.items():
        on_ranks(root, char_data, name, ranks, micro, *flags)
    return root


def assert_same_training(ref: Path, got: Path, steps=range(1, 5), val: bool = True) -> None:
    """val: also compare validation losses (their batches are micro-batch x ranks sequences: the same only when
    the layout's micro-batch x ranks is the reference's)."""
    a, b = metrics(ref), metrics(got)
    assert sorted(b) == list(steps)
    torch.testing.assert_close([b[s]["loss"] for s in steps], [a[s]["loss"] for s in steps], rtol=1e-6, atol=1e-7)
    va, vb = metrics(ref, "val"), metrics(got, "val")
    assert sorted(vb) == [s for s in (2, 4) if s in steps]
    if val:
        torch.testing.assert_close([vb[s]["val_loss"] for s in vb], [va[s]["val_loss"] for s in vb],
                                   rtol=1e-6, atol=1e-7)
    wa, wb = final_weights(ref), final_weights(got)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)


def test_a_mixture_of_experts_trains_like_one_process(char_data, tmp_path):
    """GPT-OSS's layout (4 experts with clamped SwiGLU, 2 per token, biases everywhere, a sink per head) on 2 FSDP2
    ranks and on 2 DDP ranks: every expert runs on every rank, on the rows routed to it or on none, so each rank
    reduces the same gradients (DDP would stop at a parameter without one), and the losses and weights are one
    process's; final/ is a GptOssForCausalLM."""
    experts = ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.pos=rope", "--model.bias=true",
               "--model.ffn_dim=48", "--model.n_experts=4", "--model.attn_sinks=true", "--model.swiglu_limit=7.0"]
    assert train(char_data, tmp_path, "ref", *STEPS, "--train.micro_batch_size=4", *experts) == 0
    for name, flags in (("fsdp2", ["--train.parallel.dp_shard=2"]), ("ddp", [])):
        on_ranks(tmp_path, char_data, name, 2, 2, *flags, *experts)
        assert_same_training(tmp_path / "ref", tmp_path / name)
    exported = json.loads((tmp_path / "fsdp2" / "final" / "config.json").read_text())
    assert exported["num_local_experts"] == 4 and exported["architectures"] == ["GptOssForCausalLM"]


def test_choice_biases_move_alike_on_every_rank(char_data, tmp_path):
    """DeepSeek-V3's layout (latent attention; sigmoid scores, a choice bias, 2 groups of 4 experts, scaled weights, a
    shared expert, a dense first layer) balanced its way (train.expert_bias_rate) on 2 FSDP2 ranks: the loads are
    summed over the ranks before the biases move, so losses, the logged MaxVio, weights and biases are one
    process's; final/ is a DeepseekV3ForCausalLM whose biases moved."""
    deepseek = ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.pos=rope", "--model.bias=false",
                "--model.head_size=24", "--model.rope_dim=8", "--model.kv_lora_rank=16", "--model.q_lora_rank=24",
                "--model.v_head_size=12", "--model.ffn_dim=48", "--model.n_experts=8", "--model.router_scores=sigmoid",
                "--model.expert_choice_bias=true", "--model.expert_groups=2", "--model.routed_scaling=2.5",
                "--model.shared_expert_ffn_dim=48", "--model.dense_layers=1", "--train.expert_bias_rate=0.01"]
    assert train(char_data, tmp_path, "ref", *STEPS, "--train.micro_batch_size=4", *deepseek) == 0
    on_ranks(tmp_path, char_data, "fsdp2", 2, 2, "--train.parallel.dp_shard=2", *deepseek)
    assert_same_training(tmp_path / "ref", tmp_path / "fsdp2")
    a, b = metrics(tmp_path / "ref"), metrics(tmp_path / "fsdp2")
    assert [b[s]["expert_maxvio"] for s in range(1, 5)] == [a[s]["expert_maxvio"] for s in range(1, 5)]
    biases = {k: v for k, v in final_weights(tmp_path / "fsdp2").items() if k.endswith("e_score_correction_bias")}
    assert len(biases) == 1 and all(v.abs().max() > 0 for v in biases.values())  # one MoE layer; its biases moved
    exported = json.loads((tmp_path / "fsdp2" / "final" / "config.json").read_text())
    assert exported["architectures"] == ["DeepseekV3ForCausalLM"] and exported["first_k_dense_replace"] == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(runs, layout):
    ranks, micro, _ = LAYOUTS[layout]
    assert_same_training(runs / "ref", runs / layout, val=ranks * micro == 4)


def test_sharded_checkpoint_is_dcp_shards_with_a_verified_manifest(runs):
    step = runs / "fsdp4" / "checkpoints" / "step-0000002"
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["world_size"] == 4
    shards = sorted(n for n in manifest["files"] if n.startswith("dcp/"))
    assert shards == ["dcp/.metadata"] + [f"dcp/__{r}_0.distcp" for r in range(4)]
    assert "model.safetensors" not in manifest["files"]  # no rank ever held the whole model to write it
    ddp_like = runs / "zero1" / "checkpoints" / "step-0000002"  # ZeRO-1: the states consolidated on rank 0
    assert (ddp_like / "model.safetensors").is_file() and (ddp_like / "optim.pt").is_file()


@pytest.mark.parametrize("target", ["fsdp2", "one_process", "ddp"])
def test_four_rank_checkpoint_resumes_in_another_layout(runs, char_data, target):
    """Row 13 for sharded state: the 4-rank FSDP2 step-2 checkpoint, resumed by 2 FSDP2 ranks, one process or
    2 DDP ranks, continues with the reference's steps 3-4 (DCP reads each rank's slices of the saved shards)."""
    name = f"from4_{target}"
    (runs / name / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs / "fsdp4" / "checkpoints" / "step-0000002", runs / name / "checkpoints" / "step-0000002")
    if target == "one_process":
        assert train(char_data, runs, name, *STEPS, "--train.micro_batch_size=4") == 0
    else:
        on_ranks(runs, char_data, name, 2, 2, *(["--train.parallel.dp_shard=2"] if target == "fsdp2" else []))
    assert_same_training(runs / "ref", runs / name, steps=range(3, 5))


def test_replicated_checkpoint_resumes_sharded(runs, char_data):
    """The one-process reference's step-2 checkpoint (model.safetensors + optim.pt) resumed under FSDP2:
    every rank keeps its slices of the weights and of the AdamW states (keyed by position, mapped to names)."""
    name = "from_ref_fsdp2"
    (runs / name / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs / "ref" / "checkpoints" / "step-0000002", runs / name / "checkpoints" / "step-0000002")
    on_ranks(runs, char_data, name, 2, 2, "--train.parallel.dp_shard=2")
    assert_same_training(runs / "ref", runs / name, steps=range(3, 5))


def test_async_checkpoint_holds_the_weights_of_its_step(runs):
    """Row 9: an asynchronous save copies the shards before training goes on, so its step-2 checkpoint holds
    exactly the synchronous run's step-2 weights and AdamW states, though steps 3-4 ran while it was written;
    every checkpoint was committed (none left as .tmp)."""
    from temper import config
    from temper.model.config import ModelConfig
    from temper.model.transformer import Transformer
    from temper.train.checkpoint import load_checkpoint, read_state

    def load(run: str) -> tuple[dict, dict]:
        path = runs / run / "checkpoints" / "step-0000002"
        model = Transformer(config.from_dict(ModelConfig, read_state(path)["config"]["model"]))
        opt = torch.optim.AdamW(model.parameters())
        load_checkpoint(path, model=model, optimizer=opt)
        return model.state_dict(), opt.state_dict()["state"]

    (wa, sa), (wb, sb) = load("fsdp2"), load("fsdp2_async")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert sorted(p.name for p in (runs / "fsdp2_async" / "checkpoints").iterdir()) == [
        "latest", "step-0000002", "step-0000004"]


def test_a_layout_that_does_not_fit_the_world_is_refused(char_data, tmp_path):
    from temper.config import ConfigError

    with pytest.raises(ConfigError, match="world size 1"):
        train(char_data, tmp_path, "bad", *STEPS, "--train.parallel.dp_shard=2")
