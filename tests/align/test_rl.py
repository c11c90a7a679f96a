"""RL objectives against TRL: GRPO against trl 1.16's GRPOTrainer itself, PPO against trl 0.24's PPOTrainer lines.

GRPO: `GRPOTrainer._compute_loss` is called unbound on a namespace holding the attributes it reads (as in
test_preference.py), on a Hugging Face copy of the same tiny model, so what is compared is TRL's code.
PPO: TRL removed its PPOTrainer in 1.x and computes PPO inline in `PPOTrainer.train()` of trl 0.24.0, so
those lines are transcribed below (file and line numbers cited) and fed the same tensors.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from temper.align.rl import (
    ActorCritic,
    AdaptiveKLController,
    FixedKLController,
    GRPOLoss,
    PPOLoss,
    RLOOLoss,
    adapters_off_token_reference,
    explained_variance,
    frozen_token_reference,
    gae,
    group_advantages,
    kl_penalized_rewards,
    leave_one_out_advantages,
    sequence_kl,
    token_logprobs_of,
    whiten,
)
from temper.model.config import PRESETS
from temper.model.heads import RewardModel
from temper.model.hf.config import to_hf_config
from temper.model.hf.weights import to_hf_state_dict
from temper.model.lora import apply_lora
from temper.model.transformer import Transformer
from temper.train.losses import IGNORE_INDEX, Batch
from temper.train.step import train_step

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

B, LP, LC = 4, 4, 7  # sequences, prompt tokens (the same for all: TRL left-pads prompts), completion slots
TEMP = 0.7


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = PRESETS["debug-llama"]
    return Transformer(cfg).eval(), Transformer(cfg).eval()  # policy, and a reference far from it


def _hf(model: Transformer):
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(model.cfg))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    hf.load_state_dict(to_hf_state_dict(model.cfg, model.state_dict()), strict=False)
    return hf


def _rollout(vocab: int, lengths: list[int], seed: int = 1):
    """Prompts (B, LP) and right-padded completions (B, LC) of `lengths` tokens as TRL holds them, and the
    same rows as temper's Batch (inputs = row[:-1], targets only on the completion)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (B, LP), generator=g)
    comp_mask = (torch.arange(LC)[None] < torch.tensor(lengths)[:, None]).long()
    comp = torch.randint(1, vocab, (B, LC), generator=g) * comp_mask
    row = torch.cat([prompt, comp], 1)
    scored = torch.cat([torch.zeros(B, LP - 1, dtype=torch.bool), comp_mask.bool()], 1)  # aligned with row[1:]
    return prompt, comp, comp_mask, Batch(row[:, :-1], torch.where(scored, row[:, 1:], IGNORE_INDEX))


def _to_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A (B, LC) per-completion-token tensor as temper's (B, T) layout aligned with the targets."""
    out = torch.zeros(B, LP - 1 + LC)
    out[:, LP - 1:] = x * mask
    return out


def _completion(x: torch.Tensor) -> torch.Tensor:
    return x[:, LP - 1:]


# ---- GRPO ---------------------------------------------------------------------------------------------------


