"""DeepSpeed as an optional engine (train/deepspeed_engine.py): its config checks, and on 2 real gloo ranks
(DeepSpeed's CPU accelerator) ZeRO-1/2/3 and CPU offload give the losses and weights of one plain process
with temper's `train_step` over the same global batch (padded, unequal lengths, 2 micro-batches per rank);
a NaN on one rank is skipped (or raised) with the parameters untouched. Skipped without deepspeed."""

import datetime
import json
import os
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from temper.config import ConfigError
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.losses import IGNORE_INDEX
from temper.train.step import NonFiniteLoss, train_step

pytest.importorskip("deepspeed")
from temper.train import deepspeed_engine as dse  # noqa: E402  (after the skip: it imports deepspeed lazily)
from tests.ranks import fork_ranks
from tests.recipes import test_pretrain  # noqa: E402

char_data = test_pretrain.char_data

# A small lr: Adam turns the gradients' rounding (ZeRO sums in its own order) into up to lr-sized steps on
# near-zero gradients; at 1e-3 the weights agree to ~2e-6 (ZeRO-3), under the 1e-5 tolerance.
STEPS, LR = 3, 1e-3
# Llama-style, no biases: the key projection's bias has a gradient that is zero in exact arithmetic (softmax
# ignores a shift shared by all keys), which Adam would blow up from float noise into lr-sized steps.
MODELS = {"tied": replace(PRESETS["debug-llama"], n_layers=1, tie_embeddings=True),
          "untied": replace(PRESETS["debug-llama"], n_layers=1, tie_embeddings=False)}


def micro_batch(step: int, i: int, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch i (0..3) of step `step` of the global batch: 2 sequences, padded to unequal lengths."""
    g = torch.Generator().manual_seed(1000 * step + i)
    x = torch.randint(0, 256, (2, seq), generator=g)
    y = torch.randint(0, 256, (2, seq), generator=g)
    y[0, [8, 3, 6, 1][i]:] = IGNORE_INDEX
    y[1, [5, 8, 2, 7][i]:] = IGNORE_INDEX
    return x, y


def rank_batches(step: int, rank: int) -> list:
    return [micro_batch(step, 2 * rank), micro_batch(step, 2 * rank + 1)]  # this rank's 2 micro-batches


def write_config(path, zero: dict, **extra) -> str:
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": zero, **extra}
    path.write_text(json.dumps(cfg))
    return str(path)


def _worker(rank: int, world: int, out_dir: str, ds_path: str, model_key: str, fault: str, policy: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_SIZE=str(world), TEMPER_FAULT=fault)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg-store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = Transformer(MODELS[model_key])
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        cfg = dse.load_config(ds_path, micro_batch_size=2, grad_accum=2, dp_world=world, grad_clip=1.0,
                              precision="fp32")
        engine = dse.initialize(model, opt, cfg)
        results, error = [], None
        for step in range(STEPS):
            try:
                r = dse.deepspeed_step(engine, rank_batches(step, rank), step=step, on_nonfinite=policy)
                results.append((r.loss, r.grad_norm, r.tokens, r.skipped))
            except NonFiniteLoss:
                error = step
                break
        full = dse.full_state_dict(engine)
        if rank == 0:
            torch.save({"results": results, "error": error, "params": full}, f"{out_dir}/out.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # DeepSpeed keeps its groups after destroy_process_group (deepspeed.utils.groups, and ZeRO-3's attributes on
    # the parameters), so their gloo threads would be torn down in interpreter finalization, which can abort the
    # process after its work is done ("terminate called without an active exception", pytorch#179291; seen in
    # CI): a worker that finished leaves without finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_deepspeed(tmp_path, zero: dict, model_key: str = "tied", fault: str = "", policy: str = "fail") -> dict:
    ds_path = write_config(tmp_path / "ds.json", zero)
    fork_ranks(_worker, (2, str(tmp_path), ds_path, model_key, fault, policy), 2)
    return torch.load(tmp_path / "out.pt", weights_only=True)


def reference(model_key: str, steps: int = STEPS) -> tuple[list, dict]:
    """One process, temper's own step, the 4 micro-batches of the global batch: (results, state dict)."""
    torch.manual_seed(0)
    model = Transformer(MODELS[model_key])
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    results = []
    for step in range(steps):
        r = train_step(model, opt, rank_batches(step, 0) + rank_batches(step, 1), step=step, clip_norm=1.0)
        results.append((r.loss, r.grad_norm, r.tokens, r.skipped))
    return results, model.state_dict()


def assert_same(got: dict, ref: tuple[list, dict]) -> None:
    ref_results, ref_params = ref
    assert got["error"] is None
    assert [r[2] for r in got["results"]] == [r[2] for r in ref_results]  # global valid-token counts
    torch.testing.assert_close([r[0] for r in got["results"]], [r[0] for r in ref_results], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([r[1] for r in got["results"]], [r[1] for r in ref_results], rtol=1e-4, atol=1e-6)
    assert got["params"].keys() == ref_params.keys()
    for k, v in ref_params.items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-5, msg=k)


# ---- config checks (no processes) ---------------------------------------------------------------------


def test_load_config_fills_auto_and_absent_keys(tmp_path):
    path = write_config(tmp_path / "ds.json", {"stage": 2, "offload_optimizer": {"device": "cpu"}})
    cfg = dse.load_config(path, micro_batch_size=4, grad_accum=3, dp_world=2, grad_clip=0.5, precision="auto")
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
            cfg["gradient_clipping"]) == (4, 3, 24, 0.5)
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}


