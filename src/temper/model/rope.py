"""RoPE's tables (Su et al. 2021): the inverse frequencies of each scaling and the cos/sin tables built from them.

Scalings stretch a model trained on `original_max_position_embeddings` tokens to longer contexts: linear position
interpolation, Llama 3.1's, YaRN's (Qwen2.5 and Qwen3 long contexts, OLMo 3) and LongRoPE's (Phi-3.5, Phi-4-mini),
which has a second table for sequences beyond the original length; Gemma 4's proportional RoPE turns only some pairs.
Each matches transformers' `modeling_rope_utils` to the float32 bit, so checkpoints load with their reference's
logits. A head's leading `rotary_dim` dimensions are
rotated (all of them but for a partial rotary model).

It does not rotate anything: `attention.apply_rope` does, with these tables.
"""

from __future__ import annotations

import math

import torch

from temper.model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None, long: bool = False) -> torch.Tensor:
    """RoPE inverse frequencies (rotary_dim/2,) in float32, with `cfg.rope_scaling` applied; `long`: LongRoPE's
    table for sequences beyond the original length."""
    d = cfg.rotary_dim
    base_freq = cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d)  # (D/2,)
    inv_freq = 1.0 / base_freq
    s = cfg.rope_scaling
    if s and s["rope_type"] == "dynamic":  # dynamic NTK: a larger base only for sequences past max_position_embeddings
        return inv_freq  # (transformers' threshold, written as max_seq_len), which temper's tables never reach
    if s and s["rope_type"] == "linear":  # position interpolation (Chen et al. 2023): positions / factor
        return inv_freq / s["factor"]
    if s and s["rope_type"] == "yarn":
        return _yarn_inv_freq(base_freq, cfg.rope_theta, s)
    if s and s["rope_type"] == "proportional":
        # Gemma 4's p-RoPE: the first partial_rotary_factor of each head's pairs turn at the frequencies they have in
        # the whole head, the rest not at all (angle 0: they pass through), so the slow pairs carry no position
        turned = int(s["partial_rotary_factor"] * d // 2)  # as transformers rounds it
        return torch.cat((inv_freq[:turned], torch.zeros_like(inv_freq[turned:]))) / s.get("factor", 1.0)
    if s and s["rope_type"] == "longrope":
        # LongRoPE (Ding et al. 2024): a searched stretch per frequency, one set for sequences within the original
        # length and one for longer ones.
        stretch = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (stretch * base_freq)
    if s:
        # Llama 3.1 (Meta, "The Llama 3 Herd of Models", 2024) divides the low frequencies by `factor`, keeps the
        # high ones, and interpolates smoothly in between.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def _yarn_inv_freq(base_freq: torch.Tensor, theta: float, s: dict) -> torch.Tensor:
    """YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"): the dimensions that turn more than
    `beta_fast` times over the original context keep their frequency, those that turn fewer than `beta_slow` times
    are interpolated by `factor`, with a linear ramp between (its ends floored and ceiled unless `truncate` is off)."""
    d = 2 * len(base_freq)
    old_len = s["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original context
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=base_freq.device) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)  # (D/2,) 0: keep, 1: interpolate
    keep = 1 - ramp
    return 1.0 / (s["factor"] * base_freq) * (1 - keep) + 1.0 / base_freq * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN and LongRoPE multiply cos and sin by (so q.k by its square): `attention_factor` when given,
    else YaRN's 0.1 ln(factor) + 1, or DeepSeek's ratio of two such terms (`mscale`, `mscale_all_dim`), or
    LongRoPE's sqrt(1 + ln(factor) / ln(original length)); 1 for other scalings."""
    s = cfg.rope_scaling
    if not s or s["rope_type"] not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if s["rope_type"] == "longrope":
        factor, old_len = s["factor"], s["original_max_position_embeddings"]
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    if s.get("mscale") and s.get("mscale_all_dim"):
        return _mscale(s["factor"], s["mscale"]) / _mscale(s["factor"], s["mscale_all_dim"])
    return _mscale(s["factor"])


def _mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 m ln(factor) + 1 (1 without stretching)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_score_multiplier(cfg: ModelConfig) -> float:
    """What DeepSeek's latent attention multiplies its softmax scale by under YaRN with `mscale_all_dim`:
    mscale(factor, mscale_all_dim) squared, on every dimension's scores, not only the rotated ones (transformers'
    `yarn_apply_mscale`); 1 otherwise."""
    s = cfg.rope_scaling or {}
    if s.get("rope_type") != "yarn" or not s.get("mscale_all_dim"):
        return 1.0
    return _mscale(s["factor"], s["mscale_all_dim"]) ** 2


def long_rope_length(cfg: ModelConfig) -> int | None:
    """LongRoPE's original length (Phi-3.5, Phi-4-mini): a forward over a row longer than it rotates every one of the
    row's tokens by the long table (`Transformer._rope_at`), so decoding encodes a row again when it crosses it
    (`temper.infer.engine.crosses_long_rope`). None for other scalings."""
    s = cfg.rope_scaling or {}
    return s["original_max_position_embeddings"] if s.get("rope_type") == "longrope" else None


def rope_tables(cfg: ModelConfig, max_len: int, device: torch.device | str | None = None, long: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (max_len, rotary_dim/2) float32, of positions 0 .. max_len-1, scaled by the attention
    factor; `long`: LongRoPE's long table. `rope_reversed` (nanochat) negates the sines: each pair turns back."""
    angles = torch.outer(torch.arange(max_len, device=device).float(), rope_inv_freq(cfg, device, long))  # (S, D/2)
    scale = rope_attention_factor(cfg)
    sin = angles.sin() * scale
    return angles.cos() * scale, -sin if cfg.rope_reversed else sin
