"""What trains in a fine-tuning run, and what it leaves behind: the method of every recipe that starts
from a Hugging Face checkpoint (sft, reward, dpo, distill).

`apply_method` makes only what the method trains trainable: full (every weight), lora (model/lora.py),
qlora (an NF4 base from model/quant.py, then LoRA) or prefix (model/prefix.py). Under bf16 or fp16
mixed precision the frozen base of lora, qlora and prefix is held in that dtype (`base_dtype`), as
PEFT users load it (`torch_dtype=torch.bfloat16`) and torchtune and litgpt keep it: a weight that never
changes needs no float32 master copy, and autocast would cast it for every product anyway. That
halves the base's bytes, and QLoRA's NF4 weights dequantize straight to the compute dtype. What
trains (adapters, prefixes, heads) stays float32. `load_base` reads the checkpoint for a method: QLoRA's
on the host, its block weights quantized on the device one at a time, so the device never holds the
16-bit base (bitsandbytes' loading does the same). `export_finetuned`
writes final/: the merged model in Hugging Face layout with the tokenizer files, and the adapter in
PEFT's format under final/adapter/. `add_neftune` is NEFTune's noise on the input embeddings, a regulariser
of instruction tuning that any method can take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from temper.data.tokenizer import save_hf_tokenizer
from temper.model.config import ModelConfig
from temper.model.hf.checkpoint import load_hf, save_hf
from temper.model.hf.peft import peft_lora_refusal, save_peft, save_peft_prefix
from temper.model.layers import MoE
from temper.model.lora import ATTENTION_TARGETS, apply_lora, merge_lora

Method = Literal["full", "lora", "qlora", "prefix"]


@dataclass
class LoRAConfig:
    rank: int = 16
    """Rank r of each adapter (A is r x in, B is out x r)."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) B A, or alpha / sqrt(r) with rslora."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Linear layers to adapt, by name: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj head; latent attention
    (DeepSeek-V3) has q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj o_proj instead; a mixture's router is router,
    Gemma 4 E2B's and E4B's per-layer projections per_layer_proj per_layer_gate per_layer_out."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024): a learned magnitude per output row."""


@dataclass
class PrefixConfig:
    n_tokens: int = 16
    """Learned key/value slots per layer (Li & Liang 2021)."""


def base_dtype(method: Method, amp_dtype: torch.dtype) -> torch.dtype:
    """The dtype a run of `method` under autocast to `amp_dtype` holds its frozen base in: the compute dtype
    for lora, qlora and prefix under bf16/fp16, else float32 (full fine-tuning keeps float32 master weights)."""
    return amp_dtype if method != "full" and amp_dtype in (torch.bfloat16, torch.float16) else torch.float32


def load_base(path: str | Path, method: Method, device: torch.device, amp_dtype: torch.dtype
              ) -> tuple[nn.Module, ModelConfig]:
    """The checkpoint to fine-tune with `method`, on `device` in `base_dtype`. For qlora it is read on the host (a
    checkpoint stored in that dtype is memory-mapped: pages are read as they are used), and each block weight QLoRA
    quantizes goes to the device alone and becomes NF4 there, before the rest follows: the device's peak is the NF4
    model and one 16-bit weight, not the 16-bit model (Llama-3-8B: ~5.7 GB, not ~16 GB; Qwen3-30B-A3B: ~17 GB, not
    ~61 GB). `apply_method` then finds the NF4 weights in place."""
    dtype = base_dtype(method, amp_dtype)
    if method != "qlora":
        return load_hf(path, device=device, dtype=dtype)
    from temper.model.quant import is_nf4, quantize_nf4

    model, cfg = load_hf(path, device="cpu", dtype=dtype)
    quantize_nf4(model, device=device)
    for m in model.modules():  # what stays in 16 bits: embeddings, norms, routers, the head; RoPE's tables
        for p in m.parameters(recurse=False):
            if not is_nf4(p):
                p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            m._buffers[name] = b.to(device)
    return model, cfg


def apply_method(model: nn.Module, method: Method, lora: LoRAConfig, prefix: PrefixConfig | None = None,
                 amp_dtype: torch.dtype = torch.float32) -> None:
    """Make only what the method trains trainable (full: everything), in place.

    amp_dtype: the run's autocast dtype (`Run.amp_dtype`); lora, qlora and prefix first cast every parameter
    of `model`, all of which they freeze, to `base_dtype` (a model loaded in it is left as it is; buffers such
    as RoPE's tables keep their float32), so that what they add to train is the only float32 left."""
    if method == "full":
        return
    dtype = base_dtype(method, amp_dtype)
    kept = {id(t) for m in model.modules() if isinstance(m, MoE) for t in m.float32_tensors()}  # float32 routers
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype and id(p) not in kept:
                p.data = p.data.to(dtype)  # the same Parameter: tied weights stay tied
    if method == "prefix":
        from temper.model.prefix import apply_prefix

        apply_prefix(model, (prefix or PrefixConfig()).n_tokens)
        return
    if method == "qlora":
        from temper.model.quant import is_nf4, quantize_nf4

        if not any(is_nf4(p) for p in model.parameters()):  # `load_base` quantizes as it loads
            quantize_nf4(model)
    apply_lora(model, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, dropout=lora.dropout,
               rslora=lora.rslora, dora=lora.dora)


def add_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle | None:
    """NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while the model trains,
    add uniform noise of magnitude alpha / sqrt(T * C) to its input embeddings (T: the row's length, padding and
    packed neighbours included; C: the width), computed as transformers' `neftune_post_forward_hook` computes it
    (so the same seed draws the same noise). A forward hook on `tok_emb`, installed from outside as adapters are;
    the noise comes from the device's generator, which checkpoints save, so a resumed run draws what it would
    have. None where the model has no input embedding (a later pipeline stage)."""
    emb = getattr(model, "tok_emb", None)
    if emb is None:
        return None

    def noisy(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return out
        scale = alpha / torch.sqrt(torch.tensor(out.size(1) * out.size(2)))  # float32, as transformers rounds it
        return out + torch.zeros_like(out).uniform_(-scale, scale)

    return emb.register_forward_hook(noisy)


def export_finetuned(model: nn.Module, model_cfg, method: Method, tok, final: Path, base: str) -> None:
    """final/: the merged model in Hugging Face layout with the tokenizer files (for prefix, the base
    unchanged), and final/adapter/ in PEFT's format (lora, qlora, prefix; not DoRA on a mixture's experts, which PEFT
    cannot hold: `peft_lora_refusal`), naming `base` as its base model."""
    gen = {"eos_token_id": tok.eos_id} if tok.eos_id is not None else {}
    if method in ("lora", "qlora"):
        refusal = peft_lora_refusal(model)
        if refusal:
            print(f"final/adapter not written: {refusal}")
        else:
            save_peft(model, model_cfg, final / "adapter", base_model_name_or_path=base)
        merged = merge_lora(model)
        if method == "qlora":  # the NF4 layers without adapters too; QLoRA's merged model is bf16
            from temper.model.quant import dequantize

            merged = dequantize(merged, torch.bfloat16).to(torch.bfloat16)
        save_hf(merged, model_cfg, final, generation_config=gen)
    elif method == "prefix":
        from temper.model.prefix import remove_prefix

        save_peft_prefix(model, model_cfg, final / "adapter", base_model_name_or_path=base)
        save_hf(remove_prefix(model), model_cfg, final, generation_config=gen)  # the base, unchanged
    else:
        save_hf(model, model_cfg, final, generation_config=gen)
    save_hf_tokenizer(tok, final)
