"""`temper distill`: train a smaller student on a teacher's next-token distributions (knowledge distillation).

Steps, in the order `run` takes them:
 1. parse the config; open the teacher (config.json and tokenizer, no weights yet); the student's
    tokenizer (student.from) and the data's (data.dir) must be the teacher's: the same vocabulary,
    token for token, since the losses compare distributions id by id
 2. data: pretraining windows of prepared shards (data.dir, as `temper pretrain`), or SFT examples
    (data.files, as `temper sft`: rendered with the teacher's tokenizer, learnt on the responses only,
    `eval.val_fraction` held out by hash, packed with document masks)
 3. join the process group when launched by torchrun (DDP; gloo on CPU); the student: a Hugging Face
    checkpoint, a temper training checkpoint (step-N) or run (student.from, `open_student`), or
    `student.preset` + `student.model` from scratch (seeded as `temper pretrain` seeds it, so both start
    alike); the teacher frozen, its weights in the run's precision (it never trains)
 4. the teacher's distributions: computed on the fly inside the loss (no_grad), or, with teacher.cache,
    its top-k log-probs written once to <run>/teacher_cache (align/topk_cache.py) for every unit of the
    data (a window, an example), reused by every epoch and by a resumed run, and the teacher freed
 5. the loop on the scaffold every training recipe shares: lr -> this rank's micro-batches (with their
    cached top-k) -> `train_step` with `align.distill.DistillLoss` (alpha * divergence + (1 - alpha) * CE;
    logged as loss, kl or jsd, ce) -> validation: the student's cross-entropy on held-out data (val_loss,
    the number `temper pretrain` and `temper sft` report) and, with a resident teacher, val_kl / val_jsd;
    checkpoints, SIGTERM
 6. final/ (rank 0, a sharded model gathered there first): the full student in Hugging Face layout with the teacher's tokenizer files

On-policy distillation (GKD, Agarwal et al. 2024; TRL's GKDTrainer `lmbda`): with probability
on_policy.lmbda a step's responses are the student's own samples instead of the data's. Each row's prompt
(an SFT example up to its last learnt span, or a window's first on_policy.prompt_tokens tokens) is
continued by `infer.engine.generate` with a seed per global row, the teacher scores those tokens and the
step takes the divergence alone (cross-entropy on the student's own samples would only reinforce them).
The coin and the seeds are functions of (run.seed, step, row), so a resumed run and any world size
sample alike; with lmbda = 0 nothing is drawn and the run is the off-policy one.

It does not train the teacher (`temper pretrain`, `temper sft`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from temper import config
from temper.align.distill import DistillLoss
from temper.align.topk_cache import TopKCache, build_cache, fingerprint, open_cache
from temper.data.loader import TokenWindows, rank_slice, split_holdout
from temper.data.packing import Piece, collate_rows, plan_packing
from temper.data.sft import (
    RowOrder,
    SFTDataConfig,
    SFTExample,
    SFTStats,
    check_examples,
    format_report,
    load_sft_examples,
    skip_summary,
)
from temper.data.shards import read_manifest, tokenizer_path
from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer, load_tokenizer
from temper.errors import InputError
from temper.infer.engine import generate
from temper.infer.load import Checkpoint, checkpoint_dir, open_checkpoint
from temper.model.attention import Segments
from temper.model.config import PRESETS, ModelConfig
from temper.model.transformer import Transformer
from temper.train import checkpoint as ckpt
from temper.train.losses import IGNORE_INDEX, Batch, LMLoss
from temper.train.methods import export_finetuned
from temper.train.optim import OptimConfig, ScheduleConfig, lr_at, set_lr
from temper.train.parallel import (
    DistInfo,
    init_distributed,
    shutdown_distributed,
)
from temper.train.run import (
    CheckpointSection,
    EvalSection,
    LogSection,
    Run,
    RunSection,
    TrainSection,
    locked_run_dir,
    run_directory,
)
from temper.train.step import NonFiniteLoss, autocast, eval_metrics

CACHE_DIR = "teacher_cache"


@dataclass
class TeacherSection:
    path: str = ""
    """Teacher checkpoint: a Hugging Face directory or a temper run directory (its final/)."""
    cache: bool = False
    """Write the teacher's top-k log-probs once to <run>/teacher_cache and train from them (every epoch, and on
    resume) instead of running the teacher on every step; the teacher is then not kept in memory."""
    top_k: int = 32
    """Ids cached per position (k x 6 bytes per token in float16)."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    """Precision of the cached log-probs."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class StudentSection:
    from_: str = ""
    """Start from these weights: a Hugging Face directory, a temper training checkpoint (a run's
    checkpoints/step-NNNNNNN/, its shape from the checkpoint's stored config), or a temper run directory (its
    final/, or without one its newest checkpoint); empty: a random init of `preset`."""
    preset: str = "debug"
    """Model shape from temper.model.config.PRESETS when starting from scratch."""
    model: dict = field(default_factory=dict)
    """Overrides of the preset's ModelConfig fields, e.g. {dim: 256, n_layers: 4}; vocab_size is the teacher's."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.from_ and self.model:
            raise ValueError("model overrides apply to a student from scratch; student.from fixes the shape")


@dataclass
class OnPolicySection:
    lmbda: float = 0.0
    """Probability that a step trains on the student's own samples instead of the data's responses (GKD's
    lambda, TRL's `lmbda`), drawn per step from (run.seed, step); 0: off, the data's tokens only."""
    temperature: float = 1.0
    """Sampling temperature of the student's responses (1: its own distribution; 0: greedy)."""
    max_new_tokens: int = 0
    """Tokens sampled per response, at most to the end of the row (0: up to the end of the row, train.seq_len)."""
    prompt_tokens: int = 0
    """data.dir only: the first this many tokens of each window are the prompt (0: half the window)."""

    def __post_init__(self) -> None:
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}")
        if self.temperature < 0 or self.max_new_tokens < 0 or self.prompt_tokens < 0:
            raise ValueError("temperature, max_new_tokens and prompt_tokens must be >= 0")