def _trl_grpo(hf, loss_type: str, beta: float, prompt, comp, comp_mask, old, ref, adv, max_len: int,
              level: str = "token", epsilon_high: float = 0.28):
    from trl.trainer.grpo_trainer import GRPOTrainer

    acc = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, num_processes=1,
                          reduce=lambda t, reduction: t, gather=lambda t: t, gather_for_metrics=lambda t: t)
    ns = SimpleNamespace(model=hf, accelerator=acc, top_entropy_quantile=1.0, aux_loss_enabled=False,
                         off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
                         args=SimpleNamespace(use_bias_correction_kl=False, delta=None, sapo_temperature_pos=1.0,
                                              sapo_temperature_neg=1.05), loss_type=loss_type,
                         epsilon_low=0.2, epsilon_high=epsilon_high, use_vllm=False,
                         vllm_importance_sampling_correction=False,
                         max_completion_length=max_len, current_gradient_accumulation_steps=1,
                         _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    # The method's profiling wrapper wants a whole Trainer; the method itself is what runs.
    ns._get_per_token_logps_and_entropies = (
        lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__(ns, *a, **k))
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": comp,
              "completion_mask": comp_mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": comp_mask.sum()}
    with torch.no_grad():
        loss = GRPOTrainer._compute_loss(ns, hf, inputs)
    return loss, {k: v[-1] for k, v in ns._metrics["eval"].items()}


@pytest.fixture(scope="module")
def grpo_case(models):
    """One rollout micro-batch: old log-probs off the policy's (ratios far from 1, so both clips act), the
    reference's log-probs, advantages of both signs, and TRL's fused-head copy of the policy."""
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = models
    prompt, comp, comp_mask, batch = _rollout(policy.cfg.vocab_size, [7, 3, 5, 1])
    scored = batch.targets != IGNORE_INDEX
    with torch.no_grad():
        logps = token_logprobs_of(policy, batch, TEMP)
    offsets = torch.tensor([0.5, -0.5, 0.1, -0.05]).repeat(3)[: logps.shape[1]]  # ratios of 0.6 to 1.6
    batch.extra["old_logps"] = torch.where(scored, logps + offsets, 0.0)
    batch.extra["ref_logps"] = frozen_token_reference(reference, TEMP)(batch)
    batch.extra["advantages"] = torch.tensor([1.0, -0.5, 0.8, -1.2])
    hf = _hf(policy)
    add_fused_lm_head(hf, temperature=TEMP, outputs=("log_probs", "entropy"))
    return batch, hf, prompt, comp, comp_mask


CLIPS = {"cispo": ["cispo_clip_ratio"], "sapo": []}
"""The clip metrics of each loss type (TRL's names), the others': low, high and region."""


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo", "sapo"])
def test_grpo_losses_equal_trl_grpo_trainer(models, grpo_case, loss_type, beta):
    """Each loss type and its metrics; cispo's cap at 1.3, where the case's ratios (0.6 to 1.6) reach it."""
    policy, _ = models
    batch, hf, prompt, comp, comp_mask = grpo_case
    high = 1.3 if loss_type == "cispo" else 0.28
    loss_fn = GRPOLoss(loss_type, epsilon_low=0.2, epsilon_high=high, beta=beta, temperature=TEMP,
                       max_completion_length=LC)
    out = loss_fn(policy, batch)
    n = loss_fn.count(batch)
    theirs, metrics = _trl_grpo(hf, loss_type, beta, prompt, comp, comp_mask, _completion(batch.extra["old_logps"]),
                                _completion(batch.extra["ref_logps"]), batch.extra["advantages"], LC,
                                epsilon_high=high)
    torch.testing.assert_close(out.loss_sum / n, theirs.float(), rtol=1e-5, atol=1e-5)
    clips = CLIPS.get(loss_type, ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"])
    names = ["entropy", *clips] + (["kl"] if beta else [])
    assert sorted(out.metrics) == sorted(names)
    for name in names:
        assert out.metrics[name].item() / n.item() == pytest.approx(metrics[name], rel=1e-5, abs=1e-5), name
    assert all(metrics[name] > 0 for name in clips)  # every clip was exercised


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gspo_sequence_ratios_equal_trl_grpo_trainer(models, grpo_case, loss_type, beta):
    """importance_sampling_level=sequence (GSPO): each sequence's geometric-mean ratio on all its tokens, and the
    clip shares over sequences, as TRL's GRPOTrainer with importance_sampling_level="sequence"."""
    policy, _ = models
    batch, hf, prompt, comp, comp_mask = grpo_case
    scored = batch.targets != IGNORE_INDEX
    with torch.no_grad():
        logps = token_logprobs_of(policy, batch, TEMP)
    log_ratio = torch.tensor([0.4, -0.4, 0.1, -0.05])[:, None]  # per sequence's mean: one clipped high, one low
    wiggle = torch.where(scored, torch.tensor([0.5, -0.5, 0.3]).repeat(4)[: scored.shape[1]], 0.0)
    wiggle = torch.where(scored, wiggle - wiggle.sum(-1, keepdim=True) / scored.sum(-1, keepdim=True), 0.0)
    gspo = copy.copy(batch)  # token log-ratios that vary about their sequence's mean
    gspo.extra = {**batch.extra, "old_logps": torch.where(scored, logps - log_ratio - wiggle, 0.0)}
    loss_fn = GRPOLoss(loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=beta, temperature=TEMP,
                       importance_sampling_level="sequence")
    out, n = loss_fn(policy, gspo), loss_fn.count(gspo)
    theirs, metrics = _trl_grpo(hf, loss_type, beta, prompt, comp, comp_mask, _completion(gspo.extra["old_logps"]),
                                _completion(gspo.extra["ref_logps"]), gspo.extra["advantages"], LC, level="sequence")
    torch.testing.assert_close(out.loss_sum / n, theirs.float(), rtol=1e-5, atol=1e-5)
    for name in out.metrics:
        assert out.metrics[name].item() / n.item() == pytest.approx(metrics[name], rel=1e-5, abs=1e-5), name
    assert metrics["clip_ratio/low_mean"] == metrics["clip_ratio/high_mean"] == 0.25
    token = GRPOLoss(loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=beta, temperature=TEMP)(policy, gspo)
    assert abs(token.loss_sum - out.loss_sum) > 1e-3  # not the token-level loss


def test_grpo_reference_callable_equals_precomputed_and_lora_reference_is_the_base(models, grpo_case):
    policy, reference = models
    batch, *_ = grpo_case
    precomputed = GRPOLoss("dapo", beta=0.1, temperature=TEMP)(policy, batch).loss_sum
    bare = Batch(batch.inputs, batch.targets, extra={k: v for k, v in batch.extra.items() if k != "ref_logps"})
    called = GRPOLoss("dapo", beta=0.1, temperature=TEMP, reference=frozen_token_reference(reference, TEMP))
    torch.testing.assert_close(called(policy, bare).loss_sum, precomputed)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        GRPOLoss("dapo", beta=0.1)(policy, bare)

    lora = copy.deepcopy(policy)
    apply_lora(lora, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    torch.testing.assert_close(adapters_off_token_reference(lora, TEMP)(batch),
                               frozen_token_reference(copy.deepcopy(policy), TEMP)(batch), rtol=0, atol=1e-5)


def test_group_advantages_equal_trl_formula():
    """TRL's `_generate_and_score_completions` (scale_rewards "group" / "batch" / "none"): (r - mean) / (nanstd +
    1e-4), the std the group's or the batch's."""
    from trl.trainer.utils import nanstd

    from temper.align.online import global_std
    from temper.train.parallel import DistInfo

    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 0.0, 1.0, 4.0])
    G = 4
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    torch.testing.assert_close(group_advantages(rewards, G), (rewards - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, G, scale="none"), rewards - mean)
    # scale_rewards="batch": the std of the whole batch (TRL's grpo_trainer.py, lines 2774-2787)
    torch.testing.assert_close(group_advantages(rewards, G, scale="batch"), (rewards - mean) / (nanstd(rewards) + 1e-4))
    one = DistInfo(0, 0, 1, torch.device("cpu"))
    assert global_std(one, rewards) == pytest.approx(nanstd(rewards).item(), rel=1e-6)
    assert group_advantages(rewards, G)[4:8].abs().max() == 0  # a group of equal rewards teaches nothing
    with pytest.raises(ValueError, match=r"\(groups \* group_size,\)"):
        group_advantages(rewards, 5)


# ---- RLOO ---------------------------------------------------------------------------------------------------


def _trl_rloo(hf, prompt, comp, comp_mask, old_logps, adv):
    from trl.trainer.rloo_trainer import RLOOTrainer

    acc = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, num_processes=1,
                          reduce=lambda t, reduction: t, gather=lambda t: t, gather_for_metrics=lambda t: t)
    ns = SimpleNamespace(model=hf, accelerator=acc, aux_loss_enabled=False, epsilon_low=0.2, epsilon_high=0.28,
                         _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    ns._get_per_token_logps_and_entropies = (  # the method, without the profiling wrapper that wants a Trainer
        lambda *a, **k: RLOOTrainer._get_per_token_logps_and_entropies.__wrapped__(ns, *a, **k))
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": comp,
              "completion_mask": comp_mask, "advantages": adv, "old_logps": old_logps}
    with torch.no_grad():
        loss = RLOOTrainer._compute_loss(ns, hf, inputs)
    return loss, {k: v[-1] for k, v in ns._metrics["eval"].items()}


