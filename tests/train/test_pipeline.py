"""Pipeline parallelism (`train.pipeline`): stages that compose to the whole model, and `temper pretrain` under
pipeline layouts against one process.

In one process: the stages of a split model, run one after another, give the whole model's logits bit for bit,
under the whole model's parameter names; a micro-batch splits by rows; layouts a pipeline cannot run are refused.

On gloo ranks: pp=2 with 1F1B (which also runs benchmark tasks on the gathered model), pp=2 with
Interleaved1F1B (4 stages, each micro-batch split into the default 4 pipeline micro-batches) and pp=2 x dp_shard=2
with Interleaved1F1B on 4 ranks train the one-process reference's global batch (4 sequences of 32 tokens a step).
Every run, the reference too, gets a NaN loss at its second step with on_nonfinite=skip: the stages agree to skip
it (a stage that stepped would end with other weights). Stages sum in another order than one process, so losses
match to 1e-6 relative and weights after Adam to 1e-5, as for FSDP2 (tests/train/test_fsdp.py). The 1F1B run's
step-2 checkpoint (DCP, one file per stage) resumes on one process with that run's losses and final weights, and
its final/ export generates text.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from temper.config import ConfigError
from temper.model.attention import Segments
from temper.model.config import PRESETS, ModelConfig
from temper.model.transformer import Transformer
from temper.train.checkpoint import load_checkpoint, save_checkpoint
from temper.train.losses import Batch
from temper.train.parallel import ParallelConfig, apply_activation_checkpointing
from temper.train.pipeline import StageLayers, check_layout, split, split_batch, stage_blocks, stage_modules
from tests.conftest import SHARED_DATA
from tests.recipes import test_pretrain
from tests.recipes.test_pretrain import final_weights, metrics, ranks_train, train

char_data = test_pretrain.char_data

COMMON = ["--train.steps=4", "--eval.every=2", "--model.n_layers=4", "--model.tie_embeddings=false",
          "--train.on_nonfinite=skip"]
"""4 steps of a 4-block model (a block per stage of Interleaved1F1B), a checkpoint every 2 steps (TINY) and
validation at steps 2 and 4; step 2 (index 1) gets a NaN loss (FAULT) and is skipped."""

FAULT = "nan_loss:step=1"

LAYOUTS = {
    "pp2_1f1b": (2, 4, ["--train.parallel.pp=2", "--train.parallel.pp_schedule=1F1B"]),
    "pp2_interleaved": (2, 4, ["--train.parallel.pp=2", "--train.parallel.pp_schedule=Interleaved1F1B"]),
    "pp2_dp2": (4, 2, ["--train.parallel.pp=2", "--train.parallel.dp_shard=2",
                       "--train.parallel.pp_schedule=Interleaved1F1B", "--train.parallel.pp_microbatches=2"]),
}
"""name: (ranks, micro-batch, flags); micro-batch x data-parallel ranks = the reference's 4 sequences."""


def tiny(n_layers: int = 4, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**vars(PRESETS["debug-llama"]), "n_layers": n_layers, "tie_embeddings": False,
                                      **kw}))


# ---- in one process ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}],
                         ids=["llama", "gpt2"])
def test_stages_compose_to_the_whole_model_bit_for_bit(kw):
    model = tiny(**kw).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    positions = torch.arange(16).repeat(2, 1) + 3
    want = model(tokens, positions=positions)
    names = dict(model.state_dict())
    staged = copy.deepcopy(model)
    split(staged, [0, 1, 2, 3], 4)
    views = stage_modules(staged, [0, 1, 2, 3], 4)
    x = tokens
    for view in views:
        x = view(x, positions=positions)  # hidden states (2, 16, C) between stages, logits out of the last
    assert torch.equal(x, want)
    # Each stage holds its own parts under the whole model's names; together, exactly the whole model's.
    held = [set(v.state_dict()) for v in views]
    assert set().union(*held) == set(names) and sum(map(len, held)) == len(names)
    assert {k.split(".")[0] for k in held[0]} == {"tok_emb", "layers"} | ({"pos_emb"} if kw else set())
    assert "norm.weight" in held[3] and "head.weight" in held[3]
    assert {k for k in held[2] if k.startswith("layers.")} == {k for k in names if k.startswith("layers.2.")}