@dataclass
class LossConfig:
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); jsd: generalised JSD (GKD)."""
    beta: float = 0.5
    """jsd only: the teacher's weight in the mixture, 0 < beta < 1 (TRL's beta)."""
    temperature: float = 1.0
    """Softens both distributions (logits / temperature) in the divergence; the CE uses the raw logits."""
    alpha: float = 0.5
    """Weight of the divergence; 1 - alpha weighs the hard-label cross-entropy (on-policy steps: the divergence alone)."""
    chunk: int = 0
    """Positions per chunk of both models' output layers and the loss (0: from the vocabulary, about 256 MiB of
    float32 logits); the full (tokens x vocabulary) logits are never held."""

    def __post_init__(self) -> None:
        DistillLoss(self.kind, self.beta, self.temperature, self.alpha, chunk=self.chunk)  # its checks, named here


@dataclass
class DataConfig(SFTDataConfig):
    dir: str = ""
    """Pretraining data: a directory written by `temper prepare` (manifest.json, shards, tokenizer.json).
    Give it, or SFT `files` (rendered with the teacher's tokenizer), not both."""
    order: Literal["random", "sequential"] = "sequential"
    """data.dir only: sequential (each non-overlapping window once per epoch, shuffled; needed by teacher.cache)
    or random (windows at hashed offsets, as pretrain's default)."""
    verify: bool = True
    """data.dir only: check every shard's sha256 against the manifest before training."""


@dataclass
class TrainConfig(TrainSection):
    steps: int = 0
    """Optimizer steps (0: from epochs)."""
    epochs: float = 1.0
    """Passes over the training windows or examples (unless `steps` is set)."""
    accumulation: int = 1
    """Micro-batches per optimizer step, on each rank: a step is micro_batch_size x accumulation x ranks rows."""
    seq_len: int = 0
    """Tokens per row (0: the student's max_seq_len for data.dir, data.max_length for SFT files)."""
    pack: bool = True
    """SFT files: pack several examples per row (document masks keep them apart)."""


@dataclass
class EvalConfig(EvalSection):
    val_fraction: float = 0.05
    """SFT files: share of the examples held out (by a hash of the position and the seed); every held-out row
    is scored. data.dir: the prepared `val` split, `batches` micro-batches of it."""


@dataclass
class DistillConfig:
    teacher: TeacherSection = field(default_factory=TeacherSection)
    """The model distilled from, and whether its top-k log-probs are cached."""
    student: StudentSection = field(default_factory=StudentSection)
    """The model trained."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The divergence and its mix with the hard labels."""
    on_policy: OnPolicySection = field(default_factory=OnPolicySection)
    """GKD: steps on the student's own samples."""
    data: DataConfig = field(default_factory=DataConfig)
    """Pretraining shards, or SFT files and how they are rendered."""
    run: RunSection = field(default_factory=lambda: RunSection(name="distill"))
    """Where the run lives and how it starts."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches and the step."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Metrics and progress."""


# What must match between a checkpoint and the run that resumes from it.
RESUME_KEYS = ("teacher", "student", "loss", "on_policy", "data", "train.micro_batch_size", "train.epochs", "train.accumulation",
               "train.seq_len", "train.pack", "train.steps", "train.label_smoothing", "optim", "schedule", "model",
               "steps", "seq_len", "rows_per_step", "run.seed")


def main(argv: list[str] | None = None) -> int:
    return run(config.parse(DistillConfig, argv, prog="distill"))  # bad input: __main__ prints one line


def check_same_tokenizer(key: str, where: str | Path, vocab: dict[str, int], teacher_vocab: dict[str, int],
                         teacher: Path) -> None:
    """ConfigError naming `key` unless `vocab` is the teacher's, token for token."""
    if vocab == teacher_vocab:
        return
    differ = sum(vocab.get(t) != i for t, i in teacher_vocab.items()) + len(vocab.keys() - teacher_vocab.keys())
    raise config.ConfigError(
        f"{key} {where}: its tokenizer is not the teacher's ({teacher}): {differ} of {len(teacher_vocab)} tokens "
        f"differ or are missing; distillation compares next-token distributions id by id, so both need one tokenizer")


def run(cfg: DistillConfig) -> int:
    if not cfg.teacher.path:
        raise config.ConfigError("teacher.path: give the teacher's checkpoint (a Hugging Face directory or a run)")
    if bool(cfg.data.dir) == bool(cfg.data.files):
        raise config.ConfigError("data: give pretraining shards (data.dir) or SFT files (data.files), one of the two")
    if cfg.on_policy.lmbda > 0 and cfg.teacher.cache:
        raise config.ConfigError("on_policy.lmbda > 0 needs the teacher on the fly (teacher.cache=false): a cache "
                                 "holds the teacher's distributions on the data's tokens, not on the student's samples")
    run_dir = run_directory(cfg.run)  # a bad run.name fails before anything loads
    # 1. the teacher's shape and tokenizer, then every other tokenizer against it, before any weights
    teacher = open_checkpoint(cfg.teacher.path)
    tok = teacher.tokenizer
    teacher_vocab = tok.tokenizer.get_vocab()
    student = None
    if cfg.student.from_:
        student = open_student(cfg.student.from_)
        where = student.path if student.hf else f"{student.path} (the tokenizer of its run, {student.tokenizer_from})"
        check_same_tokenizer("student.from", where, student.vocab, teacher_vocab, teacher.path)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise config.ConfigError(f"student.from {student.path}: vocab_size {student.config.vocab_size} differs from "
                                     f"the teacher's {teacher.config.vocab_size}: their logits must have one size")
    if cfg.teacher.top_k > teacher.config.vocab_size:
        raise config.ConfigError(f"teacher.top_k={cfg.teacher.top_k} exceeds the vocabulary ({teacher.config.vocab_size})")
    # 2. data
    examples: tuple[list[SFTExample], list[SFTExample]] | None = None
    if cfg.data.dir:
        manifest = read_manifest(cfg.data.dir)
        data_vocab = load_tokenizer(tokenizer_path(cfg.data.dir, manifest)).get_vocab()
        check_same_tokenizer("data.dir", cfg.data.dir, data_vocab, teacher_vocab, teacher.path)
        if cfg.teacher.cache and cfg.data.order != "sequential":
            raise config.ConfigError("teacher.cache needs data.order=sequential: the cache holds one teacher pass per "
                                     "window, and random order draws windows at any offset")
    else:
        examples = _sft_examples(cfg, tok)
        if examples is None:
            return 1
    with locked_run_dir(run_dir):  # a second process on this run directory is refused
        d = init_distributed(cfg.run.device, cfg.train.parallel)
        try:
            return _train(cfg, d, teacher, student, examples)
        finally:
            shutdown_distributed()


def _sft_examples(cfg: DistillConfig, tok: HFTokenizer) -> tuple[list[SFTExample], list[SFTExample]] | None:
    """(train, held-out) SFT examples, rendered with the teacher's tokenizer; None (after printing why) when
    the checker fails."""
    stats = SFTStats()
    examples = load_sft_examples(cfg.data, tok, stats)
    if stats.skipped:
        print(f"temper distill: {skip_summary(stats)}", file=sys.stderr)
    report = check_examples(examples, tok, max_length=cfg.data.max_length, stats=stats)
    if not report.ok:
        print(format_report(report), file=sys.stderr)
        return None
    train, val = split_holdout(examples, cfg.eval.val_fraction, cfg.run.seed)
    if not train:
        raise config.ConfigError(f"eval.val_fraction: no training examples left after holding out {cfg.eval.val_fraction}")
    return train, val


@dataclass
class StudentCheckpoint:
    """What student.from holds, read without its weights: the shape and the tokenizer to check."""

    path: Path
    """The Hugging Face directory or the temper checkpoint (step-N) read."""
    config: ModelConfig
    vocab: dict[str, int]
    tokenizer_from: Path
    """Where the tokenizer was read: the Hugging Face directory, or the tokenizer a checkpoint's run trained with."""
    hf: Checkpoint | None = None
    """The Hugging Face checkpoint; None for a temper training checkpoint."""

    def load(self, device: torch.device) -> Transformer:
        """The weights, in float32, in train mode."""
        if self.hf is not None:
            return self.hf.load(device, torch.float32).model.train()
        model = Transformer(self.config).to(device)
        try:
            ckpt.load_checkpoint(self.path, model=model, optimizer=None, map_location=device)  # verified (sha256)
        except RuntimeError as e:  # load_state_dict: names missing or unexpected
            raise config.ConfigError(f"student.from {self.path}: its {ckpt.MODEL_FILE} does not hold the whole model "
                                     f"({str(e).splitlines()[-1].strip()}); a LoRA run's checkpoint holds only its "
                                     f"adapters: start from its final/ export") from None
        except (OSError, ValueError) as e:
            raise config.ConfigError(f"student.from {self.path}: {e}") from None
        return model.train()


def open_student(path: str) -> StudentCheckpoint:
    """student.from: a Hugging Face directory; a temper run directory (its final/, or without one its newest
    checkpoint: a step-N directory exists only once its save completed, and loading verifies its checksums);
    or a temper training checkpoint (step-N: the model config stored in its state.json, the tokenizer of the
    run that wrote it). Anything else: a ConfigError naming the path."""
    src = Path(path)
    if not src.is_dir():
        raise config.ConfigError(f"student.from {src}: not a directory (give a Hugging Face directory, a temper "
                                 f"run directory or one of its checkpoints/step-NNNNNNN)")
    step = src if (src / ckpt.STATE_FILE).is_file() else None
    if step is None and not (checkpoint_dir(src) / "config.json").is_file() and ckpt.list_checkpoints(src):
        step = ckpt.list_checkpoints(src)[-1]
    if step is None:
        try:
            hf = open_checkpoint(src)
        except InputError as e:  # "checkpoint DIR: ...": named by the key too, with what else it could have been
            raise config.ConfigError(f"student.from {src}: not a Hugging Face directory, a temper run or one of its "
                                     f"checkpoints/step-NNNNNNN ({e})") from None
        return StudentCheckpoint(hf.path, hf.config, hf.tokenizer.tokenizer.get_vocab(), hf.path, hf)
    try:
        saved = ckpt.read_state(step).get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"its {ckpt.STATE_FILE} stores no run config")
        shape = saved.get("model_config", saved.get("model"))  # sft, dpo, reward: model_config; pretrain, distill: model
        if not isinstance(shape, dict):
            raise ValueError(f"its {ckpt.STATE_FILE} stores no model config")
        model_cfg = config.from_dict(ModelConfig, shape, prefix="model.")
    except (OSError, ValueError, AttributeError) as e:  # ConfigError is a ValueError
        raise config.ConfigError(f"student.from {step}: not a readable temper checkpoint ({e})") from None
    where, vocab = _run_tokenizer(step, saved)
    return StudentCheckpoint(step, model_cfg, vocab, where)