def test_rloo_loss_equals_trl_rloo_trainer(models, grpo_case):
    """One ratio per sequence, of its summed log-probs; the clipped surrogate averaged over sequences; TRL's
    metrics (entropy over completion tokens, the clip shares over sequences)."""
    policy, _ = models
    batch, hf, prompt, comp, comp_mask = grpo_case
    scored = batch.targets != IGNORE_INDEX
    with torch.no_grad():
        logps = token_logprobs_of(policy, batch, TEMP)
    log_ratio = torch.tensor([0.4, -0.4, 0.1, -0.05])[:, None]  # per sequence: one clipped high, one low, two not
    rloo = copy.copy(batch)
    old = torch.where(scored, logps - log_ratio / scored.sum(-1, keepdim=True), 0.0)  # sums log_ratio off logps
    rloo.extra = {**batch.extra, "old_logps": old}
    loss_fn = RLOOLoss(epsilon_low=0.2, epsilon_high=0.28, temperature=TEMP)
    out, n = loss_fn(policy, rloo), loss_fn.count(rloo)
    theirs, metrics = _trl_rloo(hf, prompt, comp, comp_mask, _completion(rloo.extra["old_logps"]).sum(-1),
                                rloo.extra["advantages"])
    torch.testing.assert_close(out.loss_sum / n, theirs.float(), rtol=1e-5, atol=1e-5)
    for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert out.metrics[name].item() / n.item() == pytest.approx(metrics[name], rel=1e-5, abs=1e-5), name
    assert metrics["clip_ratio/low_mean"] == metrics["clip_ratio/high_mean"] == 0.25  # both clips were exercised


