"""`temper reward`: train a reward model on preference pairs: a decoder with a scalar head, Bradley-Terry loss.

Steps, in the order `run` takes them:
 1. parse the config; load the tokenizer (its chat template renders the prompts)
 2. read the pairs (data/prefs.py): hh-rlhf transcripts, prompt + chosen/rejected messages, or
    LLaMA-Factory records -> prompt, chosen and rejected token ids; hold out `val_fraction` of them by
    a hash of their index and the seed
 3. `--check`: print pairs as the model will read them, and stop
 4. join the process group when launched by torchrun (DDP; gloo on CPU); load the decoder, put a
    scalar head on its final hidden states (model/heads.py RewardModel), read at each sequence's last
    token, and apply the method: full (every weight) or lora (adapters on the decoder; the head
    always trains)
 5. batches: each epoch, the pairs in a seeded order; a step's pairs are dealt to the ranks
    (loader.rank_slice), each micro-batch the chosen rows of its pairs then the rejected ones
 6. the loop: learning-rate schedule, `train_step` with `align.preference.RewardLoss` (margin-free
    Bradley-Terry, optional reward centering), the pairwise accuracy and mean margin on the training
    and held-out pairs, atomic checkpoints of what trains (and the optimizer)
 7. final/ (rank 0 writes it, a sharded model gathered there first): the reward model in Hugging Face's
    `*ForSequenceClassification` layout (one label, `score.weight`), which `transformers` loads and
    `model.heads.load_reward_model` reads back

It does not optimise a policy against the reward (`temper dpo`; PPO and best-of-n sample with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from temper import config
from temper.align.pairs import (
    RESUME_KEYS,
    IgnoreVoid,
    PairEvalConfig,
    PairTrainConfig,
    run_on_pairs,
    step_pairs,
    val_batches,
    void,
)
from temper.align.preference import RewardLoss
from temper.data.loader import EpochOrder
from temper.data.prefs import (
    PrefDataConfig,
    collate_pairs,
    is_unpaired_data,
)
from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer
from temper.model.heads import RewardModel
from temper.model.hf.checkpoint import save_hf
from temper.model.lora import merge_lora
from temper.train import checkpoint as ckpt
from temper.train.losses import Batch
from temper.train.methods import LoRAConfig, apply_method, load_base
from temper.train.optim import OptimConfig, ScheduleConfig, lr_at, set_lr
from temper.train.parallel import (
    DistInfo,
)
from temper.train.run import (
    CheckpointSection,
    LogSection,
    Run,
    RunSection,
)
from temper.train.step import NonFiniteLoss, eval_metrics, resolve_precision


@dataclass
class LossConfig:
    center_coef: float = 0.0
    """Reward centering (Eisenstein et al. 2023): + coef * (r_chosen + r_rejected)^2 keeps scores near 0; TRL uses 0.01."""


@dataclass
class RewardConfig:
    model: str = ""
    """Hugging Face checkpoint directory of the decoder to start from (usually an SFT result), e.g. runs/sft/final."""
    method: Literal["full", "lora"] = "full"
    """What trains besides the score head: every weight, or LoRA adapters on the decoder."""
    check: bool = False
    """Print tokenized pairs, then stop."""
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    """The preference pairs and how they are rendered."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The Bradley-Terry loss."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (method=lora)."""
    run: RunSection = field(default_factory=lambda: RunSection(name="reward", seed=0))
    """Where the run lives and how it starts."""
    train: PairTrainConfig = field(default_factory=PairTrainConfig)
    """Batches and the step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0))
    """AdamW (reward models train ~1 epoch at 1e-5 .. 1e-6 full, ~1e-4 LoRA)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    """Learning-rate schedule."""
    eval: PairEvalConfig = field(default_factory=PairEvalConfig)
    """Validation."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""


def main(argv: list[str] | None = None) -> int:
    return run(config.parse(RewardConfig, argv, prog="reward"))  # bad input: __main__ prints one line


def run(cfg: RewardConfig) -> int:
    if is_unpaired_data(cfg.data):  # by the first record, before anything loads
        raise config.ConfigError("data.files: the data is unpaired examples (prompt, completion, label), which only "
                                 "`temper dpo --loss.kind=kto` trains on; a reward model needs pairs (chosen, rejected)")
    return run_on_pairs(cfg, _train)  # steps 1-3, then _train