def _run_tokenizer(step: Path, saved: dict) -> tuple[Path, dict[str, int]]:
    """The tokenizer the run of checkpoint `step` trained with (a checkpoint stores none): its teacher's (distill),
    its base model's (sft, dpo, reward) or its data's (pretrain), as its stored config names them."""
    def section(name: str, key: str) -> object:
        value = saved.get(name)
        return value.get(key) if isinstance(value, dict) else None

    teacher, base, data = section("teacher", "path"), saved.get("model"), section("data", "dir")
    try:
        if isinstance(teacher, str) and teacher:
            where = checkpoint_dir(teacher)
            return where, load_hf_tokenizer(where).tokenizer.get_vocab()
        if isinstance(base, str) and base:
            where = checkpoint_dir(base)
            return where, load_hf_tokenizer(where).tokenizer.get_vocab()
        data = data[0] if isinstance(data, list) and data else data
        if isinstance(data, str) and data:
            where = tokenizer_path(data)
            return where, load_tokenizer(where).get_vocab()
    except (InputError, OSError, ValueError) as e:
        raise config.ConfigError(f"student.from {step}: a checkpoint stores no tokenizer, and the one its run trained "
                                 f"with cannot be read to check against the teacher's: {e}") from None
    raise config.ConfigError(f"student.from {step}: a checkpoint stores no tokenizer, and its run's config names none "
                             f"(teacher.path, model or data.dir) to check against the teacher's")


