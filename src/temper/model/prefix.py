"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

`apply_prefix` swaps every attention layer for a `PrefixAttention` (the same projections, plus P
learned key/value slots that every query attends to before the sequence's own keys) and freezes
everything else: only the prefixes train. `remove_prefix` swaps the plain layers back. The slots are keys and values as attention uses them (RoPE, if any, is already in them:
they have no position of their own), and the model prepends them at every step without storing them
in the KV cache, so cached generation needs nothing special.

Initialisation: N(0, init_std), as PEFT's prefix embedding, or the keys and values that real tokens
produce at positions 0..P-1 (the paper's §7.2: initialising with real words' activations helps in
low-data settings). Optionally the paper's reparameterisation (§4.3): training the slots directly is
unstable, so each layer's keys and values are computed by an MLP from a smaller matrix, P = MLP(P').
The paper shares one MLP across layers; here each layer has its own, which keeps a layer's prefix one
self-contained module. After training only P is kept: `prefix_kv` gives the computed keys and
values, and `set_prefix` puts them back as plain parameters.

It does not read or write files (PEFT's prefix-tuning format is `hf/peft.py`'s), do prompt tuning
(learned input embeddings), or train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from temper.model.attention import Attention
from temper.model.transformer import Transformer


class Prefix(nn.Module):
    """The P learned key/value slots of one attention layer: forward() -> (k, v), each (Hkv, P, D).

    kv: the slots themselves (2, Hkv, P, D), trained directly; or, with `hidden`, computed by an MLP
    hidden -> hidden -> 2*Hkv*D from a (P, hidden) matrix (Li & Liang §4.3).
    """

    def __init__(
        self, n_kv_heads: int, n_tokens: int, head_dim: int, *, hidden: int | None = None,
        init_std: float = 1.0, kv: torch.Tensor | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.shape = (n_kv_heads, n_tokens, head_dim)
        kw = {"device": device, "dtype": torch.float32}  # trained: float32 whatever the model's dtype
        self.kv = self.embed = self.mlp = None
        if hidden is None:
            init = torch.randn(2, *self.shape, **kw) * init_std if kv is None else kv.to(**kw)
            self.kv = nn.Parameter(init)  # (2, Hkv, P, D)
        else:
            self.embed = nn.Parameter(torch.randn(n_tokens, hidden, **kw) * init_std)  # (P, hidden)
            self.mlp = nn.Sequential(nn.Linear(hidden, hidden, **kw), nn.Tanh(),
                                     nn.Linear(hidden, 2 * n_kv_heads * head_dim, **kw))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv
        if kv is None:
            Hkv, P, D = self.shape
            kv = self.mlp(self.embed).view(P, 2, Hkv, D).permute(1, 2, 0, 3)  # (2, Hkv, P, D)
        return kv[0], kv[1]


class PrefixAttention(Attention):
    """An `Attention` whose keys and values start with its prefix's P slots (not stored in the KV
    cache: they are the same every step); every query sees every slot. It shares the plain layer's
    projections, under the same names, so state dicts only gain `prefix.*`."""

    prefix: Prefix
    takes_block_mask = False  # its slots lie outside a block mask's key axis: it extends SDPA's dense mask

    @classmethod
    def swap_in(cls, attn: Attention, prefix: Prefix) -> PrefixAttention:
        new = cls.__new__(cls)
        new.__dict__ = dict(attn.__dict__)  # the same projections, settings and hooks
        new._modules, new._parameters, new._buffers = dict(attn._modules), dict(attn._parameters), dict(attn._buffers)
        new.prefix = prefix
        return new

    def plain(self) -> Attention:
        """The layer without its prefix: the same projections in a plain `Attention`."""
        old = Attention.__new__(Attention)
        old.__dict__ = dict(self.__dict__)
        old._modules = {k: m for k, m in self._modules.items() if k != "prefix"}
        old._parameters, old._buffers = dict(self._parameters), dict(self._buffers)
        return old

    def extend_kv(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, T: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        pk, pv = self.prefix()  # (Hkv, P, D) each
        B, S, P = k.shape[0], k.shape[2], pk.shape[1]
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, Hkv, P+S, D)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)  # (B, Hkv, P+S, D)
        if mask is None and not causal:
            return k, v, None, False  # one query row that sees everything
        if mask is None:  # causal over the sequence, as a mask now that keys outnumber queries
            mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)[None, None]  # (1, 1, T, S)
        seen = torch.ones(*mask.shape[:-1], P, dtype=torch.bool, device=mask.device)
        return k, v, torch.cat([seen, mask], dim=-1), False  # (B|1, 1, T, P+S)


