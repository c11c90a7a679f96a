"""`temper dpo`: align a checkpoint to preference pairs with DPO, conservative DPO, IPO, SimPO, ORPO or KTO.

Steps, in the order `run` takes them:
 1. parse the config; load the tokenizer (its chat template renders the prompts)
 2. read the pairs (data/prefs.py): hh-rlhf transcripts, prompt + chosen/rejected messages, or
    LLaMA-Factory records -> prompt, chosen and rejected token ids, learnt on the responses only;
    or, for KTO only, unpaired examples (TRL's prompt, completion, label records; a look at the
    first record refuses them with any other loss before anything loads), each trained once with
    its own label; hold out `val_fraction` of them by a hash of their index and the seed
 3. `--check`: print pairs with the learnt tokens of both sides marked, and stop
 4. join the process group when launched by torchrun (DDP; gloo on CPU); load the policy and apply
    the method (full, lora, qlora); the reference policy is the starting model: under LoRA the same
    weights with the adapters off (no second copy), under full fine-tuning a frozen copy, or, with
    `loss.reference=precomputed`, its log-probs computed once before the first step (SimPO and ORPO
    need none)
 5. batches: each epoch, the pairs in a seeded order; a step's pairs are dealt to the ranks
    (loader.rank_slice), each micro-batch one row per pair: its prompt once, then the chosen and the
    rejected response (`collate_pairs_shared`), scored as its 2P chosen then rejected sequences, so
    the loss is normalised over all the step's pairs on all ranks (unpaired data: examples stand
    for pairs, a micro-batch being its examples' rows then their KL rows, TRL's mismatched pairs)
 6. the loop: learning-rate schedule, `train_step` with `align.preference.PreferenceLoss`, TRL's
    metrics (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps), the
    held-out loss and reward accuracy, atomic checkpoints of what trains (and the optimizer)
 7. final/ (rank 0 writes it, a sharded model gathered there first): the merged model in Hugging Face
    layout with the tokenizer files, plus the adapter in PEFT's format (lora, qlora)

It does not train reward models (`temper reward`) or sample (`temper generate`, PPO and GRPO).
"""

from __future__ import annotations

import copy
import math
import sys
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
from temper.align.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    KTOLoss,
    PreferenceLoss,
    adapters_off_reference,
    as_batch,
    frozen_reference,
)
from temper.data.loader import EpochOrder
from temper.data.prefs import (
    PrefDataConfig,
    UnpairedExample,
    collate_kto,
    collate_pairs,
    collate_pairs_shared,
    collate_unpaired,
    collate_unpaired_shared,
    is_unpaired_data,
)
from temper.data.tokenizer import HFTokenizer
from temper.train import checkpoint as ckpt
from temper.train.losses import Batch
from temper.train.methods import LoRAConfig, apply_method, export_finetuned, load_base
from temper.train.optim import OptimConfig, ScheduleConfig, lr_at, set_lr
from temper.train.parallel import DistInfo
from temper.train.run import (
    CheckpointSection,
    LogSection,
    Run,
    RunSection,
)
from temper.train.step import NonFiniteLoss, eval_metrics, resolve_precision


