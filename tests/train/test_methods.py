"""Loading a checkpoint for a method (`train.methods.load_base`): QLoRA's base becomes NF4 weight by weight as it
loads, the same NF4 model as quantizing it whole after loading; on a GPU the device never holds the 16-bit base."""

from dataclasses import replace

import pytest
import torch

from temper.model.config import PRESETS
from temper.model.hf.checkpoint import load_hf, save_hf
from temper.model.lora import ALL_LINEAR_TARGETS
from temper.model.quant import is_nf4, storage_bytes
from temper.model.transformer import Transformer
from temper.train.methods import LoRAConfig, apply_method, load_base

pytest.importorskip("torchao")

# Widths NF4's blocks (64 x 256 values) divide; a mixture's experts too. Untied, as the 8B and 30B bases are.
NF4_MOE = replace(PRESETS["debug-moe"], dim=256, ffn_dim=256, n_heads=4, n_kv_heads=4, vocab_size=512,
                  tie_embeddings=False)


def _checkpoint(tmp_path, dtype: torch.dtype = torch.bfloat16):
    torch.manual_seed(0)
    return save_hf(Transformer(NF4_MOE).to(dtype), NF4_MOE, tmp_path / "base")


def test_qlora_loads_weight_by_weight_into_the_model_quantizing_after_loading_makes(tmp_path):
    path = _checkpoint(tmp_path)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    ours, _ = load_base(path, "qlora", cpu, bf16)
    targets = {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1]
               in ALL_LINEAR_TARGETS}
    assert len(targets) == 2 * (4 + 8 * 3)  # q, k, v, o and each expert's gate, up, down, in 2 blocks
    assert all(is_nf4(ours.get_submodule(n).weight) for n in targets)
    assert not is_nf4(ours.layers[0].mlp.router.weight) and ours.layers[0].mlp.router.weight.dtype == bf16
    whole, _ = load_hf(path, dtype=bf16)
    for model in (ours, whole):  # the NF4 weights already there are kept as they are
        torch.manual_seed(1)
        apply_method(model, "qlora", LoRAConfig(rank=4, dropout=0.0), amp_dtype=bf16)
    for (name, a), (_, b) in zip(ours.state_dict().items(), whole.state_dict().items(), strict=True):
        assert storage_bytes(a) == storage_bytes(b), name
        assert torch.equal(a.to(torch.float32), b.to(torch.float32)), name
    x = torch.randint(0, NF4_MOE.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours(x), whole(x))


@pytest.mark.gpu
def test_qlora_never_holds_the_16bit_base_on_the_gpu(tmp_path):
    path = _checkpoint(tmp_path)
    base_bytes = sum(p.numel() * 2 for p in Transformer(NF4_MOE).parameters())
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model, _ = load_base(path, "qlora", torch.device("cuda"), torch.bfloat16)
    peak = torch.cuda.max_memory_allocated() - start
    held = sum(storage_bytes(p) for p in model.parameters())
    assert all(p.device.type == "cuda" for p in model.parameters())
    # The NF4 model and one weight in flight: about a third of the bf16 base here (loading it whole peaks above it).
    assert held < peak < 0.6 * base_bytes, (peak, held, base_bytes)


def test_neftune_draws_transformers_noise_while_training_only():
    """The same seed gives the same noise as transformers' hook (bit for bit), within alpha / sqrt(T * C); an
    evaluating model's embeddings are untouched, and removing the hook restores the plain model."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    from temper.train.methods import add_neftune

    torch.manual_seed(0)
    model = Transformer(PRESETS["debug-llama"])
    tokens = torch.randint(0, 256, (2, 24))
    plain = model.tok_emb(tokens)
    handle = add_neftune(model, 5.0)
    torch.manual_seed(7)
    ours = model.tok_emb(tokens)
    model.tok_emb.neftune_noise_alpha = 5.0
    torch.manual_seed(7)
    theirs = neftune_post_forward_hook(model.tok_emb, (tokens,), plain)
    assert torch.equal(ours, theirs)
    bound = 5.0 / (24 * 64) ** 0.5
    assert 0.9 * bound < (ours - plain).abs().max() <= bound * (1 + 1e-6)  # (the sum rounded once)
    model.eval()
    assert torch.equal(model.tok_emb(tokens), plain)
    model.train()
    handle.remove()
    assert torch.equal(model.tok_emb(tokens), plain)