def _attach(model: Transformer, make: Callable[[int], Prefix]) -> list[str]:
    """Freeze the model and swap in layer i's attention with the prefix make(i); returns the prefixes' names."""
    if any(isinstance(layer.attn, PrefixAttention) for layer in model.layers):
        raise ValueError("the model already has a prefix: remove_prefix first")
    if model.cfg.kv_lora_rank:
        raise ValueError("prefix tuning needs keys and values per head, which latent attention (DeepSeek-V3, "
                         "kv_lora_rank) does not cache: use LoRA")
    if model.cfg.has_linear_layers:
        raise ValueError("prefix tuning needs keys and values in every layer, which linear layers (Qwen3.5, LFM2: "
                         "full_attention_every, attention_layers) do not have: use LoRA")
    if model.cfg.global_shaped or model.cfg.kv_shared_layers:
        raise ValueError("prefix tuning needs keys and values of one shape made in every layer; this model's global "
                         "layers have their own (Gemma 4: global_head_size / global_kv_heads / global_values_are_keys) "
                         "or its last layers take earlier ones' (kv_shared_layers): use LoRA")
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.layers):
        layer.attn = PrefixAttention.swap_in(layer.attn, make(i))
    return [f"layers.{i}.attn.prefix" for i in range(len(model.layers))]


@torch.no_grad()
def _token_kv(model: Transformer, tokens: Sequence[int]) -> torch.Tensor:
    """The keys and values (L, 2, Hkv, P, D) that `tokens` produce in every layer, read from a KV cache."""
    was_training = model.training
    model.eval()  # no dropout in the activations taken
    cache = model.new_cache(1, len(tokens))
    model(torch.tensor([list(tokens)], device=model.tok_emb.weight.device), cache=cache)
    model.train(was_training)
    return torch.stack([cache.k[:, 0], cache.v[:, 0]], dim=1).float()  # (L, 2, Hkv, P, D)


def apply_prefix(
    model: Transformer, n_tokens: int, *, hidden: int | None = None, init_std: float = 1.0,
    init_tokens: Sequence[int] | None = None,
) -> list[str]:
    """Give every attention layer `n_tokens` trainable key/value slots and freeze everything else.

    hidden: train through the reparameterisation MLP of that width (None: train the slots directly).
    init_tokens: n_tokens token ids whose keys and values start the slots (direct slots only).
    Returns the names of the prefix modules; `prefix_parameters` gives what to optimise.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    c = model.cfg
    device = model.tok_emb.weight.device
    kv = None
    if init_tokens is not None:
        if hidden is not None or len(init_tokens) != n_tokens:
            raise ValueError(f"init_tokens needs hidden=None and {n_tokens} tokens, got hidden={hidden} and "
                             f"{len(init_tokens)} tokens")
        kv = _token_kv(model, init_tokens)  # before any prefix is attached
    return _attach(model, lambda i: Prefix(c.kv_heads, n_tokens, c.head_dim, hidden=hidden, init_std=init_std,
                                           kv=None if kv is None else kv[i], device=device))


def prefix_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every `Prefix` in the model, in module order."""
    return [p for m in model.modules() if isinstance(m, Prefix) for p in m.parameters()]


def remove_prefix(model: Transformer) -> Transformer:
    """Take the prefixes off (in place): the base model again, exportable as such."""
    for layer in model.layers:
        if isinstance(layer.attn, PrefixAttention):
            layer.attn = layer.attn.plain()
    return model


def prefix_kv(model: Transformer) -> torch.Tensor:
    """Every layer's prefix keys and values as attention uses them: (L, 2, Hkv, P, D) float32 on the
    CPU, detached. A reparameterisation MLP is evaluated: this is all a trained prefix is."""
    kv = []
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.attn, PrefixAttention):
                raise ValueError(f"layer {i} has no prefix: apply_prefix first")
            kv.append(torch.stack(layer.attn.prefix()).float().cpu())
    return torch.stack(kv)


def set_prefix(model: Transformer, kv: torch.Tensor) -> list[str]:
    """Give the model the prefix kv (L, 2, Hkv, P, D), as in `prefix_kv`, as trainable slots and freeze
    everything else; returns the prefix modules' names."""
    c = model.cfg
    if kv.dim() != 5 or kv.shape[:3] != (c.n_layers, 2, c.kv_heads) or kv.shape[4] != c.head_dim:
        raise ValueError(f"prefix keys and values of shape {list(kv.shape)}, expected [{c.n_layers}, 2, "
                         f"{c.kv_heads}, n_tokens, {c.head_dim}] (n_layers, k/v, n_kv_heads, n_tokens, head_dim)")
    device = model.tok_emb.weight.device
    return _attach(model, lambda i: Prefix(c.kv_heads, kv.shape[3], c.head_dim, kv=kv[i], device=device))