def test_a_rank_keeps_its_stages_parts_under_their_names():
    """Interleaved placement: rank 1 of 2 holds stages 1 and 3 of 4; activation checkpointing, which replaces
    blocks by position, keeps the names (checkpoint_wrapper's prefix is not part of them)."""
    model = tiny(n_layers=6)
    full = model.state_dict()
    assert stage_blocks(6, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    split(model, [1, 3], 4)
    assert isinstance(model.layers, StageLayers) and model.layers.indices == [2, 3, 5]
    assert model.tok_emb is None and model.pos_emb is None and model.norm is not None
    apply_activation_checkpointing(model, every=1)
    assert model.layers.indices == [2, 3, 5] and len(model.layers) == 3
    sd = model.state_dict()
    assert set(sd) == {k for k in full if k.split(".")[:2] in (["layers", "2"], ["layers", "3"], ["layers", "5"])
                       or k.startswith(("norm.", "head."))}
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    with pytest.raises(IndexError):
        model.layers[3]


def test_a_micro_batch_splits_by_rows():
    b = Batch(torch.arange(12).view(4, 3), torch.arange(12).view(4, 3) + 1,
              {"positions": torch.arange(12).view(4, 3), "segments": Segments(torch.zeros(4, 3, dtype=torch.long))},
              {"weights": torch.arange(4.0)})
    parts = split_batch(b, 2)
    assert [p.inputs.tolist() for p in parts] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    assert torch.equal(parts[1].model_kwargs["positions"], b.model_kwargs["positions"][2:])
    assert parts[1].model_kwargs["segments"].ids.shape == (2, 3) and parts[1].extra["weights"].tolist() == [2.0, 3.0]
    with pytest.raises(ConfigError, match="train.micro_batch_size=4 is not a multiple of the 3 pipeline micro-batches"):
        split_batch(b, 3)
    with pytest.raises(ValueError, match=r"extra\['pair'\] is not one value per row"):
        split_batch(Batch(b.inputs, b.targets, extra={"pair": torch.zeros(3)}), 2)


def test_layouts_a_pipeline_cannot_run_are_refused():
    cfg = tiny().cfg
    with pytest.raises(ConfigError, match=r"model.n_layers=4 cannot fill 6 pipeline stages"):
        check_layout(cfg, ParallelConfig(pp=3, pp_schedule="Interleaved1F1B"), None)
    with pytest.raises(ConfigError, match="model.tie_embeddings=true with train.parallel.pp > 1"):
        check_layout(ModelConfig(**{**vars(cfg), "tie_embeddings": True}), ParallelConfig(pp=2), None)
    with pytest.raises(ConfigError, match="train.precision=fp16 with train.parallel.pp > 1"):
        check_layout(cfg, ParallelConfig(pp=2), torch.float16)
    with pytest.raises(ConfigError, match=r"model.per_layer_input_size / model.kv_shared_layers \(Gemma 4"):
        check_layout(ModelConfig(**{**vars(cfg), "per_layer_input_size": 8}), ParallelConfig(pp=2), None)
    check_layout(cfg, ParallelConfig(pp=2, pp_schedule="Interleaved1F1B"), torch.bfloat16)


def test_a_replicated_checkpoint_does_not_resume_a_stage(tmp_path):
    """Its optimizer states are keyed by position in the whole model's optimizer: a clear error, not a wrong load."""
    model = tiny()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=torch.optim.AdamW(model.parameters()), state={})
    split(model, [1], 2)
    with pytest.raises(ConfigError, match="replicated checkpoint .* cannot resume a pipeline-parallel run"):
        load_checkpoint(path, model=model, optimizer=torch.optim.AdamW(model.parameters()))


# ---- temper pretrain on forked ranks ------------------------------------------------------------------------


