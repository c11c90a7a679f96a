"""`temper grpo`: reinforce a policy with group-relative advantages and verifiable rewards (GRPO).

GRPO (Shao et al. 2024, DeepSeekMath) samples G completions per prompt and uses each one's reward
minus its group's mean (over the group's std, or not: Dr. GRPO, Liu et al. 2025) as the advantage of
every one of its tokens: no value model. With rules that check the answer (align/rewards.py), it is
how chain-of-thought reasoning is trained (DeepSeek-R1). `loss.loss_type=rloo` trains as TRL's RLOOTrainer
(Ahmadian et al. 2024): each reward less the mean of its group's other rewards, one clipped ratio per sequence.

Steps, in the order `run` takes them:
 1. parse the config; read the prompt files (data/prompts.py) and render them with the policy's chat
    template; check that a rule that needs each record's `answer` has it; hold out eval.val_fraction
 2. join the process group when launched by torchrun (DDP; gloo on CPU); load the policy, apply the
    method (full, lora, qlora); the reference (only when loss.beta > 0) is the starting policy: a frozen
    copy, or under LoRA the same weights with the adapters off; build the rewards
 3. each step: this rank's share of the step's prompts (align/online.py), G rollouts each on the engine
    with the sampled tokens' log-probs (align/rollout.py), seeded by (seed, prompt, sample) so resume
    and DDP sample the same; rewards; the reference's log-probs once; group-normalised advantages (rloo:
    leave-one-out, of the rewards less beta x the sampler's summed log-ratio to the reference)
 4. `loss.iterations` optimizer steps on those rollouts (the ratio's "old" policy is the sampler),
    each over micro-batches through `train_step` with `align.rl.GRPOLoss` (or `RLOOLoss`); logged: the loss's
    metrics under TRL's names, reward (total and each component), reward std within groups,
    completion length, the share cut at max_new_tokens, and the gap between the engine's and the
    training forward's log-probs
 5. greedy answers to the held-out prompts, scored (accuracy for a correctness rule), every
    eval.every steps; atomic checkpoints of what trains and the optimizer
 6. final/ (rank 0, a sharded model gathered there first): the merged model in Hugging Face layout with
    the tokenizer, and the adapter in PEFT's format (lora, qlora)

It does not train with a value model (`temper ppo`) or from preference pairs (`temper dpo`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

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
    global_std,
    micro_batches,
    reference_policy,
    rollout_seeds,
    run_on_prompts,
    score,
    step_prompts,
)
from temper.align.rewards import RewardConfig, build_rewards
from temper.align.rl import GRPOLoss, RLOOLoss, group_advantages, leave_one_out_advantages, sequence_kl
from temper.align.rollout import RolloutConfig, logprob_mismatch, rollout
from temper.data.loader import EpochOrder
from temper.train import checkpoint as ckpt
from temper.train.methods import LoRAConfig, apply_method, export_finetuned, load_base
from temper.train.optim import OptimConfig, ScheduleConfig, lr_at, set_lr
from temper.train.run import CheckpointSection, LogSection, Run, RunSection
from temper.train.step import NonFiniteLoss, resolve_precision

RESUME_KEYS = ("model", "method", "data", "rewards", "rollout", "loss", "lora", "train.prompts_per_step",
               "train.micro_batch_size", "train.steps", "optim", "schedule", "run.seed")


@dataclass
class GRPOLossConfig:
    loss_type: Literal["grpo", "dapo", "dr_grpo", "cispo", "sapo", "rloo"] = "grpo"
    """Token normalisation: grpo (each sequence's token mean, then the mean over sequences), dapo (the mean
    over every completion token of the step), dr_grpo (each sequence's token sum / max_new_tokens); cispo
    (MiniMax-M1: the ratio capped at epsilon_high, e.g. 5, and held constant, as dapo) and sapo (a soft gate for
    the clip, as grpo), as TRL's; or rloo (TRL's RLOOTrainer: one ratio per sequence, advantage = reward - the
    mean of the group's other rewards, the KL taken off the reward)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage = (reward - group mean) / group std (group), / the std of the step's rewards on every rank (batch:
    TRL's, after Liu et al. 2025), or without the division (none: Dr. GRPO); rloo's leave-one-out advantages are
    not scaled."""
    beta: float = 0.0
    """Weight of the KL to the reference (k3 estimator, in the loss; rloo: beta x each completion's summed
    log-ratio of sampler to reference, off its reward); 0: no reference is kept or run."""
    epsilon_low: float = 0.2
    """The ratio is clipped below at 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """... and above at 1 + epsilon_high (DAPO's clip-higher: 0.28)."""
    iterations: int = 1
    """Optimizer steps on each batch of rollouts (GRPO's mu); the ratio's old policy is the sampler."""
    sapo_temperature_pos: float = 1.0
    """sapo: the gate's temperature where the advantage is positive."""
    sapo_temperature_neg: float = 1.05
    """sapo: ... and where it is not."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: a ratio per token (GRPO); sequence: each completion's, the exponential of its tokens' mean log-ratio,
    for all of them (GSPO, Zheng et al. 2025; with loss_type grpo and a clip of 3e-4 / 4e-4 in the paper)."""

    def __post_init__(self) -> None:
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0 or self.iterations < 1:
            raise ValueError("beta, epsilon_low and epsilon_high must be >= 0 and iterations >= 1")
        if self.loss_type == "rloo" and self.importance_sampling_level == "sequence":
            raise ValueError("importance_sampling_level=sequence: rloo's ratio is one per sequence already (of its "
                             "summed log-probs); leave it at token")


@dataclass
class GRPOConfig:
    model: str = ""
    """Hugging Face checkpoint directory of the policy (usually an SFT result), e.g. runs/sft/final."""
    method: Literal["full", "lora", "qlora"] = "lora"
    """What trains: every weight, LoRA adapters, or LoRA over an NF4-quantized base."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    """The prompts."""
    rewards: list[RewardConfig] = field(default_factory=list)
    """Weighted rewards: rules ({rule: gsm8k_flexible}) and reward models ({model: DIR}), each with a weight."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling: completions per prompt (the group size), length, temperature, stop strings."""
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    """The objective."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapters."""
    run: RunSection = field(default_factory=lambda: RunSection(name="grpo", seed=0))
    """Where the run lives and how it starts."""
    train: OnlineTrainConfig = field(default_factory=OnlineTrainConfig)
    """Batches and the step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.0))
    """AdamW (TRL's GRPO default lr is 1e-6 full; LoRA takes ~1e-5 .. 1e-4)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0))
    """Learning-rate schedule, over optimizer steps."""
    eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    """Held-out prompts, answered greedily."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""

    def __post_init__(self) -> None:
        if self.rollout.n < 2:
            raise ValueError("rollout.n: GRPO needs at least 2 completions per prompt (advantages are relative "
                             "to the group)")


def main(argv: list[str] | None = None) -> int:
    return run(config.parse(GRPOConfig, argv, prog="grpo"))  # bad input: __main__ prints one line


def run(cfg: GRPOConfig) -> int:
    return run_on_prompts(cfg, _train)  # step 1, then _train


def _train(cfg: GRPOConfig, d, tok, stop_ids, train_prompts, val_prompts) -> int:
    if cfg.train.prompts_per_step % d.dp_world:
        raise config.ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of the "
                                 f"{d.dp_world} data-parallel ranks")
    # 2. the loss (its settings checked before a model loads), policy, method, reference, rewards
    lc, temperature = cfg.loss, cfg.rollout.temperature
    rloo = lc.loss_type == "rloo"
    loss_fn = (RLOOLoss(epsilon_low=lc.epsilon_low, epsilon_high=lc.epsilon_high, temperature=temperature) if rloo
               else GRPOLoss(loss_type=lc.loss_type, epsilon_low=lc.epsilon_low, epsilon_high=lc.epsilon_high,
                             beta=lc.beta, temperature=temperature, max_completion_length=cfg.rollout.max_new_tokens,
                             importance_sampling_level=lc.importance_sampling_level,
                             sapo_temperature_pos=lc.sapo_temperature_pos,
                             sapo_temperature_neg=lc.sapo_temperature_neg))
    amp = resolve_precision(cfg.train.precision, d.device)
    model, model_cfg = load_base(cfg.model, cfg.method, d.device, amp)
    check_context(train_prompts, val_prompts, cfg.rollout.max_new_tokens, model_cfg.max_seq_len)
    reference_model = copy.deepcopy(model) if cfg.method == "full" and cfg.loss.beta > 0 else None
    torch.manual_seed(cfg.run.seed)  # the same adapters on every rank
    apply_method(model, cfg.method, cfg.lora, amp_dtype=amp)
    if d.dp_rank:
        torch.manual_seed(cfg.run.seed + d.dp_rank)
    reference = reference_policy(model, reference_model, temperature) if cfg.loss.beta > 0 else None
    rewards = build_rewards(cfg.rewards, d.device)
    pad = tok.pad_id if tok.pad_id is not None else 0
    order = EpochOrder(len(train_prompts.ids), cfg.run.seed)
    steps, n, per_step = cfg.train.steps, cfg.rollout.n, cfg.train.prompts_per_step
    total_updates = steps * lc.iterations

    resolved = config.to_dict(cfg) | {"model_config": config.to_dict(model_cfg)}
    run = Run(cfg, d, resolved, resume_keys=RESUME_KEYS)
    train_model = run.wrap(model)
    optimizer = run.build_optimizer(model)  # after the layout: FSDP2 / TP parameters are DTensors
    state = run.resume(model, optimizer, trainable_only=cfg.method != "full")
    step = state["step"] if state else 0
    if state:
        run.restore_rng(state)
    if d.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"temper grpo: {lc.loss_type} ({cfg.method}) on {cfg.model}: {n_train:,} of {model.num_params():,} "
              f"parameters train; {len(train_prompts.ids)} train / {len(val_prompts.ids)} held-out prompts; "
              f"{steps} steps of {per_step} prompts x {n} completions, {lc.iterations} update(s) each; "
              f"rewards: {', '.join(f'{w:g} x {name}' for name, w, _ in rewards.parts)}")

    def save(at: int) -> None:
        run.save(at, ckpt.weights_to_save(model, cfg.method != "full"), optimizer)

    def validate() -> dict[str, float]:
        metrics = evaluate_greedy(model, tok, val_prompts, rewards, cfg.rollout, stop_ids, d)
        return {f"val_{k}": v for k, v in metrics.items()}

    with run:
        logger = run.logging(steps, step, model.flops_per_token(cfg.data.max_prompt_length + cfg.rollout.max_new_tokens))
        if step == 0 and val_prompts.ids:
            logger.log(0, validate(), kind="val")
        while step < steps:
            run.inject_faults(step)
            # 3. rollouts, rewards, advantages
            globals_ = step_prompts(order, step, per_step, d)
            idx = [order.item(g) for g in globals_]
            outs = rollout(model, tok, [train_prompts.ids[i] for i in idx], cfg.rollout,
                           seeds=rollout_seeds(cfg.run.seed, globals_, n), stop_ids=stop_ids)
            reward, columns = score(rewards, [train_prompts.records[i] for i in idx], outs, n)
            micro = cfg.train.micro_batch_size
            mbs = micro_batches(outs, micro, pad, d.device)
            if reference is not None:
                for b in mbs:
                    b.extra["ref_logps"] = reference(b)
            sums = {}
            if rloo:  # the KL off the reward, then each reward less the mean of its group's others
                kl = torch.cat([sequence_kl(b) for b in mbs]).cpu() if reference is not None else torch.zeros(len(outs))
                advantages = leave_one_out_advantages(reward - lc.beta * kl, n)
                if reference is not None:
                    sums["kl"] = (float(kl.sum()), sum(len(o.completion) for o in outs))  # per completion token
            else:
                spread = global_std(d, reward) if lc.scale_rewards == "batch" else None
                advantages = group_advantages(reward, n, scale=lc.scale_rewards, batch_std=spread)
            for lo, b in zip(range(0, len(outs), micro), mbs, strict=True):
                b.extra["advantages"] = advantages[lo:lo + micro].to(d.device)
            sums |= {"reward": (float(reward.sum()), len(outs)),
                    "reward_std": (float(reward.view(-1, n).std(-1).sum()), len(idx)),
                    "completion_length": (float(sum(len(o.completion) for o in outs)), len(outs)),
                    "truncated": (float(sum(o.truncated for o in outs)), len(outs)),
                    "logp_mismatch": (logprob_mismatch(model, mbs[0], temperature), 1)}
            sums |= {f"reward/{k}": (float(v.sum()), len(outs)) for k, v in columns.items()}
            stats = global_means(d, sums)
            # 4. updates
            train_model.train()
            result, lr = None, 0.0
            try:
                for it in range(lc.iterations):
                    update = step * lc.iterations + it
                    lr = lr_at(update, total_updates, cfg.optim.lr, cfg.schedule)
                    set_lr(optimizer, lr)
                    result = run.step(train_model, optimizer, mbs, loss_fn, update)
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                step = run.rollback(model, optimizer, trainable_only=cfg.method != "full")["step"]
                continue
            step += 1
            run.log_train(step, steps, result, lr, **stats)
            # 5. held-out prompts, checkpoints
            if (stop := run.after_step(step, steps, save, validate if val_prompts.ids else None)) is not None:
                return stop

    # 6. final/ (a sharded model gathered on rank 0 first)
    exported = run.exported_model()
    if d.is_main:
        final = run.dir / "final"
        export_finetuned(exported, model_cfg, cfg.method, tok, final, cfg.model)
        run.write_report(final)
        print(f"final model: {final}")
    if d.world > 1:
        dist.barrier()
    return 0
