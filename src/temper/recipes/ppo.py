"""`temper ppo`: RLHF with PPO: sampled answers, a reward, a value function, a KL penalty to the start.

A policy samples, a reward scores, a value function estimates what is to come, and a KL penalty keeps
the policy near its frozen starting point.

Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and Stiennon et al. 2020, as
TRL's PPOTrainer and OpenRLHF run it: each completion token's reward is -kl_coef * KL(policy || reference)
at that token, plus the sequence's score at its last token; GAE(gamma, lambda) over the completion
gives advantages (whitened over the rollout batch) and returns; several epochs of minibatches then
minimise PPO's clipped policy loss plus the clipped value loss.

Steps, in the order `run` takes them:
 1. parse the config; read the prompt files (data/prompts.py), render them with the policy's chat
    template; hold out eval.val_fraction
 2. join the process group when launched by torchrun (DDP; gloo on CPU); load the policy, apply the
    method (full, lora, qlora); the value function: a scalar head on the policy (value.kind=shared) or
    a separate decoder initialised from a reward model's export (value.kind=separate, TRL's layout);
    policy and value are one `align.rl.ActorCritic`, which DDP wraps (or FSDP2 shards: the policy samples
    and scores through it, `align.rl.Actor`). The reference: a frozen copy (full) or the policy with its
    adapters off (LoRA, QLoRA: no second copy). The rewards: a reward model (`temper reward`'s export)
    and/or rules, weighted
 3. each step: this rank's share of the step's prompts, rollout.n completions each on the engine with
    their log-probs (seeded by (seed, prompt, sample): resume and DDP sample the same); scores (with
    `missing_eos_penalty` for completions cut at max_new_tokens); the reference's log-probs and the
    values, once; KL-penalised rewards, GAE, advantages whitened over the whole rollout batch (every rank)
 4. ppo.epochs x ppo.minibatches optimizer steps through `train_step` with `align.rl.PPOLoss`; the
    minibatches split the step's prompts by position (prompt q in minibatch q mod M, on every rank
    alike), their order reshuffled each epoch; then the KL coefficient is updated (fixed, or Ziegler's
    adaptive controller towards `kl.target`)
 5. logs, under TRL's names: objective/scores, objective/rlhf_reward, objective/kl, objective/entropy,
    objective/non_score_reward, policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg,
    loss/value_avg, val/clipfrac_avg, val/ratio, val/explained_variance, the KL coefficient, the
    completion length; greedy answers to held-out prompts scored every eval.every steps; checkpoints
    of what trains, the optimizer and the KL coefficient
 6. final/ (rank 0, a sharded model gathered there first): the policy merged, in Hugging Face layout
    with the tokenizer (the adapter in PEFT's format for lora, qlora); the value function is not exported

It does not train group-relative policies (`temper grpo`) or from pairs (`temper dpo`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from temper import config
from temper.align.online import (
    OnlineEvalConfig,
    OnlineTrainConfig,
    PromptDataConfig,
    check_context,
    evaluate_greedy,
    global_means,
    reference_policy,
    rollout_seeds,
    run_on_prompts,
    score,
    step_prompts,
)
from temper.align.rewards import RewardConfig, build_rewards
from temper.align.rl import (
    Actor,
    ActorCritic,
    AdaptiveKLController,
    FixedKLController,
    PPOLoss,
    explained_variance,
    gae,
    kl_penalized_rewards,
    whiten,
)
from temper.align.rollout import RolloutConfig, collate_rollouts, logprob_mismatch, rollout
from temper.data.loader import EpochOrder
from temper.model.heads import load_reward_model
from temper.model.hf.checkpoint import load_hf
from temper.train import checkpoint as ckpt
from temper.train.losses import IGNORE_INDEX, Batch
from temper.train.methods import LoRAConfig, apply_method, export_finetuned
from temper.train.optim import OptimConfig, ScheduleConfig, lr_at, set_lr
from temper.train.run import CheckpointSection, LogSection, Run, RunSection
from temper.train.step import NonFiniteLoss, resolve_precision

RESUME_KEYS = ("model", "method", "data", "rewards", "rollout", "value", "kl", "ppo", "lora",
               "train.prompts_per_step", "train.micro_batch_size", "train.steps", "optim", "schedule", "run.seed")


@dataclass
class ValueConfig:
    kind: Literal["shared", "separate"] = "shared"
    """shared: a scalar head on the policy's hidden states; separate: its own decoder (from `model`)."""
    model: str = ""
    """value.kind=separate: a reward model's checkpoint to start from (TRL's choice); empty: a copy of the policy."""