def on_ranks(root: Path, data: Path, name: str, ranks: int, micro: int, *extra: str) -> None:
    ranks_train(data, root, name, ranks, *COMMON, f"--train.micro_batch_size={micro}", *extra, fault=FAULT)


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> Path:
    """The one-process reference (micro-batch 4) and each layout of LAYOUTS, in one directory; the reference and
    the 1F1B run also score ARC-Easy at step 4."""
    arc = SHARED_DATA / "arc-easy" / "validation.jsonl"
    if not arc.exists():
        pytest.skip("shared data missing")
    root = tmp_path_factory.mktemp("pipeline")
    torch.set_num_threads(1)
    tasks = [f"--eval.tasks.names=[arc_easy={arc}]",
             "--eval.tasks.every=4", "--eval.tasks.limit=12"]
    assert train(char_data, root, "ref", *COMMON, "--train.micro_batch_size=4", *tasks, env=FAULT) == 0
    for name, (ranks, micro, flags) in LAYOUTS.items():
        on_ranks(root, char_data, name, ranks, micro, *flags, *(tasks if name == "pp2_1f1b" else []))
    return root


def assert_same_training(ref: Path, got: Path, steps=(1, 3, 4), val_steps=(2, 4)) -> None:
    a, b = metrics(ref), metrics(got)
    torch.testing.assert_close([b[s]["loss"] for s in steps], [a[s]["loss"] for s in steps], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close([b[s]["grad_norm"] for s in steps], [a[s]["grad_norm"] for s in steps],
                               rtol=1e-5, atol=1e-6)
    va, vb = metrics(ref, "val"), metrics(got, "val")
    assert sorted(vb) == list(val_steps)
    torch.testing.assert_close([vb[s]["val_loss"] for s in vb], [va[s]["val_loss"] for s in vb], rtol=1e-6, atol=1e-7)


def assert_same_weights(ref: Path, got: Path) -> None:
    wa, wb = final_weights(ref), final_weights(got)
    assert sorted(wb) == sorted(wa)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layout_trains_as_one_process(runs, layout):
    """Losses, gradient norms, validation and the exported final/ of one process; the NaN step skipped by every
    stage alike."""
    ref, got = runs / "ref", runs / layout
    for run in (ref, got):
        m = metrics(run)
        assert sorted(m) == [1, 2, 3, 4] and m[2]["loss"] is None and m[4]["skipped_steps"] == 1  # NaN logs as null
    assert_same_training(ref, got)
    assert_same_weights(ref, got)


@pytest.mark.distributed
@pytest.mark.slow
def test_tasks_run_on_the_gathered_pipeline(runs):
    want, got = metrics(runs / "ref", "tasks"), metrics(runs / "pp2_1f1b", "tasks")
    assert sorted(got) == [4] and {"arc_easy/acc", "arc_easy/ece"} <= got[4].keys()
    keys = sorted(k for k in want[4] if k.startswith("arc_easy/"))
    torch.testing.assert_close([got[4][k] for k in keys], [want[4][k] for k in keys], rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_checkpoint_resumes_on_one_process(runs, char_data, tmp_path, capsys):
    """The 1F1B run's step-2 checkpoint (every stage's parameters and Adam states under their names, one DCP file
    per rank) continues on one process with that run's losses and ends at its weights; its final/ generates."""
    from temper.recipes import generate

    pp = runs / "pp2_1f1b"
    ckpt = pp / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert train(char_data, tmp_path, "resumed", *COMMON, "--train.micro_batch_size=4", f"--run.resume={ckpt}") == 0
    assert sorted(metrics(tmp_path / "resumed")) == [3, 4]
    assert_same_training(pp, tmp_path / "resumed", steps=(3, 4), val_steps=(4,))
    assert_same_weights(pp, tmp_path / "resumed")

    capsys.readouterr()
    assert generate.main([f"--checkpoint={pp / 'final'}", "--prompt=ROMEO:", "--max_new_tokens=8",
                          "--temperature=0", "--device=cpu", "--dtype=float32"]) == 0
    assert len(capsys.readouterr().out) > len("ROMEO:")
