"""`temper grpo` end to end on a tiny Llama-layout checkpoint: the run logs what it should, the engine's
log-probs agree with training's, a KL to the reference starts at 0, exact resume after a crash, and
DDP on 2 ranks equal to one process. Rewards: a rule and a (random) reward model, so that
groups have unequal rewards from the first step."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from temper.errors import InputError
from temper.recipes import grpo
from tests.ranks import temper_on_ranks


def args(arith, tmp: Path, name: str, *extra: str) -> list[str]:
    policy, rm, data = arith
    return [f"--model={policy}", f"--data.prompts=[{data}]", f"--rewards=[{{model: {rm}}}, {{rule: final_number}}]",
            "--rollout.n=4", "--rollout.max_new_tokens=8", "--train.prompts_per_step=4", "--train.micro_batch_size=8",
            f"--run.dir={tmp}", f"--run.name={name}", "--log.progress=false", "--log.plots=false",
            "--eval.every=0",
            "--eval.val_fraction=0.1", "--eval.max_prompts=4", "--optim.lr=1e-3", "--lora.dropout=0", *extra]


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind", "train") == kind]


def test_a_run_logs_rewards_and_trl_metrics(arith, tmp_path):
    assert grpo.main(args(arith, tmp_path, "run", "--train.steps=2")) == 0
    train, val = rows(tmp_path / "run", "train"), rows(tmp_path / "run", "val")
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in val] == [0, 2]
    for key in ("loss", "reward", "reward/model", "reward/final_number", "reward_std", "completion_length",
                "truncated", "entropy", "clip_ratio/region_mean", "logp_mismatch"):
        assert key in train[0], key
    assert train[0]["reward_std"] > 0  # the reward model separates a group's completions
    assert train[0]["logp_mismatch"] < 1e-4  # the engine's log-probs are the training forward's
    assert train[0]["clip_ratio/region_mean"] == 0.0  # one update per rollout: ratios are 1
    assert {"val_reward", "val_reward/final_number", "val_completion_length"} <= set(val[0])
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").exists()


def test_full_run_with_a_kl_term_starts_at_the_reference(arith, tmp_path):
    assert grpo.main(args(arith, tmp_path, "kl", "--train.steps=2", "--method=full", "--loss.beta=0.1",
                          "--loss.loss_type=dapo")) == 0
    train = rows(tmp_path / "kl", "train")
    assert train[0]["kl"] < 1e-4 < train[1]["kl"]  # the policy moves away from its frozen copy


def test_rloo_takes_the_kl_off_the_reward(arith, tmp_path):
    """loss.loss_type=rloo: at step 1 the sampler is the reference (a KL of 0 up to the engine's rounding); after
    an update the KL moves the advantages, so the step-2 loss differs from a run without it."""
    common = ("--train.steps=2", "--method=full", "--loss.loss_type=rloo")
    assert grpo.main(args(arith, tmp_path, "kl", *common, "--loss.beta=0.5")) == 0
    assert grpo.main(args(arith, tmp_path, "plain", *common)) == 0
    kl, plain = rows(tmp_path / "kl", "train"), rows(tmp_path / "plain", "train")
    assert abs(kl[0]["kl"]) < 1e-4 < abs(kl[1]["kl"]) and "kl" not in plain[0]
    assert kl[1]["loss"] != plain[1]["loss"]
    assert {"entropy", "clip_ratio/region_mean", "reward_std"} <= set(kl[0])


def test_gspo_trains_on_sequence_ratios(arith, tmp_path):
    """loss.importance_sampling_level=sequence: with two updates on a step's rollouts, the second one's ratios are
    off 1, per sequence here and per token without it, so the weights part."""
    common = ("--train.steps=1", "--loss.iterations=2")
    assert grpo.main(args(arith, tmp_path, "gspo", *common, "--loss.importance_sampling_level=sequence")) == 0
    assert grpo.main(args(arith, tmp_path, "token", *common)) == 0
    gspo, token = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("gspo", "token"))
    assert any(not torch.equal(gspo[k], token[k]) for k in gspo)


@pytest.mark.parametrize("loss", [["--loss.loss_type=cispo", "--loss.epsilon_high=5"],
                                  ["--loss.loss_type=sapo", "--loss.sapo_temperature_neg=2"]], ids=["cispo", "sapo"])
def test_cispo_and_sapo_train_with_their_metrics(arith, tmp_path, loss):
    assert grpo.main(args(arith, tmp_path, "run", "--train.steps=1", "--loss.iterations=2", *loss)) == 0
    train = rows(tmp_path / "run", "train")[0]
    assert ("cispo_clip_ratio" in train) == ("cispo" in loss[0]) and "clip_ratio/region_mean" not in train


def test_resume_continues_exactly(arith, tmp_path, monkeypatch):
    common = ("--train.steps=3", "--checkpoint.every=1")
    assert grpo.main(args(arith, tmp_path, "straight", *common)) == 0
    monkeypatch.setenv("TEMPER_FAULT", "crash:step=2")
    with pytest.raises(SystemExit, match="crash at step 2"):
        grpo.main(args(arith, tmp_path, "resumed", *common))
    monkeypatch.delenv("TEMPER_FAULT")
    assert grpo.main(args(arith, tmp_path, "resumed", *common)) == 0
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("loss", "reward", "completion_length")
    assert [[r[k] for k in keys] for r in rows(tmp_path / "straight", "train")] == \
        [[r[k] for k in keys] for r in rows(tmp_path / "resumed", "train")]


def test_bad_settings_fail_before_training(arith, tmp_path):
    with pytest.raises(ValueError, match="rollout.n"):
        grpo.main(args(arith, tmp_path, "x", "--rollout.n=1"))
    with pytest.raises(ValueError, match="cispo caps the ratio at epsilon_high itself"):
        grpo.main(args(arith, tmp_path, "x", "--loss.loss_type=cispo"))
    with pytest.raises(ValueError, match="rloo's ratio is one per sequence already"):
        grpo.main(args(arith, tmp_path, "x", "--loss.loss_type=rloo", "--loss.importance_sampling_level=sequence"))
    with pytest.raises(InputError, match="rewards"):
        grpo.main([a for a in args(arith, tmp_path, "x") if not a.startswith("--rewards")])
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text('{"prompt": "What is 1 + 1?"}\n')
    with pytest.raises(InputError, match=r"q.jsonl:1.*answer"):
        grpo.main([*args(arith, tmp_path, "x"), f"--data.prompts=[{no_answer}]"])
    with pytest.raises(InputError, match="context"):
        grpo.main([*args(arith, tmp_path, "x"), "--rollout.max_new_tokens=120", "--data.max_prompt_length=64"])


def test_prompts_render_with_the_chat_template_variables(arith, tmp_path):
    """--data.chat_template_kwargs reach the template (Qwen3's enable_thinking=false closes an empty <think>)."""
    from temper.align.online import render
    from temper.data.prompts import read_prompts
    from temper.data.tokenizer import load_hf_tokenizer
    from tests.templates import CHATML

    switch = "{% if enable_thinking is false %}<think></think>{% endif %}"
    tok = dataclasses.replace(load_hf_tokenizer(arith[0]), chat_templates={"default": CHATML + switch})
    records = read_prompts([str(arith[2])])[:3]
    (plain, _), (quiet, _) = (render(tok, records, 256, v) for v in (None, {"enable_thinking": False}))
    assert [tok.decode(q[len(p):]) for p, q in zip(plain.ids, quiet.ids, strict=True)] == ["<think></think>"] * 3
    assert all(q[:len(p)] == p for p, q in zip(plain.ids, quiet.ids, strict=True))
    with pytest.raises(ValueError, match="chat template variable 'add_generation_prompt'"):
        grpo.main([*args(arith, tmp_path, "x"), "--data.chat_template_kwargs={add_generation_prompt: false}"])


@pytest.mark.distributed
@pytest.mark.parametrize("loss", [[], ["--loss.loss_type=rloo", "--loss.beta=0.5"], ["--loss.scale_rewards=batch"]],
                         ids=["grpo", "rloo", "batch-scaled"])
def test_ddp_two_ranks_equal_one_process(arith, tmp_path, loss):
    common = ("--train.steps=2", "--run.device=cpu", *loss)
    assert grpo.main(args(arith, tmp_path, "single", *common)) == 0
    argv = args(arith, tmp_path, "ddp", *common, "--train.micro_batch_size=4")
    temper_on_ranks(["grpo", *argv], 2, tmp_path / "ddp-logs")
    single, ddp = rows(tmp_path / "single", "train"), rows(tmp_path / "ddp", "train")
    for key in ("loss", "reward", "completion_length", "val_reward", "kl"):
        if key in single[0]:
            torch.testing.assert_close([r[key] for r in ddp], [r[key] for r in single], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([r["val_reward"] for r in rows(tmp_path / "ddp", "val")],
                               [r["val_reward"] for r in rows(tmp_path / "single", "val")], rtol=1e-5, atol=1e-6)