def test_rloo_advantages_and_kl_penalty_equal_trl_formula(grpo_case):
    """TRL's `RLOOTrainer._generate_and_score_completions` (trl 1.16, rloo_trainer.py lines 1664-1694, transcribed):
    rewards - beta * sum over the completion of (old - ref) log-probs, then each less the mean of its group's
    others."""
    batch, *_ = grpo_case
    per_token_kl = _completion(batch.extra["old_logps"] - batch.extra["ref_logps"])  # (B, LC), 0 off the completion
    torch.testing.assert_close(sequence_kl(batch), per_token_kl.sum(-1))
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 3.0, -1.0, 0.0, 1.0, 4.0])
    G = 4
    grouped = rewards.view(-1, G)
    theirs = rewards - ((grouped.sum(1, keepdim=True) - grouped) / (G - 1)).view(-1)
    torch.testing.assert_close(leave_one_out_advantages(rewards, G), theirs)
    assert leave_one_out_advantages(rewards, G)[4:8].abs().max() == 0
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        leave_one_out_advantages(rewards, 1)


def test_rloo_two_micro_batches_give_the_update_of_one(models, grpo_case):
    """The unit is a sequence: split unevenly, the same update."""
    policy, _ = models
    batch, *_ = grpo_case
    params = []
    for parts in ([batch], [_split(batch, slice(0, 1)), _split(batch, slice(1, None))]):
        model = copy.deepcopy(policy).train()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(model, opt, parts, step=0, loss_fn=RLOOLoss(temperature=TEMP), clip_norm=0)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)


