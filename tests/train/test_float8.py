"""float8 training (`train.float8`, `train/float8.py`): which layers convert, what stays the plain model's, and
the numbers against the unconverted model.

torch 2.13's `torch._scaled_mm` runs on the CPU, so the conversion is exercised here for real (float8 casts and
matrix products), with the device check skipped through `apply_float8(check_device=False)`. The recipe path
itself refuses the CPU; on a GPU of compute capability >= 8.9 the `gpu`-marked tests train through it.

Tolerances: float8 e4m3 keeps 3 mantissa bits (relative rounding up to 2^-4) and e5m2 gradients 2 bits (2^-3), so
logits, summed over many products, agree to a few percent and gradients to about 10% (rms).
"""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from temper.config import ConfigError
from temper.model.config import PRESETS
from temper.model.lora import apply_lora
from temper.model.transformer import Transformer
from temper.train.float8 import apply_float8, float8_refusal, remove_float8
from temper.train.optim import OptimConfig, build_optimizer
from temper.train.parallel import (
    DistInfo,
    ParallelConfig,
    apply_fsdp,
    build_mesh,
    dp_mesh,
    full_state_dict,
    shutdown_distributed,
)
from temper.train.step import train_step
from tests.ranks import fork_ranks
from tests.recipes.test_pretrain import char_data, metrics, train  # noqa: F401  (char_data: a pytest fixture)

torchao_float8 = pytest.importorskip("torchao.float8")
Float8Linear = torchao_float8.float8_linear.Float8Linear

CPU = torch.device("cpu")


def tiny(**kw) -> Transformer:
    """debug-llama with an untied head (a 256 x 64 nn.Linear, shaped for float8, that must still be left alone)."""
    torch.manual_seed(0)
    return Transformer(replace(PRESETS["debug-llama"], tie_embeddings=False, **kw))


