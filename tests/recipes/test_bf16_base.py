"""Every recipe that fine-tunes with adapters runs under bf16 autocast with its frozen base held in bf16
(`train.methods.base_dtype`) and its adapters and heads in float32: dpo and reward (LoRA), grpo with a KL
reference (the adapters switched off), ppo with a shared value head and with a separate value model. sft's
methods are checked in test_sft.py. Outside autocast (rollouts, scoring) the mixed dtypes must meet too."""

import json

import pytest
import torch

from temper.recipes import dpo, grpo, ppo, reward
from temper.train import run as run_module
from temper.train.parallel import HostEmbedding
from tests.recipes import test_dpo, test_grpo, test_ppo, test_reward

# dpo and reward also offload activations, which holds their untied base's frozen token table in host memory
# (`train.parallel.HostEmbedding`; a reward model's is its backbone's).
OFFLOAD = ("--train.activation_checkpointing=1", "--train.activation_offload=true")
CASES = {
    "dpo": lambda hh, ar, tmp, *a: dpo.main(test_dpo.args(hh, tmp, "r", *a, *OFFLOAD, "--eval.every=2")),
    "reward": lambda hh, ar, tmp, *a: reward.main(test_reward.args(hh, tmp, "r", *a, *OFFLOAD, "--method=lora",
                                                                   "--eval.every=2")),
    "grpo": lambda hh, ar, tmp, *a: grpo.main(test_grpo.args(ar, tmp, "r", *a, "--loss.beta=0.1", "--eval.every=2")),
    "ppo": lambda hh, ar, tmp, *a: ppo.main(test_ppo.args(ar, tmp, "r", *a, "--eval.every=2")),
    "ppo-separate-value": lambda hh, ar, tmp, *a: ppo.main(test_ppo.args(ar, tmp, "r", *a, "--value.kind=separate")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_under_bf16_holds_a_bf16_base(case, hh_base, arith, tmp_path, monkeypatch):
    trains: dict[str, torch.dtype] = {}
    frozen: dict[str, torch.dtype] = {}
    real = run_module.Run.wrap

    def wrap(self, model):
        for n, p in model.named_parameters():
            (trains if p.requires_grad else frozen)[n] = p.dtype
        wrapped = real(self, model)
        on_host = [n for n, m in model.named_modules() if isinstance(m, HostEmbedding)]
        assert on_host == (["backbone.tok_emb"] if case == "reward" else ["tok_emb"] if case == "dpo" else []), on_host
        return wrapped

    monkeypatch.setattr(run_module.Run, "wrap", wrap)
    assert CASES[case](hh_base, arith, tmp_path, "--train.precision=bf16", "--train.steps=2") == 0
    assert any("lora_" in n for n in trains) and set(trains.values()) == {torch.float32}, trains
    assert frozen and set(frozen.values()) == {torch.bfloat16}, frozen
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and all(r.get("loss", 0) == r.get("loss", 0) for r in rows)  # no NaN