def _split(batch: Batch, rows: slice) -> Batch:
    return Batch(batch.inputs[rows], batch.targets[rows], extra={k: v[rows] for k, v in batch.extra.items()})


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_grpo_two_micro_batches_give_the_update_of_one(models, grpo_case, loss_type):
    """train_step divides by the global count: sequences (grpo, sapo) or tokens (dapo, cispo), split unevenly here."""
    policy, _ = models
    batch, *_ = grpo_case
    loss_fn = GRPOLoss(loss_type, beta=0.04, temperature=TEMP, epsilon_high=5.0 if loss_type == "cispo" else 0.2)
    params = []
    for parts in ([batch], [_split(batch, slice(0, 1)), _split(batch, slice(1, None))]):
        model = copy.deepcopy(policy).train()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(model, opt, parts, step=0, loss_fn=loss_fn, clip_norm=0)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(params[0], torch.cat([p.detach().flatten() for p in policy.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)


def test_grpo_options_are_checked():
    with pytest.raises(ValueError, match="unknown GRPO loss type 'bnpo'"):
        GRPOLoss("bnpo")
    with pytest.raises(ValueError, match="cispo caps the ratio at epsilon_high itself"):
        GRPOLoss("cispo")
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLoss("dr_grpo")
    *_, batch = _rollout(256, [2, 2, 2, 2])
    batch.extra = {"old_logps": torch.zeros(batch.targets.shape), "advantages": torch.zeros(B, 3)}
    with pytest.raises(ValueError, match="one per sequence"):
        GRPOLoss()(Transformer(PRESETS["debug-llama"]), batch)


# ---- PPO: trl 0.24.0's lines, transcribed ------------------------------------------------------------------

INVALID_LOGPROB = 1.0  # trl/trainer/ppo_trainer.py:76


def _masked_mean(values, mask, axis=None):  # trl 0.24.0 trl/core.py:25-30
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def _masked_var(values, mask, unbiased=True):  # trl/core.py:33-49
    mean = _masked_mean(values, mask)
    centered_values = values - mean
    variance = _masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def _masked_whiten(values, mask, shift_mean=True):  # trl/core.py:52-58
    mean, var = _masked_mean(values, mask), _masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _trl_ppo(args, responses, logprobs, ref_logprobs, values, scores, sequence_lengths, output_logits, vpred_temp,
             context_length, episode_ends_at_last_token=False):
    """trl 0.24.0 trl/trainer/ppo_trainer.py `PPOTrainer.train()`: lines 550-585 (rewards, GAE, whitening)
    and 606-655 (one micro-batch of the loss and its statistics), with the micro-batch the whole batch.

    With `episode_ends_at_last_token`, two of TRL's lines are replaced (marked NOT TRL) to end the
    episode on the last response token as temper does (huggingface/trl#3750): the score on that token, and
    values masked from the first padding slot."""
    from trl.trainer.utils import selective_log_softmax

    with torch.no_grad():
        response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
        padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
        logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
        ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
        sequence_lengths_p1 = sequence_lengths + 1
        padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
        if episode_ends_at_last_token:  # NOT TRL
            sequence_lengths_p1, padding_mask_p1 = sequence_lengths, padding_mask
        values = torch.masked_fill(values, padding_mask_p1, 0)

        logr = ref_logprobs - logprobs
        kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
        non_score_reward = -args.kl_coef * kl
        rewards = non_score_reward.clone()
        actual_start = torch.arange(rewards.size(0), device=rewards.device)
        actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
        rewards[[actual_start, actual_end]] += scores

        lastgaelam = 0
        advantages_reversed = []
        gen_length = responses.shape[1]
        for t in reversed(range(gen_length)):
            nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
            delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
            lastgaelam = delta + args.gamma * args.lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], axis=1)
        returns = advantages + values
        advantages = _masked_whiten(advantages, ~padding_mask)
        advantages = torch.masked_fill(advantages, padding_mask, 0)

    mb_advantage, mb_responses, mb_logprobs, mb_return, mb_values = advantages, responses, logprobs, returns, values
    logits = output_logits[:, context_length - 1 : -1]
    logits /= args.temperature + 1e-7
    new_logprobs = selective_log_softmax(logits, mb_responses)
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = vpred_temp[:, context_length - 1 : -1].squeeze(-1)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(
        vpred,
        mb_values - args.cliprange_value,
        mb_values + args.cliprange_value,
    )
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * _masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = _masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = _masked_mean(pg_loss_max, ~padding_mask)
    loss = pg_loss + args.vf_coef * vf_loss
    with torch.no_grad():
        pg_clipfrac = _masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
        prob_dist = torch.nn.functional.softmax(logits, dim=-1)
        entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
        approxkl = 0.5 * (logprobs_diff**2).mean()
    stats = {"policy/approxkl_avg": approxkl, "policy/clipfrac_avg": pg_clipfrac, "loss/policy_avg": pg_loss,
             "loss/value_avg": vf_loss, "val/clipfrac_avg": vf_clipfrac, "policy/entropy_avg": entropy.mean(),
             "val/ratio": ratio.mean()}
    raw = {"kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns, "entropy": entropy,
           "ratio": ratio, "padding_mask": padding_mask}
    return loss, stats, raw


PPO_ARGS = SimpleNamespace(kl_coef=0.05, gamma=0.9, lam=0.8, temperature=TEMP, cliprange=0.2, cliprange_value=0.05,
                           vf_coef=0.1)