def _train(cfg: RewardConfig, d: DistInfo, tok: HFTokenizer, stats, train_pairs: list, val_pairs: list) -> int:
    # 4. the reward model and method
    amp = resolve_precision(cfg.train.precision, d.device)
    backbone, model_cfg = load_base(cfg.model, cfg.method, d.device, amp)
    torch.manual_seed(cfg.run.seed)  # the same head and adapters on every rank
    model = RewardModel(backbone).to(d.device)
    apply_method(backbone, cfg.method, cfg.lora, amp_dtype=amp)
    model.head.requires_grad_(True)  # the head always trains, LoRA or not
    if d.dp_rank:
        torch.manual_seed(cfg.run.seed + d.dp_rank)
    loss_fn = RewardLoss(cfg.loss.center_coef)
    pad = tok.pad_id if tok.pad_id is not None else 0

    # 5. batches of pairs: pair g of training is a function of (seed, g)
    order = EpochOrder(len(train_pairs), cfg.run.seed)
    micro, accum = cfg.train.micro_batch_size, cfg.train.accumulation
    per_step = micro * accum * d.dp_world  # pairs per optimizer step, over all ranks
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * len(train_pairs) / per_step))

    def batch(source: list, idx: list[int]) -> Batch:
        b = collate_pairs([source[i] for i in idx or [0]], pad_id=pad)  # chosen rows, then rejected
        last = (b.lengths - 1).clamp(min=0)  # each row's last real token: its end-of-turn
        return Batch(b.inputs.to(d.device), b.targets.to(d.device), extra={"last": last.to(d.device)} | void(idx))

    # 6. the loop, on the scaffold every training recipe shares
    resolved = config.to_dict(cfg) | {"model_config": config.to_dict(model_cfg), "steps": steps,
                                      "pairs_per_step": per_step}
    run = Run(cfg, d, resolved, resume_keys=RESUME_KEYS)
    train_model = run.wrap(model)
    optimizer = run.build_optimizer(model)  # after the layout: FSDP2 / TP parameters are DTensors
    state = run.resume(model, optimizer, trainable_only=cfg.method != "full")
    step = state["step"] if state else 0
    if state:
        run.restore_rng(state)
    if d.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"temper reward: {cfg.method} on {cfg.model}: {n_train:,} of {model.num_params():,} "
              f"parameters train; {len(train_pairs)} train / {len(val_pairs)} val pairs, {steps} steps of "
              f"{per_step} pairs ({micro} x {accum} accum x {d.dp_world} ranks), {run.amp_dtype}; {stats.truncated} pairs "
              f"truncated ({stats.prompt_tokens_cut} prompt, {stats.response_tokens_cut} response tokens cut)")

    def save(at: int) -> None:
        run.save(at, ckpt.weights_to_save(model, cfg.method != "full"), optimizer)

    def validate() -> dict[str, float]:
        """Loss and metrics over every held-out pair (`align.pairs.val_batches` deals them to the ranks)."""
        mbs = [batch(val_pairs, idx) for idx in val_batches(len(val_pairs), micro, d)]
        metrics = eval_metrics(model, mbs, run.amp_dtype, IgnoreVoid(loss_fn), d.dp_group)
        return {f"val_{k}": v for k, v in metrics.items()}

    with run:
        logger = run.logging(steps, step, model.flops_per_token(cfg.data.max_length))
        if step == 0 and val_pairs:
            logger.log(0, validate(), kind="val")
        train_model.train()
        while step < steps:
            run.inject_faults(step)
            lr = lr_at(step, steps, cfg.optim.lr, cfg.schedule)
            set_lr(optimizer, lr)
            first = step * per_step
            mbs = [batch(train_pairs, idx) for idx in step_pairs(order, step, micro, accum, d)]
            try:
                result = run.step(train_model, optimizer, mbs, loss_fn, step)
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                step = run.rollback(model, optimizer, trainable_only=cfg.method != "full")["step"]
                continue
            step += 1
            run.log_train(step, steps, result, lr, epoch=first / max(len(train_pairs), 1))
            if (stop := run.after_step(step, steps, save, validate if val_pairs else None)) is not None:
                return stop

    # 7. final/ (a sharded model gathered on rank 0 first)
    exported = run.exported_model()
    if d.is_main:
        final = run.dir / "final"
        export_reward_model(exported, model_cfg, tok, final)
        run.write_report(final)
        print(f"final model: {final}")
    if d.world > 1:
        dist.barrier()
    return 0


def export_reward_model(model: RewardModel, model_cfg, tok: HFTokenizer, final) -> None:
    """final/: the decoder (adapters merged) and the score head as one-label `*ForSequenceClassification`,
    which scores each row at its last token that is not `pad_token_id`, with the tokenizer files."""
    gen = {k: v for k, v in (("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)) if v is not None}
    save_hf(merge_lora(model.backbone), model_cfg, final, generation_config=gen, score=model.head.score.weight)
    save_hf_tokenizer(tok, final)