@dataclass
class LossConfig:
    kind: Literal["sigmoid", "ipo", "simpo", "orpo", "kto", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm"] = "sigmoid"
    """sigmoid (DPO; cDPO with label_smoothing), ipo, simpo (reference-free), orpo (reference-free, with SFT loss),
    kto (each pair as a desirable and an undesirable example, or unpaired prompt/completion/label examples); and
    TRL's other DPO loss types, each with the reference: hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard,
    apo_zero, apo_down, discopop, sigmoid_norm (align/preference.py)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (ORPO: weight of the odds-ratio term)."""
    label_smoothing: float = 0.0
    """Assumed rate of flipped labels (conservative DPO: sigmoid and simpo; robust; exo_pair's epsilon)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature."""
    reference: Literal["model", "precomputed"] = "model"
    """The reference's log-probs: computed alongside every step, or once for every pair before training (not kto)."""
    desirable_weight: float = 1.0
    """KTO's weight of the desirable examples' loss."""
    undesirable_weight: float = 1.0
    """KTO's weight of the undesirable examples' loss."""

    def __post_init__(self) -> None:
        if self.kind == "kto" and self.reference == "precomputed":
            raise ValueError("reference=precomputed does not apply to kto: its KL rows pair each prompt with another "
                             "example's response in the same micro-batch")


@dataclass
class DPOConfig:
    model: str = ""
    """Hugging Face checkpoint directory to align (usually an SFT result), e.g. runs/sft/final."""
    method: Literal["full", "lora", "qlora"] = "lora"
    """What trains: every weight, LoRA adapters, or LoRA over an NF4-quantized base."""
    check: bool = False
    """Print tokenized pairs with the learnt tokens marked, then stop."""
    data: PrefDataConfig = field(default_factory=PrefDataConfig)
    """The preference pairs and how they are rendered."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective and its reference."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA adapters."""
    run: RunSection = field(default_factory=lambda: RunSection(name="dpo", seed=0))
    """Where the run lives and how it starts."""
    train: PairTrainConfig = field(default_factory=PairTrainConfig)
    """Batches and the step."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, weight_decay=0.0))
    """AdamW (DPO's learning rates are small: 5e-7 .. 5e-6 full, ~5e-5 LoRA)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    """Learning-rate schedule."""
    eval: PairEvalConfig = field(default_factory=PairEvalConfig)
    """Validation."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""


NEEDS_REFERENCE = tuple(k for k in (*PREFERENCE_LOSSES, "kto") if k not in REFERENCE_FREE)


def main(argv: list[str] | None = None) -> int:
    return run(config.parse(DPOConfig, argv, prog="dpo"))  # bad input: __main__ prints one line


def run(cfg: DPOConfig) -> int:
    check_unpaired(cfg, is_unpaired_data(cfg.data))  # by the first record, before the tokenizer loads
    return run_on_pairs(cfg, _train)  # steps 1-3, then _train


def check_unpaired(cfg: DPOConfig, unpaired: bool) -> None:
    """Unpaired examples train only with KTO, whose KL rows need a second example in each micro-batch
    (with one, TRL refuses too: the KL estimate would be the example's own log-ratio)."""
    if not unpaired:
        return
    if cfg.loss.kind != "kto":
        raise config.ConfigError(f"loss.kind={cfg.loss.kind}: the data is unpaired examples (prompt, completion, "
                                 "label), which only loss.kind=kto trains on; give pairs (chosen, rejected) for "
                                 f"{cfg.loss.kind}")
    if cfg.train.micro_batch_size < 2:
        raise config.ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size}: kto on unpaired examples "
                                 "needs at least 2 per micro-batch, since each prompt's KL row takes another "
                                 "example's completion")


def kto_balance_warning(n_desirable: int, n_undesirable: int, desirable_weight: float,
                        undesirable_weight: float) -> str:
    """A warning ("" for none) when w_D n_D / (w_U n_U) is outside [1, 4/3], the range the KTO paper
    recommends (Ethayarajh et al. 2024, eq. 8), with the weights that would bring it in, as TRL's."""
    if not n_desirable or not n_undesirable:
        kind = "desirable" if n_desirable else "undesirable"
        return (f"all {n_desirable + n_undesirable} training examples are {kind}: KTO's other term has nothing "
                "to learn from")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return ""
    d_lo = undesirable_weight * n_undesirable / n_desirable
    u_hi = desirable_weight * n_desirable / n_undesirable
    return (f"desirable_weight x {n_desirable} desirable / (undesirable_weight x {n_undesirable} undesirable) = "
            f"{ratio:.3g}, outside the [1, 4/3] the KTO paper recommends: set EITHER loss.desirable_weight in "
            f"[{d_lo:.3g}, {d_lo * 4 / 3:.3g}] OR loss.undesirable_weight in [{u_hi * 3 / 4:.3g}, {u_hi:.3g}]")


def _train(cfg: DPOConfig, d: DistInfo, tok: HFTokenizer, stats, train_pairs: list, val_pairs: list) -> int:
    unpaired = isinstance(train_pairs[0], UnpairedExample)  # as `run` found (the files hold one kind)
    unit = "examples" if unpaired else "pairs"
    if unpaired and d.is_main:
        n_good = sum(e.label for e in train_pairs)
        print(f"temper dpo: kto on unpaired examples: {n_good} desirable, {len(train_pairs) - n_good} undesirable "
              f"in training")
        warning = kto_balance_warning(n_good, len(train_pairs) - n_good, cfg.loss.desirable_weight,
                                      cfg.loss.undesirable_weight)
        if warning:
            print(f"temper dpo: warning: {warning}", file=sys.stderr)

    # 4. the loss (its settings checked before a model loads), policy, method and reference
    lc = cfg.loss
    loss_fn = (KTOLoss(lc.beta, lc.desirable_weight, lc.undesirable_weight) if lc.kind == "kto" else
               PreferenceLoss(lc.kind, lc.beta, lc.label_smoothing, lc.simpo_gamma, lc.discopop_tau))
    amp = resolve_precision(cfg.train.precision, d.device)
    model, model_cfg = load_base(cfg.model, cfg.method, d.device, amp)
    reference_model = copy.deepcopy(model) if cfg.method == "full" and cfg.loss.kind in NEEDS_REFERENCE else None
    torch.manual_seed(cfg.run.seed)  # the same adapters on every rank
    apply_method(model, cfg.method, cfg.lora, amp_dtype=amp)
    if d.dp_rank:
        torch.manual_seed(cfg.run.seed + d.dp_rank)
    if cfg.loss.kind in NEEDS_REFERENCE:
        loss_fn.reference = (frozen_reference(reference_model) if reference_model is not None
                             else adapters_off_reference(model))
    pad = tok.pad_id if tok.pad_id is not None else 0

    # 5. batches of pairs: pair g of training is a function of (seed, g)
    order = EpochOrder(len(train_pairs), cfg.run.seed)
    micro, accum = cfg.train.micro_batch_size, cfg.train.accumulation
    per_step = micro * accum * d.dp_world  # pairs per optimizer step, over all ranks
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * len(train_pairs) / per_step))

    def batch(source: list, idx: list[int], ref: torch.Tensor | None) -> Batch:
        b = _batch(source, idx or [0], ref)  # no pairs: a void batch of pair 0 (align.pairs.val_batches)
        b.extra |= void(idx)
        return b

    def _batch(source: list, idx: list[int], ref: torch.Tensor | None) -> Batch:
        examples = [source[i] for i in idx]
        if unpaired:  # n examples with their labels, then their n mismatched KL rows
            b, label = collate_kto(examples, pad_id=pad)
            return Batch(b.inputs.to(d.device), b.targets.to(d.device), extra={"label": label.to(d.device)})
        shared = model_cfg.branches_share_rows  # else (linear attention) a row per sequence, in the same order
        if cfg.loss.kind == "kto":  # 2P examples (chosen desirable), then their 2P mismatched KL rows
            b = (collate_unpaired_shared if shared else collate_unpaired)(examples, pad_id=pad)  # see collate_pairs_shared
            label = torch.arange(2 * len(idx)) < len(idx)
            return as_batch(b, d.device, {"label": label.to(d.device)})
        b = (collate_pairs_shared if shared else collate_pairs)(examples, pad_id=pad)  # per pair its prompt once (shared)
        extra = {}
        if ref is not None:  # (n, 2) per pair: chosen, rejected -> (2P,) in the batch's row order
            r = ref[idx]
            extra["ref_logps"] = torch.cat([r[:, 0], r[:, 1]]).to(d.device)
        return as_batch(b, d.device, extra)

    def precompute(source: list) -> torch.Tensor | None:
        """(n, 2) reference log-probs of every pair, once (loss.reference=precomputed)."""
        if cfg.loss.reference != "precomputed" or loss_fn.reference is None or not source:
            return None
        out = []
        for lo in range(0, len(source), micro):
            idx = list(range(lo, min(lo + micro, len(source))))
            logps = loss_fn.reference(batch(source, idx, None))
            out.append(torch.stack(logps.chunk(2), dim=1).cpu())
        return torch.cat(out)

    train_ref, val_ref = precompute(train_pairs), precompute(val_pairs)
    if train_ref is not None:  # the reference is no longer needed: free a full run's second copy
        loss_fn.reference = reference_model = None

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
        print(f"temper dpo: {cfg.loss.kind} ({cfg.method}) on {cfg.model}: {n_train:,} of {model.num_params():,} "
              f"parameters train; {len(train_pairs)} train / {len(val_pairs)} val {unit}, {steps} steps of "
              f"{per_step} {unit} ({micro} x {accum} accum x {d.dp_world} ranks), {run.amp_dtype}; {stats.truncated} {unit} "
              f"truncated ({stats.prompt_tokens_cut} prompt, {stats.response_tokens_cut} response tokens cut)")
    def label_counts(first: int) -> dict[str, float]:
        """The labels of the step's examples on all ranks (those from global index `first` on)."""
        good = sum(train_pairs[order.item(g)].label for g in range(first, first + per_step))
        return {"count/desirable": good, "count/undesirable": per_step - good}

    def save(at: int) -> None:
        run.save(at, ckpt.weights_to_save(model, cfg.method != "full"), optimizer)

    def validate() -> dict[str, float]:
        """Loss and metrics over every held-out pair (`align.pairs.val_batches` deals them to the ranks)."""
        mbs = [batch(val_pairs, idx, val_ref) for idx in val_batches(len(val_pairs), micro, d)]
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
            mbs = [batch(train_pairs, idx, train_ref) for idx in step_pairs(order, step, micro, accum, d)]
            try:
                result = run.step(train_model, optimizer, mbs, loss_fn, step)
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                step = run.rollback(model, optimizer, trainable_only=cfg.method != "full")["step"]
                continue
            step += 1
            run.log_train(step, steps, result, lr, epoch=first / max(len(train_pairs), 1),
                          **(label_counts(first) if unpaired else {}))
            if (stop := run.after_step(step, steps, save, validate if val_pairs else None)) is not None:
                return stop

    # 7. final/ (a sharded model gathered on rank 0 first)
    exported = run.exported_model()
    if d.is_main:
        final = run.dir / "final"
        export_finetuned(exported, model_cfg, cfg.method, tok, final, cfg.model)
        run.write_report(final)
        print(f"final model: {final}")
    if d.world > 1:
        dist.barrier()
    return 0