def _ppo_case(models, lengths, estimator):
    """Both sides of one PPO rollout batch: TRL's (B, LC) tensors and forward outputs of the same policy and value
    head (a Hugging Face copy with a `score` layer, as TRL's PolicyAndValueWrapper), and temper's Batch."""
    policy, reference = models
    torch.manual_seed(3)
    ac = ActorCritic(policy)
    prompt, comp, comp_mask, batch = _rollout(policy.cfg.vocab_size, lengths, seed=4)
    scored = batch.targets != IGNORE_INDEX
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        logps = token_logprobs_of(policy, batch, TEMP)
        _, values = ac(batch.inputs, logits_at=scored)
    old_logps = torch.where(scored, logps + 0.3 * torch.randn(logps.shape, generator=g), 0.0)
    old_values = torch.zeros(scored.shape).masked_scatter(scored, values + 0.1 * torch.randn(values.shape, generator=g))
    ref_logps = frozen_token_reference(reference, TEMP)(batch)
    scores = torch.tensor([1.5, -0.7, 0.3, 2.0])

    hf = _hf(policy)
    score = nn.Linear(policy.cfg.dim, 1, bias=False)
    score.weight.data.copy_(ac.value.score.weight)
    query_responses = torch.cat([prompt, comp], 1)
    with torch.no_grad():
        out = hf(input_ids=query_responses, output_hidden_states=True)
        vpred_temp = score(out.hidden_states[-1])
    args = SimpleNamespace(**vars(PPO_ARGS), kl_estimator=estimator)
    trl_side = dict(args=args, responses=comp, logprobs=_completion(old_logps).clone(),
                    ref_logprobs=_completion(ref_logps).clone(), values=_completion(old_values).clone(), scores=scores,
                    sequence_lengths=torch.tensor(lengths) - 1, output_logits=out.logits.clone(),
                    vpred_temp=vpred_temp, context_length=LP)
    return ac, batch, scored, old_logps, ref_logps, old_values, scores, trl_side


def _temper_ppo(ac, batch, scored, old_logps, ref_logps, old_values, scores, estimator):
    rewards, kl = kl_penalized_rewards(old_logps, ref_logps, scores, scored, PPO_ARGS.kl_coef, estimator)
    adv, returns = gae(rewards, old_values, scored, PPO_ARGS.gamma, PPO_ARGS.lam)
    adv_w = whiten(adv, scored)
    batch.extra = {"old_logps": old_logps, "advantages": adv_w, "returns": returns, "old_values": old_values}
    loss_fn = PPOLoss(cliprange=PPO_ARGS.cliprange, cliprange_value=PPO_ARGS.cliprange_value, vf_coef=PPO_ARGS.vf_coef,
                      temperature=TEMP)
    with torch.no_grad():
        out = loss_fn(ac, batch)
    n = loss_fn.count(batch).item()
    return rewards, kl, adv_w, returns, out.loss_sum / n, {k: v.item() / n for k, v in out.metrics.items()}


TRL_INDEXING = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # TRL's own line 566


@TRL_INDEXING
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_equals_trl_ppo_trainer_on_full_length_responses(models, estimator):
    """Responses filling every slot (TRL's episode and temper's coincide): every tensor and statistic is TRL's."""
    ac, batch, scored, old_logps, ref_logps, old_values, scores, trl_side = _ppo_case(models, [LC] * B, estimator)
    rewards, kl, adv, returns, loss, metrics = _temper_ppo(ac, batch, scored, old_logps, ref_logps, old_values, scores,
                                                           estimator)
    theirs, stats, raw = _trl_ppo(**trl_side)
    for name, ours in {"kl": kl, "rewards": rewards, "advantages": adv, "returns": returns}.items():
        torch.testing.assert_close(_completion(ours), raw[name].float(), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(loss, theirs.float(), rtol=1e-5, atol=1e-5)
    assert sorted(metrics) == sorted(stats)
    for name, value in stats.items():
        assert metrics[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-5), name
    assert stats["policy/clipfrac_avg"] > 0 and stats["val/clipfrac_avg"] > 0  # both clips were exercised


@TRL_INDEXING
def test_ppo_equals_trl_on_padded_responses_with_the_episode_ending_at_the_last_token(models):
    """With padding, TRL scores one slot past the response (huggingface/trl#3750); with that line set to
    temper's episode, everything else is TRL's, statistics that TRL averages over padding taken masked."""
    lengths = [7, 3, 5, 2]
    ac, batch, scored, old_logps, ref_logps, old_values, scores, trl_side = _ppo_case(models, lengths, "k3")
    rewards, kl, adv, returns, loss, metrics = _temper_ppo(ac, batch, scored, old_logps, ref_logps, old_values, scores,
                                                           "k3")
    theirs, stats, raw = _trl_ppo(**trl_side, episode_ends_at_last_token=True)
    valid = ~raw["padding_mask"]
    for name, ours in {"kl": kl, "rewards": rewards, "advantages": adv, "returns": returns}.items():
        torch.testing.assert_close(_completion(ours)[valid], raw[name][valid].float(), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(loss, theirs.float(), rtol=1e-5, atol=1e-5)
    for name in ("policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"):
        assert metrics[name] == pytest.approx(stats[name].item(), rel=1e-5, abs=1e-5), name
    for name, tensor in {"policy/entropy_avg": raw["entropy"], "val/ratio": raw["ratio"]}.items():
        assert metrics[name] == pytest.approx(tensor[valid].mean().item(), rel=1e-5, abs=1e-5), name
    n = valid.sum().item()
    assert metrics["policy/approxkl_avg"] == pytest.approx(stats["policy/approxkl_avg"].item() * valid.numel() / n,
                                                           rel=1e-5, abs=1e-6)


def test_whiten_equals_trl_masked_whiten():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 9, generator=g) * 3 + 1
    mask = torch.rand(3, 9, generator=g) > 0.3
    for shift in (True, False):
        torch.testing.assert_close(whiten(x, mask, shift_mean=shift)[mask], _masked_whiten(x, mask, shift)[mask])
    assert whiten(x, mask)[~mask].abs().max() == 0
    one = torch.zeros_like(mask)
    one[0, 0] = True
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, one)