def _student(cfg: DistillConfig, student: StudentCheckpoint | None, teacher: Checkpoint,
             device: torch.device) -> tuple[Transformer, ModelConfig]:
    """The student's weights (student.from), or the preset's random init with the teacher's vocabulary, seeded
    by run.seed as `temper pretrain` seeds it."""
    if student is not None:
        return student.load(device), student.config
    base = dataclasses.asdict(PRESETS[cfg.student.preset]) | {"vocab_size": teacher.config.vocab_size}
    model_cfg = config.from_dict(ModelConfig, base | cfg.student.model, prefix="student.model.")
    if model_cfg.vocab_size != teacher.config.vocab_size:
        raise config.ConfigError(f"student.model.vocab_size={model_cfg.vocab_size} differs from the teacher's "
                                 f"{teacher.config.vocab_size}: their logits must have one size")
    torch.manual_seed(cfg.run.seed)  # identical init on every rank
    return Transformer(model_cfg).to(device), model_cfg


def _teacher_fingerprint(teacher: Checkpoint) -> dict:
    """What identifies the teacher's weights without hashing them: its directory, shape and weight files."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in teacher.path.iterdir()
                   if p.suffix in (".safetensors", ".bin"))
    return {"path": str(teacher.path.resolve()), "config": config.to_dict(teacher.config), "files": files}


def _examples_digest(examples: list[SFTExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray(e.ids, dtype=np.int64).tobytes())
        h.update(np.packbits(np.asarray(e.loss_mask, dtype=bool)).tobytes())
        h.update(b"|")
    return h.hexdigest()


ON_POLICY_STREAM = 0x676B64  # "gkd": the on-policy draws' stream, apart from any other use of run.seed


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether `step` trains on the student's samples: a draw from (seed, step) alone, so resume and every
    rank agree; never with lmbda 0, always with lmbda 1."""
    return lmbda > 0 and float(np.random.default_rng([seed, step, ON_POLICY_STREAM]).random()) < lmbda


