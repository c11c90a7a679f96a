"""`temper ppo` end to end on a tiny Llama-layout checkpoint with a (random) reward model: TRL's metrics are
logged, the KL to the reference starts at 0 and the adaptive coefficient moves, a separate value model
trains, exact resume after a crash (the KL coefficient included), and DDP on 2 ranks equal to
one process (advantages whitened over both ranks' rollouts)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from temper.recipes import ppo
from temper.recipes.ppo import minibatch_rows
from tests.ranks import temper_on_ranks


def args(arith, tmp: Path, name: str, *extra: str) -> list[str]:
    policy, rm, data = arith
    return [f"--model={policy}", f"--data.prompts=[{data}]", f"--rewards=[{{model: {rm}}}]",
            "--rollout.n=2", "--rollout.max_new_tokens=8", "--train.prompts_per_step=4", "--train.micro_batch_size=4",
            "--ppo.epochs=2", "--ppo.minibatches=2", f"--run.dir={tmp}", f"--run.name={name}",
            "--log.progress=false", "--log.plots=false",
            "--eval.every=0", "--eval.val_fraction=0.1", "--eval.max_prompts=4", "--optim.lr=1e-3",
            "--lora.dropout=0", *extra]


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind", "train") == kind]


def test_minibatches_split_prompts_alike_on_every_rank():
    # 8 prompts, 2 ranks, 2 minibatches: rank 0 holds positions 0-3, rank 1 positions 4-7
    assert minibatch_rows([0, 1, 2, 3], 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert minibatch_rows([4, 5, 6, 7], 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_a_run_logs_trl_metrics_and_adapts_the_kl_coefficient(arith, tmp_path):
    assert ppo.main(args(arith, tmp_path, "run", "--train.steps=2", "--kl.adaptive=true", "--kl.target=0.01",
                         "--kl.horizon=10")) == 0
    train, val = rows(tmp_path / "run", "train"), rows(tmp_path / "run", "val")
    for key in ("loss", "objective/scores", "objective/kl", "objective/rlhf_reward", "objective/non_score_reward",
                "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "val/explained_variance", "policy/entropy_avg", "completion_length", "kl_coef",
                "logp_mismatch", "reward/model"):
        assert key in train[0], key
    assert abs(train[0]["objective/kl"]) < 1e-4  # the first rollout is the reference's own
    assert train[0]["logp_mismatch"] < 1e-4
    assert train[0]["kl_coef"] < 0.05  # KL below target: the coefficient shrinks
    assert "val_reward" in val[0]
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").exists()


def test_separate_value_model_from_the_reward_model(arith, tmp_path):
    _, rm, _ = arith
    assert ppo.main(args(arith, tmp_path, "sep", "--train.steps=1", "--method=full", "--value.kind=separate",
                         f"--value.model={rm}", "--ppo.missing_eos_penalty=1.0")) == 0
    train = rows(tmp_path / "sep", "train")
    assert train[0]["loss/value_avg"] > 0 and train[0]["truncated"] > 0


def test_resume_continues_exactly(arith, tmp_path, monkeypatch):
    common = ("--train.steps=3", "--checkpoint.every=1", "--kl.adaptive=true", "--kl.target=0.01")
    assert ppo.main(args(arith, tmp_path, "straight", *common)) == 0
    monkeypatch.setenv("TEMPER_FAULT", "crash:step=2")
    with pytest.raises(SystemExit, match="crash at step 2"):
        ppo.main(args(arith, tmp_path, "resumed", *common))
    monkeypatch.delenv("TEMPER_FAULT")
    assert ppo.main(args(arith, tmp_path, "resumed", *common)) == 0
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("loss", "objective/scores", "kl_coef")
    assert [[r[k] for k in keys] for r in rows(tmp_path / "straight", "train")] == \
        [[r[k] for k in keys] for r in rows(tmp_path / "resumed", "train")]


@pytest.mark.distributed
def test_ddp_two_ranks_equal_one_process(arith, tmp_path):
    common = ("--train.steps=2", "--run.device=cpu")
    assert ppo.main(args(arith, tmp_path, "single", *common)) == 0
    argv = args(arith, tmp_path, "ddp", *common, "--train.micro_batch_size=2")
    temper_on_ranks(["ppo", *argv], 2, tmp_path / "ddp-logs")
    single, ddp = rows(tmp_path / "single", "train"), rows(tmp_path / "ddp", "train")
    for key in ("loss", "objective/scores", "objective/kl", "loss/value_avg", "val/explained_variance"):
        torch.testing.assert_close([r[key] for r in ddp], [r[key] for r in single], rtol=1e-4, atol=1e-6)