@pytest.mark.parametrize(("cfg", "words"), [
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu=16"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 5.0}, "train.grad_clip"),
    ({"zero_optimization": {"stage": 0}}, "stage=0"),
    ({}, "stage=0"),
    ({"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW"}}, "'optimizer'"),
    ({"zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
    ([1, 2], "JSON object"),
])
def test_load_config_rejects_what_contradicts_temper(tmp_path, cfg, words):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="train.deepspeed") as e:
        dse.load_config(path, micro_batch_size=2, grad_accum=1, dp_world=2, grad_clip=1.0, precision="fp32")
    assert words in str(e.value)


def test_load_config_errors_name_the_file_and_fp16(tmp_path):
    with pytest.raises(ConfigError, match="missing.json"):
        dse.load_config(tmp_path / "missing.json", micro_batch_size=2, grad_accum=1, dp_world=1, grad_clip=1.0,
                        precision="fp32")
    path = write_config(tmp_path / "ds.json", {"stage": 1})
    with pytest.raises(ConfigError, match="fp16"):
        dse.load_config(path, micro_batch_size=2, grad_accum=1, dp_world=1, grad_clip=1.0, precision="fp16")


# ---- 2 gloo ranks == one process ------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("zero", "model_key"), [
    ({"stage": 1}, "untied"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "untied"),
    ({"stage": 3}, "tied"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, "untied"),
], ids=["zero1", "zero2-offload", "zero3-tied", "zero3-offload-untied"])
def test_zero_stages_equal_one_process(tmp_path, zero, model_key):
    assert_same(run_deepspeed(tmp_path, zero, model_key), reference(model_key))


@pytest.mark.distributed
@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_on_both(tmp_path):
    got = run_deepspeed(tmp_path, {"stage": 3}, fault="nan_loss:step=1:rank=1", policy="skip")
    assert [r[3] for r in got["results"]] == [False, True, False]
    # The skipped step changed nothing, Adam's step count included: the weights are those of one process
    # that trained on steps 0 and 2 only.
    torch.manual_seed(0)
    model = Transformer(MODELS["tied"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in (0, 2):
        train_step(model, opt, rank_batches(step, 0) + rank_batches(step, 1), step=step, clip_norm=1.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.distributed
@pytest.mark.slow
def test_nan_fails_before_the_update(tmp_path):
    got = run_deepspeed(tmp_path, {"stage": 2}, fault="nan_loss:step=1:rank=1", policy="fail")
    assert got["error"] == 1
    _, ref_params = reference("tied", steps=1)
    for k, v in ref_params.items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.distributed
@pytest.mark.slow
def test_pretrain_under_deepspeed_zero3_trains_like_one_process(char_data, tmp_path):
    """`temper pretrain --train.deepspeed=ds.json` (ZeRO-3, 2 ranks): the steps, the validation (through the
    engine's forward) and final/ (gathered on rank 0) are one process's; resuming is refused, by name."""
    from tests.recipes.test_pretrain import final_weights, metrics, train
    from tests.train.test_fsdp import STEPS, on_ranks

    data, root = char_data, tmp_path
    (root / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert train(data, root, "ref", *STEPS, "--train.micro_batch_size=4") == 0
    on_ranks(root, data, "zero3", 2, 2, f"--train.deepspeed={root / 'ds.json'}")
    a, b = metrics(root / "ref"), metrics(root / "zero3")
    torch.testing.assert_close([b[s]["loss"] for s in a], [a[s]["loss"] for s in a], rtol=1e-6, atol=1e-7)
    va, vb = metrics(root / "ref", "val"), metrics(root / "zero3", "val")
    torch.testing.assert_close([vb[s]["val_loss"] for s in va], [va[s]["val_loss"] for s in va], rtol=1e-6, atol=1e-7)
    wa, wb = final_weights(root / "ref"), final_weights(root / "zero3")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="does not resume"):
        on_ranks(root, data, "zero3", 2, 2, f"--train.deepspeed={root / 'ds.json'}", "--train.steps=6")