def sample_seed(seed: int, row: int, piece: int) -> int:
    """The sampling seed of piece `piece` of global row `row`: the same whatever the batch or rank."""
    return int(np.random.SeedSequence([seed, row, piece, ON_POLICY_STREAM]).generate_state(1, np.uint64)[0] >> 2)


def sft_prompt(ids: np.ndarray, mask: np.ndarray) -> list[int]:
    """An SFT example's prompt for on-policy sampling: its tokens before its last learnt span (TRL's GKD
    samples the last assistant turn after the conversation before it), at least its first token; all of
    it when nothing in it is learnt."""
    m = np.asarray(mask, dtype=bool)
    starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))  # first token of each learnt span
    end = max(int(starts[-1]), 1) if len(starts) else len(m)
    return [int(t) for t in np.asarray(ids)[:end]]


def sampled_batch(model: nn.Module, prompts: list[list[int]], seeds: list[int], *, seq_len: int, temperature: float,
                  max_new_tokens: int, stop_ids: list[int], pad_id: int, pack: bool,
                  amp_dtype: torch.dtype | None = None) -> Batch:
    """The prompts continued by the student's samples (`infer.engine.generate`, one seed per prompt, each to
    at most max_new_tokens (0: no limit) and the row's end, stopping after a stop id), as a Batch whose targets
    are the sampled tokens alone: one sequence per row, or packed with document masks."""
    room = [seq_len - len(p) for p in prompts]
    longest = max(room)
    new = min(max_new_tokens, longest) if max_new_tokens else longest
    device = next(model.parameters()).device
    stops = set(stop_ids)
    with autocast(device, amp_dtype):  # eval mode meanwhile; generate restores the model's mode
        outs = generate(model, prompts, max_new_tokens=max(new, 0), temperature=temperature, seed=seeds,
                        pad_id=pad_id, should_stop=lambda _, toks: toks[-1] in stops)
    docs = [np.asarray(p + o[:r], dtype=np.int64) for p, o, r in zip(prompts, outs, room, strict=True)]
    masks = [np.arange(len(doc)) >= len(p) for doc, p in zip(docs, prompts, strict=True)]
    if pack:
        rows = plan_packing([len(doc) for doc in docs], seq_len, overflow="truncate")
    else:
        rows = [[Piece(i, 0, len(doc))] for i, doc in enumerate(docs)]
    b = collate_rows(docs, rows, seq_len, loss_masks=masks, pad_id=pad_id)
    return Batch(b.tokens.to(device), b.targets.to(device),
                 {"positions": b.positions.to(device), "segments": Segments(b.doc_ids.to(device))})