def text_batches(shared_data, n: int, rows: int = 4, seq: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows of tinyshakespeare as bytes (vocab 256)."""
    data = torch.tensor(list((shared_data / "tinyshakespeare" / "input.txt").read_bytes()[: n * rows * (seq + 1)]))
    windows = data.view(n, rows, seq + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_only_the_blocks_linear_layers_shaped_for_float8_convert():
    model = tiny(ffn_dim=200)  # the MLP's 200 is not a multiple of 16: gate/up/down stay plain
    before = {n: p for n, p in model.state_dict(keep_vars=True).items()}
    converted = apply_float8(model, CPU, check_device=False)
    want = [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert converted == want
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert all(kinds[n] is Float8Linear for n in want)
    assert all(kinds[f"layers.{i}.mlp.{p}_proj"] is nn.Linear for i in range(2) for p in ("gate", "up", "down"))
    assert kinds["head"] is nn.Linear and kinds["tok_emb"] is nn.Embedding
    # The same Parameters under the same names, still plain float32 tensors: checkpoints are the plain model's.
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[n] is before[n] and type(after[n]) is nn.Parameter and after[n].dtype == torch.float32
               for n in before)


def test_forward_and_backward_agree_with_the_unconverted_model_within_float8_rounding(shared_data):
    ref = tiny()
    model = copy.deepcopy(ref)
    assert len(apply_float8(model, CPU, check_device=False)) == 14  # 7 per block, all shaped for float8
    (x, y), = text_batches(shared_data, 1)
    losses = []
    for m in (ref, model):
        logits = m(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        losses.append(loss)
    assert rel(model(x), ref(x)) < 0.05
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-2)
    for (name, p8), (_, p) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert rel(p8.grad, p.grad) < 0.25, name
        assert F.cosine_similarity(p8.grad.flatten(), p.grad.flatten(), dim=0) > 0.97, name


def test_float8_training_follows_the_plain_loss_curve(shared_data):
    batches = text_batches(shared_data, 8)
    curves = []
    for float8 in (False, True):
        model = tiny()
        if float8:
            apply_float8(model, CPU, check_device=False)
        opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cpu")
        curves.append([train_step(model, opt, [b], step=i).loss for i, b in enumerate(batches)])
    plain, f8 = curves
    assert f8[-1] < f8[0] - 0.5  # it learns (byte-level text from a uniform start: ln 256 = 5.5)
    assert f8 == pytest.approx(plain, rel=0.03)


def test_checkpoint_and_export_are_the_plain_models(shared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from temper.model.hf.checkpoint import save_hf

    model = tiny()
    apply_float8(model, CPU, check_device=False)
    opt = build_optimizer(model, OptimConfig(lr=3e-3), "cpu")
    for i, b in enumerate(text_batches(shared_data, 2)):
        train_step(model, opt, [b], step=i)
    # A checkpoint's weights: plain tensors that load into the plain and into the converted model alike.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    weights = load_file(tmp_path / "w.safetensors")
    plain, again = tiny(), tiny()
    plain.load_state_dict(weights)
    apply_float8(again, CPU, check_device=False)
    again.load_state_dict(weights)
    x, _ = text_batches(shared_data, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        want = plain(x)
    # Export: the plain modules back, the same Parameters, the plain model's numbers exactly.
    remove_float8(model)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    save_hf(model, model.cfg, tmp_path / "final")
    assert json.loads((tmp_path / "final" / "config.json").read_text())["hidden_size"] == 64
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, want, rtol=1e-4, atol=1e-4)


def test_lora_and_the_cpu_are_refused_naming_the_key():
    model = tiny()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="train.float8.*LoRA"):
        apply_float8(model, CPU, check_device=False)
    assert "CUDA" in float8_refusal(CPU)
    with pytest.raises(ConfigError, match="train.float8.*compute capability"):
        apply_float8(tiny(), CPU)


def test_the_pretrain_recipe_refuses_float8_on_the_cpu(char_data, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="train.float8.*the device is cpu"):
        train(char_data, tmp_path, "f8", "--train.float8=true")


def _fsdp_worker(rank: int, out_dir: str, batches: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg-store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        layout = ParallelConfig(dp_shard=2, dp_replicate=1)
        d = DistInfo(rank, rank, 2, CPU, build_mesh(CPU, 2, layout), layout)
        model = tiny()
        apply_float8(model, CPU, check_device=False)  # parallelize's order: float8, then FSDP2 around it
        apply_fsdp(model, dp_mesh(d))
        opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cpu")
        half = slice(rank * 2, rank * 2 + 2)  # this rank's half of each global batch of 4
        losses = [train_step(model, opt, [(x[half], y[half])], step=i, dp_group=d.dp_group).loss
                  for i, (x, y) in enumerate(batches)]
        weights = full_state_dict(model)  # every rank sends its shards; rank 0 gets the whole
        if rank == 0:
            torch.save({"losses": losses, "weights": weights}, f"{out_dir}/out.pt")
        del model, opt
        dist.barrier()
    finally:
        shutdown_distributed()  # as a recipe leaves: DTensor's caches let go of the groups


@pytest.mark.distributed
def test_fsdp2_around_float8_layers_trains_like_one_process(shared_data, tmp_path):
    """2 FSDP2 ranks against one process, both float8, on the same global batches. Each rank scales its own
    half of the activations (tensorwise amax over the local batch), so the losses agree to float8 rounding,
    not to the last bit."""
    batches = text_batches(shared_data, 4)
    fork_ranks(_fsdp_worker, (str(tmp_path), batches), 2)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    model = tiny()
    apply_float8(model, CPU, check_device=False)
    opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cpu")
    want = [train_step(model, opt, [b], step=i).loss for i, b in enumerate(batches)]
    assert got["losses"] == pytest.approx(want, rel=1e-2)
    assert list(got["weights"]) == list(tiny().state_dict())
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in got["weights"].values())


needs_float8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or float8_refusal(torch.device("cuda")) is not None,
    reason="needs a CUDA GPU of compute capability >= 8.9")


@pytest.mark.gpu
@needs_float8_gpu
def test_bf16_float8_training_on_the_gpu_follows_bf16(shared_data):
    device = torch.device("cuda")
    batches = [(x.to(device), y.to(device)) for x, y in text_batches(shared_data, 10, rows=8, seq=64)]
    curves = []
    for float8 in (False, True):
        model = tiny().to(device)
        if float8:
            assert len(apply_float8(model, device)) == 14
        opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cuda")
        curves.append([train_step(model, opt, [b], step=i, amp_dtype=torch.bfloat16).loss
                       for i, b in enumerate(batches)])
    bf16, f8 = curves
    assert f8[-1] < f8[0] - 0.5
    assert f8 == pytest.approx(bf16, rel=0.05)


@pytest.mark.gpu
@needs_float8_gpu
def test_pretrain_with_float8_resumes_and_exports_on_the_gpu(char_data, tmp_path):  # noqa: F811
    """Through the recipe (bf16 + float8): a run stopped at step 5 resumes and ends like the uninterrupted run
    (to float8 rounding: GPU kernels may reduce in another order), and final/ is a plain float32 HF checkpoint."""
    transformers = pytest.importorskip("transformers")
    gpu = ["--run.device=cuda", "--train.float8=true"]
    assert train(char_data, tmp_path, "ref", *gpu) == 0
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "resumed", *gpu, env="crash:step=5")
    assert train(char_data, tmp_path, "resumed", *gpu) == 0
    ref, got = metrics(tmp_path / "ref"), metrics(tmp_path / "resumed")
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert [got[s]["loss"] for s in range(5, 9)] == pytest.approx([ref[s]["loss"] for s in range(5, 9)], rel=1e-2)
    weights = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "final")
    assert sum(p.numel() for p in hf.parameters()) > 0
