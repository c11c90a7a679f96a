"""Parameter groups and LR schedules (row 5: LR continuity is by construction a pure function)."""

import math

import pytest
import torch
from torch import nn

from temper.config import ConfigError
from temper.train.optim import OptimConfig, ScheduleConfig, build_optimizer, lr_at, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_decay_only_on_matrices_and_tied_head_listed_once():
    m = Tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m.lin.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m.emb.weight), id(m.lin.bias), id(m.norm.weight), id(m.norm.bias)}
    decay, _ = param_groups(m, 0.1, decay_embeddings=True)
    assert {id(p) for p in decay["params"]} == {id(m.lin.weight), id(m.emb.weight)}
    opt = build_optimizer(m, OptimConfig(lr=1e-3, weight_decay=0.1), "cpu")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedule_shapes(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_at(s, 100, 1.0, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(0.1 - 1e-9 <= x <= 1.0 + 1e-9 for x in lrs)
    if kind == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] == pytest.approx(0.1)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never increases after warmup
    if kind == "wsd":
        assert lrs[79] == 1.0 and lrs[81] < 1.0
    if kind == "cosine":
        assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 89)))


def test_lr_continuity_is_a_pure_function_of_the_step():
    """Row 5: the LR after a resume at step k equals the uninterrupted one (no scheduler state)."""
    cfg = ScheduleConfig(kind="cosine", warmup_steps=5)
    uninterrupted = [lr_at(s, 50, 3e-4, cfg) for s in range(50)]
    resumed = [lr_at(s, 50, 3e-4, cfg) for s in range(20)] + [lr_at(s, 50, 3e-4, cfg) for s in range(20, 50)]
    assert uninterrupted == resumed


def test_adamw_fused_on_cpu_matches_the_per_tensor_loop():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(a, OptimConfig(weight_decay=0.1), "cpu")
    loop = build_optimizer(b, OptimConfig(weight_decay=0.1, fused=False), "cpu")
    assert fused.defaults["fused"] and not loop.defaults.get("fused")
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, opt in ((a, fused), (b, loop)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_loraplus_steps_as_peft_create_loraplus_optimizer(tmp_path, dora):
    """optim.loraplus_lr_ratio: AdamW steps move temper's adapters as PEFT's LoRA+ optimizer moves the same adapters
    on transformers' model (B factors and DoRA's magnitudes 16 times faster); plain LoRA's steps land elsewhere."""
    import copy

    import peft
    from peft.optimizers import create_loraplus_optimizer

    from temper.model.hf.peft import load_peft
    from tests.model.test_hf_peft import _hf, _model, _randomize_adapters, _x

    model = _model("llama")
    theirs = peft.get_peft_model(_hf(model, tmp_path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora))
    _randomize_adapters((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "adapter")
    load_peft(model, model.cfg, tmp_path / "adapter")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    plain = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=16.0)
    ours = build_optimizer(model, cfg, "cpu")
    names = sorted(g.get("name", "") for g in ours.param_groups)
    assert names == (["", "lora_b", "vectors"] if dora else ["", "lora_b"])
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, betas=(0.9, 0.95),
                                    eps=1e-8)
    slow = build_optimizer(plain, OptimConfig(lr=1e-3, weight_decay=0.0), "cpu")
    x = _x(model)
    for _ in range(3):
        for forward, optimizer in ((model, ours), (lambda t: theirs(t).logits, ref), (plain, slow)):
            optimizer.zero_grad()
            forward(x).float().logsumexp(-1).mean().backward()
            optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x).logits, rtol=0, atol=1e-4)
        assert (plain(x) - model(x)).abs().max() > 1e-2


def test_loraplus_without_adapters_is_refused():
    with pytest.raises(ConfigError, match="optim.loraplus_lr_ratio: the model has no LoRA adapters"):
        build_optimizer(Tiny(), OptimConfig(loraplus_lr_ratio=16.0), "cpu")


def test_muons_lr_without_muon_is_refused():
    with pytest.raises(ValueError, match="muon_lr=0.02 is Muon's learning rate: set name=muon"):
        OptimConfig(muon_lr=0.02)