class Data:
    """What the loop draws: a step's micro-batches as a function of the global row index (so a resumed run and
    any world size see the same rows), the held-out batches, and the units the top-k cache is built over."""

    def __init__(self, cfg: DistillConfig, d: DistInfo, tok: HFTokenizer, seq_len: int,
                 examples: tuple[list[SFTExample], list[SFTExample]] | None):
        self.cfg, self.d, self.seq_len = cfg, d, seq_len
        self.cache: TopKCache | None = None
        self.sft = examples is not None
        self.pad = tok.pad_id if tok.pad_id is not None else 0
        if examples is None:  # pretraining windows
            self.windows = TokenWindows(cfg.data.dir, "train", seq_len, seed=cfg.run.seed, order=cfg.data.order,
                                        verify=cfg.data.verify)
            manifest = read_manifest(cfg.data.dir)
            has_val = manifest["splits"].get("val", {}).get("tokens", 0) > seq_len
            self.val_windows = TokenWindows(cfg.data.dir, "val", seq_len, order="sequential",
                                            verify=cfg.data.verify) if has_val else None
            self.per_epoch = self.windows.num_windows
            self.identity = {"dir": str(Path(cfg.data.dir).resolve()), "train": manifest["splits"]["train"]}
        else:
            train, val = examples
            self.rows = RowOrder(train, seq_len, cfg.train.pack, cfg.run.seed)
            self.val_rows = RowOrder(val, seq_len, cfg.train.pack, cfg.run.seed) if val else None
            self.per_epoch = self.rows.per_epoch
            self.identity = {"examples": _examples_digest(train)}

    def _rows(self, order: RowOrder, pieces: list[list[Piece]], with_cache: bool) -> Batch:
        b = collate_rows(order.docs, pieces, self.seq_len, loss_masks=order.masks, pad_id=self.pad)
        dev = self.d.device
        extra = self.cache.positions([p.doc for row in pieces for p in row], dev) if with_cache and self.cache else {}
        return Batch(b.tokens.to(dev), b.targets.to(dev),
                     {"positions": b.positions.to(dev), "segments": Segments(b.doc_ids.to(dev))}, extra)

    def train_batch(self, start: int, n: int) -> Batch:
        """Training rows start .. start + n - 1, with their cached top-k when there is a cache."""
        if self.sft:
            return self._rows(self.rows, [self.rows.row(i) for i in range(start, start + n)], True)
        x, y = self.windows.batch(start, n, self.d.device)
        extra = self.cache.positions(self.windows.window_ids(start, n), self.d.device) if self.cache else {}
        return Batch(x, y, extra=extra)

    def prompts(self, start: int, n: int, prompt_tokens: int) -> tuple[list[list[int]], list[int]]:
        """On-policy prompts of training rows start .. start + n - 1 and their sampling seeds: each window's first
        prompt_tokens tokens, or each SFT example of the rows up to its last learnt span."""
        seed = self.cfg.run.seed
        if not self.sft:
            x, _ = self.windows.batch(start, n)
            return [row[:prompt_tokens] for row in x.tolist()], [sample_seed(seed, start + i, 0) for i in range(n)]
        prompts, seeds = [], []
        for g in range(start, start + n):
            for k, piece in enumerate(self.rows.row(g)):
                prompts.append(sft_prompt(self.rows.docs[piece.doc][: piece.stop], self.rows.masks[piece.doc][: piece.stop]))
                seeds.append(sample_seed(seed, g, k))
        return prompts, seeds

    def val_batches(self, micro: int) -> list[Batch]:
        """This rank's share of the held-out rows, in as many batches on every rank, at least one (all join the
        all-reduce, and a sharded model's forward needs every rank): where a rank's rows have run out, a row
        whose targets are all ignored."""
        d = self.d
        if not self.sft:
            if self.val_windows is None:
                return []
            return [Batch(*self.val_windows.batch(rank_slice(0, micro, i, d.dp_rank, d.dp_world), micro, d.device))
                    for i in range(self.cfg.eval.batches)]
        if self.val_rows is None:
            return []
        n = self.val_rows.per_epoch
        starts = [rank_slice(0, micro, m, d.dp_rank, d.dp_world) for m in range(math.ceil(n / (micro * d.dp_world)))]
        out = []
        for s in starts:
            if s < n:
                out.append(self._rows(self.val_rows, [self.val_rows.row(i) for i in range(s, min(s + micro, n))], False))
            else:
                b = self._rows(self.val_rows, [self.val_rows.row(0)], False)
                out.append(Batch(b.inputs, torch.full_like(b.targets, IGNORE_INDEX), b.model_kwargs))
        return out

    # ---- the cache's units: every window (data.dir) or training example (SFT), one per row ----------

    def unit_counts(self) -> list[int]:
        if not self.sft:
            return [self.seq_len] * self.windows.num_windows
        ends = [min(len(doc), self.seq_len) for doc in self.rows.docs]
        return [int(np.asarray(m[1:e + 1]).sum()) for m, e in zip(self.rows.masks, ends, strict=True)]

    def unit_batch(self, j: int, micro: int) -> tuple[list[int], Batch]:
        """Cache batch j: units j * micro ... in one row each (windows in epoch 0's order, examples in order)."""
        lo = j * micro
        if not self.sft:
            n = min(micro, self.windows.num_windows - lo)
            return self.windows.window_ids(lo, n).tolist(), Batch(*self.windows.batch(lo, n, self.d.device))
        units = list(range(lo, min(lo + micro, len(self.rows.docs))))
        pieces = [[Piece(u, 0, min(len(self.rows.docs[u]), self.seq_len))] for u in units]
        return units, self._rows(self.rows, pieces, False)

    def n_units(self) -> int:
        return self.windows.num_windows if not self.sft else len(self.rows.docs)