@dataclass
class KLConfig:
    coef: float = 0.05
    """Initial coefficient of the per-token KL penalty (TRL's default 0.05)."""
    adaptive: bool = False
    """Steer the coefficient towards `target` (Ziegler et al. 2019's proportional controller)."""
    target: float = 6.0
    """The adaptive controller's target KL per completion (nats)."""
    horizon: int = 10000
    """The adaptive controller's horizon, in completions."""
    estimator: Literal["k1", "k3"] = "k1"
    """The per-token KL estimate folded into the rewards: k1 = log pi/ref (TRL's default), k3 (>= 0)."""

    def __post_init__(self) -> None:
        if self.coef < 0 or self.target <= 0 or self.horizon < 1:
            raise ValueError("coef must be >= 0, target > 0 and horizon >= 1")


@dataclass
class PPOSection:
    epochs: int = 4
    """Passes over each rollout batch (TRL's num_ppo_epochs)."""
    minibatches: int = 1
    """Optimizer steps per pass: the step's prompts split into this many minibatches (TRL's num_mini_batches)."""
    cliprange: float = 0.2
    """Policy ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE's lambda."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (scale only) before GAE."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion cut at max_new_tokens (None: off)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError("epochs and minibatches must be at least 1")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma must be in (0, 1] and lam in [0, 1], got {self.gamma}, {self.lam}")


@dataclass
class PPOConfig:
    model: str = ""
    """Hugging Face checkpoint directory of the policy (usually an SFT result), e.g. runs/sft/final."""
    method: Literal["full", "lora", "qlora"] = "lora"
    """What trains in the policy: every weight, LoRA adapters, or LoRA over an NF4 base (the value trains whole)."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    """The prompts."""
    rewards: list[RewardConfig] = field(default_factory=list)
    """Weighted rewards: a reward model ({model: runs/reward/final}) and/or rules ({rule: final_number})."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(n=1))
    """Sampling: completions per prompt, length, temperature, stop strings."""
    value: ValueConfig = field(default_factory=ValueConfig)
    """The value function."""
    kl: KLConfig = field(default_factory=KLConfig)
    """The KL penalty to the reference."""
    ppo: PPOSection = field(default_factory=PPOSection)
    """PPO's epochs, minibatches, clipping, GAE."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapters."""
    run: RunSection = field(default_factory=lambda: RunSection(name="ppo", seed=0))
    """Where the run lives and how it starts."""
    train: OnlineTrainConfig = field(default_factory=lambda: OnlineTrainConfig(micro_batch_size=8))
    """Batches and the step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-6, weight_decay=0.0))
    """AdamW (TRL's PPO default lr is 3e-6 full; LoRA takes ~1e-5 .. 1e-4)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0))
    """Learning-rate schedule, over optimizer steps."""
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    """Held-out prompts, answered greedily."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""

    def __post_init__(self) -> None:
        if self.value.model and self.value.kind != "separate":
            raise ValueError("value.model applies to value.kind=separate")


def main(argv: list[str] | None = None) -> int:
    return run(config.parse(PPOConfig, argv, prog="ppo"))  # bad input: __main__ prints one line


def run(cfg: PPOConfig) -> int:
    return run_on_prompts(cfg, _train)  # step 1, then _train


def select(batch: Batch, rows: list[int]) -> Batch:
    """The rows of a rollout batch, cut after their last real column."""
    idx = torch.tensor(rows, device=batch.inputs.device)
    targets = batch.targets[idx]
    T = int((targets != IGNORE_INDEX).nonzero()[:, 1].max()) + 1 if (targets != IGNORE_INDEX).any() else 1
    return Batch(batch.inputs[idx, :T], targets[:, :T], extra={k: v[idx, :T] for k, v in batch.extra.items()})


def minibatch_rows(step_prompts_of_rank: list[int], n: int, minibatches: int) -> list[list[int]]:
    """This rank's rollout rows of each minibatch: the prompt at step position q (all n of its
    completions) belongs to minibatch q mod `minibatches`, whatever rank holds it."""
    out: list[list[int]] = [[] for _ in range(minibatches)]
    for local, q in enumerate(step_prompts_of_rank):
        out[q % minibatches] += list(range(local * n, local * n + n))
    return out


def _train(cfg: PPOConfig, d, tok, stop_ids, train_prompts, val_prompts) -> int:
    per_step, n, M = cfg.train.prompts_per_step, cfg.rollout.n, cfg.ppo.minibatches
    if per_step % (d.dp_world * M):
        raise config.ConfigError(f"train.prompts_per_step={per_step} must be a multiple of ranks x ppo.minibatches "
                                 f"= {d.dp_world} x {M}")
    # 2. policy, value, reference, rewards
    amp = resolve_precision(cfg.train.precision, d.device)
    # float32: a separate value model copies the policy and trains whole; `apply_method` casts the frozen base
    policy, model_cfg = load_hf(cfg.model, device=d.device, dtype=torch.float32)
    check_context(train_prompts, val_prompts, cfg.rollout.max_new_tokens, model_cfg.max_seq_len)
    reference_model = copy.deepcopy(policy) if cfg.method == "full" else None
    value_model = None
    if cfg.value.kind == "separate":
        value_model = (load_reward_model(cfg.value.model) if cfg.value.model else None)
        if value_model is None:
            from temper.model.heads import RewardModel

            value_model = RewardModel(copy.deepcopy(policy))
        value_model = value_model.to(d.device).train()
    torch.manual_seed(cfg.run.seed)  # the same adapters and value head on every rank
    apply_method(policy, cfg.method, cfg.lora, amp_dtype=amp)
    model = ActorCritic(policy, value_model).to(d.device)
    actor = Actor(model)  # the policy, called through `model`: what a sharded layout's hooks sit on
    if d.dp_rank:
        torch.manual_seed(cfg.run.seed + d.dp_rank)
    temperature = cfg.rollout.temperature
    reference = reference_policy(actor, reference_model, temperature)
    rewards = build_rewards(cfg.rewards, d.device)
    p = cfg.ppo
    loss_fn = PPOLoss(cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
                      temperature=temperature)
    kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.coef))
    pad = tok.pad_id if tok.pad_id is not None else 0
    order = EpochOrder(len(train_prompts.ids), cfg.run.seed)
    steps = cfg.train.steps
    updates_per_step = p.epochs * M
    total_updates = steps * updates_per_step

    resolved = config.to_dict(cfg) | {"model_config": config.to_dict(model_cfg)}
    run = Run(cfg, d, resolved, resume_keys=RESUME_KEYS)
    train_model = run.wrap(model)
    optimizer = run.build_optimizer(model)  # after the layout: FSDP2 / TP parameters are DTensors
    partial = cfg.method != "full"
    state = run.resume(model, optimizer, trainable_only=partial)
    step = state["step"] if state else 0
    if state:
        run.restore_rng(state)
        kl_ctl.load_state_dict(state["kl_ctl"])
    if d.is_main:
        n_train = sum(t.numel() for t in model.parameters() if t.requires_grad)
        print(f"temper ppo: {cfg.method} policy, {cfg.value.kind} value on {cfg.model}: {n_train:,} of "
              f"{model.num_params():,} parameters train; {len(train_prompts.ids)} train / {len(val_prompts.ids)} "
              f"held-out prompts; {steps} steps of {per_step} prompts x {n}, {p.epochs} epochs x {M} minibatches; "
              f"rewards: {', '.join(f'{w:g} x {name}' for name, w, _ in rewards.parts)}")

    def save(at: int) -> None:
        run.save(at, ckpt.weights_to_save(model, partial), optimizer, kl_ctl=kl_ctl.state_dict())

    def validate() -> dict[str, float]:
        metrics = evaluate_greedy(actor, tok, val_prompts, rewards, cfg.rollout, stop_ids, d)
        return {f"val_{k}": v for k, v in metrics.items()}

    with run:
        logger = run.logging(steps, step, model.flops_per_token(max(len(x) for x in train_prompts.ids)
                                                                + cfg.rollout.max_new_tokens))
        if step == 0 and val_prompts.ids:
            logger.log(0, validate(), kind="val")
        while step < steps:
            run.inject_faults(step)
            # 3. rollouts, scores, reference log-probs and values, rewards, advantages
            globals_ = step_prompts(order, step, per_step, d)
            idx = [order.item(g) for g in globals_]
            outs = rollout(actor, tok, [train_prompts.ids[i] for i in idx], cfg.rollout,
                           seeds=rollout_seeds(cfg.run.seed, globals_, n), stop_ids=stop_ids)
            scores, columns = score(rewards, [train_prompts.records[i] for i in idx], outs, n)
            if p.missing_eos_penalty is not None:
                scores = scores - p.missing_eos_penalty * torch.tensor([float(o.truncated) for o in outs])
            whole = collate_rollouts(outs, pad_id=pad, device=d.device)
            mask = whole.targets != IGNORE_INDEX
            ref_logps, values = torch.zeros(mask.shape, device=d.device), torch.zeros(mask.shape, device=d.device)
            with torch.no_grad():
                for lo in range(0, len(outs), cfg.train.micro_batch_size):
                    rows = list(range(lo, min(lo + cfg.train.micro_batch_size, len(outs))))
                    b = select(whole, rows)
                    T = b.inputs.shape[1]
                    ref_logps[rows, :T] = reference(b)
                    _, v = model(b.inputs, logits_at=b.targets != IGNORE_INDEX)
                    values[rows, :T] = torch.zeros(b.targets.shape, device=d.device).masked_scatter(
                        b.targets != IGNORE_INDEX, v)
            token_rewards, kl = kl_penalized_rewards(whole.extra["old_logps"], ref_logps, scores.to(d.device), mask,
                                                     kl_ctl.value, cfg.kl.estimator)
            if p.whiten_rewards:
                token_rewards = whiten(token_rewards, mask, shift_mean=False, distributed=d.world > 1)
            advantages, returns = gae(token_rewards, values, mask, p.gamma, p.lam)
            advantages = whiten(advantages, mask, distributed=d.world > 1)
            whole.extra |= {"advantages": advantages, "returns": returns, "old_values": values}
            seq_kl = kl.sum(-1)
            explained = float(explained_variance(values, returns, mask, distributed=d.world > 1))
            sums = {"objective/scores": (float(scores.sum()), len(outs)),
                    "objective/kl": (float(seq_kl.sum()), len(outs)),
                    "objective/entropy": (float(-(whole.extra["old_logps"] * mask).sum()), len(outs)),
                    "objective/non_score_reward": (float(-kl_ctl.value * seq_kl.sum()), len(outs)),
                    "objective/rlhf_reward": (float(scores.sum() - kl_ctl.value * seq_kl.sum()), len(outs)),
                    "completion_length": (float(mask.sum()), len(outs)),
                    "truncated": (float(sum(o.truncated for o in outs)), len(outs)),
                    "logp_mismatch": (logprob_mismatch(actor, select(whole, [0]), temperature), 1)}
            sums |= {f"reward/{k}": (float(v.sum()), len(outs)) for k, v in columns.items()}
            stats = global_means(d, sums)
            # 4. epochs of minibatches
            groups = minibatch_rows([g - step * per_step for g in globals_], n, M)
            train_model.train()
            result, lr, update = None, 0.0, step * updates_per_step
            try:
                for epoch in range(p.epochs):
                    for k in np.random.default_rng([cfg.run.seed, step, epoch]).permutation(M):
                        lr = lr_at(update, total_updates, cfg.optim.lr, cfg.schedule)
                        set_lr(optimizer, lr)
                        rows = groups[k]
                        mbs = [select(whole, rows[lo:lo + cfg.train.micro_batch_size])
                               for lo in range(0, len(rows), cfg.train.micro_batch_size)]
                        result = run.step(train_model, optimizer, mbs, loss_fn, update)
                        update += 1
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                state = run.rollback(model, optimizer, trainable_only=partial)
                step = state["step"]
                kl_ctl.load_state_dict(state["kl_ctl"])
                continue
            kl_ctl.update(stats["objective/kl"], per_step * n)
            step += 1
            run.log_train(step, steps, result, lr, kl_coef=kl_ctl.value, **{"val/explained_variance": explained},
                          **stats)
            # 5. held-out prompts, checkpoints
            if (stop := run.after_step(step, steps, save, validate if val_prompts.ids else None)) is not None:
                return stop

    # 6. final/ (a sharded model gathered on rank 0 first)
    exported = run.exported_model()
    if d.is_main:
        final = run.dir / "final"
        export_finetuned(exported.policy, model_cfg, cfg.method, tok, final, cfg.model)
        run.write_report(final)
        print(f"final model: {final}")
    if d.world > 1:
        dist.barrier()
    return 0