def test_kl_controllers_follow_ziegler_et_al():
    """Ziegler et al. 2019 section 2.2 (lm-human-preferences train_policy.py; TRL <= 0.11's AdaptiveKLController,
    gone before 0.24): e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    expected = 0.2
    for kl, n_steps in [(12.0, 256), (3.0, 256), (6.6, 64), (6.0, 128)]:
        ctl.update(kl, n_steps)
        expected *= 1 + min(max(kl / 6.0 - 1, -0.2), 0.2) * n_steps / 10000
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert ctl.value != 0.2
    resumed = AdaptiveKLController(0.2, 6.0, 10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_explained_variance():
    returns = torch.tensor([[0.0, 1.0, 2.0, 9.0], [0.0, 3.0, 4.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert explained_variance(returns, returns, mask).item() == 1.0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    r = returns[mask]
    values = returns + torch.tensor([[0.0, 0.5, -0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    expected = 1 - (r - values[mask]).var(correction=0) / r.var(correction=0)
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected.item())
    assert explained_variance(values, torch.ones_like(returns), mask).isnan()


def test_gae_ends_each_episode_at_its_last_token():
    """gamma = lam = 1 with zero values: every advantage is the sum of the rewards still to come in its row."""
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0], [0.0, 5.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    adv, returns = gae(rewards, torch.zeros(2, 5), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 6.0, 5.0, 3.0, 0.0], [0.0, 6.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, adv)


def test_actor_critic_shared_and_separate(models):
    policy, reference = models
    *_, batch = _rollout(policy.cfg.vocab_size, [7, 3, 5, 2])
    scored = batch.targets != IGNORE_INDEX
    shared = ActorCritic(policy)
    logits, values = shared(batch.inputs, logits_at=scored)
    with torch.no_grad():
        torch.testing.assert_close(logits, policy(batch.inputs, logits_at=scored))
    assert values.shape == (int(scored.sum()),) and values.dtype == torch.float32
    assert {n.split(".")[0] for n, _ in shared.named_parameters()} == {"policy", "value"}
    assert shared.num_params() == policy.num_params() + policy.cfg.dim
    assert shared.cfg is policy.cfg and shared.layers is policy.layers

    critic = RewardModel(copy.deepcopy(reference).requires_grad_(True))
    separate = ActorCritic(copy.deepcopy(policy), critic)
    last = torch.tensor([9, 5, 7, 4])  # a reward model read at one position per row gives the same value there
    pos = (torch.arange(scored.shape[1])[None] == last[:, None]) & scored
    _, at_last = separate(batch.inputs, logits_at=pos)
    torch.testing.assert_close(at_last, critic(batch.inputs, last=last))
    assert separate.flops_per_token(16) == policy.flops_per_token(16) + critic.flops_per_token(16)
    assert any(n.startswith("value.backbone.") for n, _ in separate.named_parameters())

    batch.extra = {"old_logps": torch.zeros(scored.shape), "advantages": torch.ones(scored.shape),
                   "returns": torch.ones(scored.shape), "old_values": torch.zeros(scored.shape)}
    PPOLoss()(separate, batch).loss_sum.backward()
    assert critic.backbone.layers[0].attn.q_proj.weight.grad is not None
    assert separate.policy.layers[0].attn.q_proj.weight.grad is not None