def _train(cfg: DistillConfig, d: DistInfo, teacher_ckpt: Checkpoint, student_ckpt: StudentCheckpoint | None,
           examples: tuple[list[SFTExample], list[SFTExample]] | None) -> int:
    # 3. student and teacher
    model, model_cfg = _student(cfg, student_ckpt, teacher_ckpt, d.device)
    if d.dp_rank:  # other dropout masks on the other ranks; rank 0 keeps the single-process stream
        torch.manual_seed(cfg.run.seed + d.dp_rank)
    seq_len = cfg.train.seq_len or (cfg.data.max_length if examples is not None else model_cfg.max_seq_len)
    for who, limit in (("the student", model_cfg.max_seq_len), ("the teacher", teacher_ckpt.config.max_seq_len)):
        if seq_len > limit:
            raise config.ConfigError(f"train.seq_len = {seq_len} exceeds the context of {who} ({limit})")
    tok = teacher_ckpt.tokenizer
    data = Data(cfg, d, tok, seq_len, examples)
    micro, accum = cfg.train.micro_batch_size, cfg.train.accumulation
    per_step = micro * accum * d.dp_world  # rows per optimizer step, over all ranks
    if not cfg.train.steps and not data.sft and cfg.data.order == "random":
        raise config.ConfigError("train.steps: give the number of steps (data.order=random has no epochs)")
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * data.per_epoch / per_step))

    resolved = config.to_dict(cfg) | {"model": config.to_dict(model_cfg), "steps": steps, "seq_len": seq_len,
                                      "rows_per_step": per_step}
    run = Run(cfg, d, resolved, resume_keys=RESUME_KEYS)
    train_model = run.wrap(model)
    optimizer = run.build_optimizer(model)  # after the layout: FSDP2 / TP parameters are DTensors
    state = run.resume(model, optimizer)  # settings checked before the teacher's weights are read
    step = state["step"] if state else 0
    if state:
        run.restore_rng(state)

    def load_teacher() -> nn.Module:
        """The teacher never trains: its weights in the autocast dtype (bf16 on a GPU; float32 on a CPU)."""
        return teacher_ckpt.load(d.device, run.amp_dtype).model.requires_grad_(False)

    # 4. the teacher's top-k cache, built once (reused by every epoch and on resume): the teacher is then
    # read only to build it, and not kept
    teacher: nn.Module | None = None
    if cfg.teacher.cache:
        meta = {"teacher": _teacher_fingerprint(teacher_ckpt), "data": data.identity, "seq_len": seq_len,
                "k": cfg.teacher.top_k, "dtype": cfg.teacher.cache_dtype}
        expected = fingerprint(meta)
        cache, why = open_cache(run.dir / CACHE_DIR, expected)
        if cache is None:
            if d.is_main:
                print(f"temper distill: building the teacher's top-{cfg.teacher.top_k} cache ({why})", file=sys.stderr)
            n_batches = math.ceil(data.n_units() / micro)
            cache = build_cache(run.dir / CACHE_DIR, load_teacher(), n_batches, lambda j: data.unit_batch(j, micro),
                                data.unit_counts(), k=cfg.teacher.top_k, dtype=cfg.teacher.cache_dtype,
                                fingerprint=expected, amp_dtype=run.amp_dtype, rank=d.dp_rank, world=d.dp_world,
                                log=(lambda m: print(f"temper distill: {m}", file=sys.stderr)) if d.is_main else None)
        elif d.is_main:
            print(f"temper distill: reusing the teacher's top-{cache.k} cache at {cache.path}", file=sys.stderr)
        data.cache = cache
    else:
        teacher = load_teacher()
    lc, op = cfg.loss, cfg.on_policy
    loss_fn = DistillLoss(lc.kind, lc.beta, lc.temperature, lc.alpha, cfg.train.label_smoothing, teacher, lc.chunk)
    # On-policy steps: the divergence alone (GKD); cross-entropy on the student's own samples would reinforce them.
    on_policy_loss = DistillLoss(lc.kind, lc.beta, lc.temperature, 1.0, 0.0, teacher, lc.chunk)
    # Validation reports the student's cross-entropy as val_loss (alpha 0), and the divergence when the teacher is here.
    val_loss_fn = (DistillLoss(lc.kind, lc.beta, lc.temperature, 0.0, 0.0, teacher, lc.chunk) if teacher is not None
                   else LMLoss())
    prompt_tokens = op.prompt_tokens or seq_len // 2
    if op.lmbda > 0 and not data.sft and not 0 < prompt_tokens < seq_len:
        raise config.ConfigError(f"on_policy.prompt_tokens={op.prompt_tokens} leaves no room to sample in rows of "
                                 f"train.seq_len={seq_len}")

    def sampled(start: int) -> Batch:
        """Micro-batch `start`'s rows with the student's samples for responses."""
        prompts, seeds = data.prompts(start, micro, prompt_tokens)
        return sampled_batch(model, prompts, seeds, seq_len=seq_len, temperature=op.temperature,
                             max_new_tokens=op.max_new_tokens, stop_ids=teacher_ckpt.stop_ids, pad_id=data.pad,
                             pack=data.sft and cfg.train.pack, amp_dtype=run.amp_dtype)
    flops = model.flops_per_token(seq_len) + (teacher.flops_per_token(seq_len) / 3 if teacher is not None else 0.0)

    if d.is_main:
        source = cfg.student.from_ or f"preset {cfg.student.preset}"
        how = f"top-{cfg.teacher.top_k} cache" if cfg.teacher.cache else "teacher on the fly"
        print(f"temper distill: {lc.kind} (alpha {lc.alpha}, T {lc.temperature}) from {teacher_ckpt.path} into a "
              f"{model.num_params() / 1e6:.2f}M student ({source}), {how}; {data.per_epoch} rows of {seq_len} per "
              f"epoch, {steps} steps of {per_step} rows ({micro} x {accum} accum x {d.dp_world} ranks), {run.amp_dtype}")

    def save(at: int) -> None:
        run.save(at, model, optimizer)

    def validate() -> dict[str, float]:
        batches = data.val_batches(micro)
        if not batches:
            return {}
        # the unwrapped model: DDP's forward is for training (FSDP2's is the model itself)
        m = eval_metrics(model, batches, run.amp_dtype, val_loss_fn, d.dp_group)
        return {f"val_{k}": v for k, v in m.items() if k != "ce"}

    # 5. the loop
    with run:
        logger = run.logging(steps, step, flops)
        if step == 0:
            val = validate()
            if val:
                logger.log(0, val, kind="val")
        train_model.train()
        while step < steps:
            run.inject_faults(step)
            lr = lr_at(step, steps, cfg.optim.lr, cfg.schedule)
            set_lr(optimizer, lr)
            first = step * per_step
            starts = [rank_slice(first, micro, m, d.dp_rank, d.dp_world) for m in range(accum)]
            on_policy = on_policy_step(cfg.run.seed, step, op.lmbda)
            mbs = [sampled(s) if on_policy else data.train_batch(s, micro) for s in starts]
            try:
                result = run.step(train_model, optimizer, mbs, on_policy_loss if on_policy else loss_fn, step)
            except NonFiniteLoss:
                if cfg.train.on_nonfinite != "rollback":
                    raise
                step = run.rollback(model, optimizer)["step"]
                continue
            step += 1
            extra = {"on_policy": float(on_policy)} if op.lmbda > 0 else {}
            run.log_train(step, steps, result, lr, epoch=first / max(data.per_epoch, 1), **extra)
            stop = run.after_step(step, steps, save, validate)
            if stop is not None:
                return stop

    # 6. final/ (a sharded model gathered on rank 0 first)
    exported = run.exported_model()
    if d.is_main:
        final = run.dir / "final"
        export_finetuned(exported, model_cfg, "full", tok, final,
                         cfg.student.from_ or cfg.student.preset)
        run.write_report(final)
        print(f"final model: {final}")
    if d.world > 1:
        dist.barrier()
    return 0
