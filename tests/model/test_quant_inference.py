"""Weight-only quantization for inference (int8, int4, nf4) on CPU: each kind keeps the logits near
float32's and greedy choices mostly equal, runs through the engine's KV cache as through full forward
passes, stores ~1/4 (int8) or ~1/8 (4-bit) of float32's bytes plus its scales, and loads through
`load_for_inference`, `temper generate` and `temper evaluate` with --quant; what cannot be quantized
is one clear error before anything changes."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.errors import InputError
from temper.infer.engine import generate
from temper.infer.load import load_for_inference
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.hf.files import CheckpointError
from temper.model.transformer import Transformer

pytest.importorskip("torchao")
from temper.model.quant import (  # noqa: E402
    QUANT_KINDS,
    QuantError,
    check_quant,
    quantize_for_inference,
    storage_bytes,
    weight_bytes,
)

CFG = replace(PRESETS["debug-llama"], tie_embeddings=False)  # dim 64, ffn 192: every layer fits groups of 64
# Measured on this model (random init, N(0, 0.02) weights): int8 0.003, int4 0.055, nf4 0.056.
MAX_REL_ERROR = {"int8": 0.02, "int4": 0.15, "nf4": 0.15}


@pytest.fixture(scope="module")
def base() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def _quantized(base: Transformer, kind: str, dtype: torch.dtype = torch.float32, **kw) -> Transformer:
    model = copy.deepcopy(base).to(dtype)
    names = quantize_for_inference(model, kind, **kw)
    assert len(names) == 7 * CFG.n_layers and "head" not in names  # the head stays in the model's dtype
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", QUANT_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_stay_near_float32s_and_greedy_choices_mostly_agree(base, kind, dtype):
    x = torch.randint(0, CFG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(x)
        got = _quantized(base, kind, dtype)(x)
    assert got.dtype == dtype
    assert _rel(got, ref) < MAX_REL_ERROR[kind]
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > (0.95 if kind == "int8" else 0.7), agree


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_the_engine_decodes_a_quantized_model_as_full_forward_passes_do(base, kind):
    """prefill + decode_step over the KV cache give the greedy tokens that re-running the whole
    sequence gives, for prompts of different lengths in one batch."""
    model = _quantized(base, kind)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [42]]
    out = generate(model, prompts, max_new_tokens=6, temperature=0)
    for p, tokens in zip(prompts, out, strict=True):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
        assert tokens == ids[len(p):]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_bytes_shrink_to_a_quarter_and_an_eighth_plus_scales(base, dtype):
    """Per layer, against the weight in `dtype`: int8 is 1 byte per weight + a float32 scale and an int8 zero
    per row; int4 packs two codes per byte + a scale and zero per group of 64 in `dtype`; NF4 packs two
    codes per byte + an int8 scale per block of 64, double-quantized, and a fixed ~100 bytes per tensor
    (its 16-level table, the scales' mean and factors)."""
    plain = copy.deepcopy(base).to(dtype)
    size = torch.finfo(dtype).bits // 8
    for kind, low, high in [("int8", 1, 1 + 5 / 64), ("int4", 0.5, 0.5 + 2 * size / 64), ("nf4", 0.5, 0.5 + 1.1 / 64)]:
        model = _quantized(base, kind, dtype)
        quantized, n_quantized = 0, 0
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear) and name != "head":
                n = layer.weight.numel()
                assert low * n < storage_bytes(layer.weight) <= high * n + (100 if kind == "nf4" else 0), (kind, name)
                quantized, n_quantized = quantized + storage_bytes(layer.weight), n_quantized + n
        # the rest (embeddings, norms, head) as it was
        assert weight_bytes(model) == quantized + weight_bytes(plain) - n_quantized * size
    assert weight_bytes(plain) == sum(p.numel() for p in plain.parameters()) * size


def test_group_size_and_the_int8_per_group_variant(base):
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        ref = base(x)
        errors = {g: _rel(_quantized(base, "int4", group_size=g)(x), ref) for g in (32, 64)}
        assert errors[32] < errors[64]  # finer groups, smaller error
        assert _rel(_quantized(base, "int8", group_size=32)(x), ref) < MAX_REL_ERROR["int8"]
        assert _rel(_quantized(base, "nf4", group_size=32)(x), ref) < MAX_REL_ERROR["nf4"]


def test_what_cannot_be_quantized_is_one_clear_error_before_any_change(base):
    model = copy.deepcopy(base)
    with pytest.raises(QuantError, match=r"unknown quantization 'int3': choose one of int8, int4, nf4"):
        quantize_for_inference(model, "int3")
    with pytest.raises(QuantError, match=r"cannot quantize to int4: layers\.0\.attn\.q_proj has 64 input features, "
                                         r"not a multiple of group_size 128"):
        quantize_for_inference(model, "int4", group_size=128)
    assert all(type(p) is nn.Parameter for p in model.parameters())  # nothing changed
    quantize_for_inference(model, "int8")
    with pytest.raises(QuantError, match="already quantized"):
        quantize_for_inference(model, "nf4")
    assert issubclass(QuantError, InputError)
    with pytest.raises(QuantError, match="int4 on CUDA .* needs bfloat16 weights"):
        check_quant("int4", "cuda", torch.float32)  # decided before any CUDA call
    with pytest.raises(QuantError, match="runs on cpu or cuda, not meta"):
        check_quant("int8", "meta", torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    tok = train_tokenizer(["the cat sat on the mat", "a dog ran to the cat"] * 10, "bpe", 320, ["<|endoftext|>"])
    cfg = replace(CFG, vocab_size=320)
    torch.manual_seed(0)
    save_hf(Transformer(cfg).eval(), cfg, root / "final")
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": "<|endoftext|>"}), root / "final")
    (root / "doc.txt").write_text("the cat sat on the mat\n\na dog ran to the cat\n")
    return root


def test_load_generate_and_evaluate_take_quant(checkpoint, tmp_path, capsys):
    from temper.recipes.evaluate import main as evaluate
    from temper.recipes.generate import main as generate_cli

    loaded = load_for_inference(checkpoint / "final", quant="int4")
    plain = load_for_inference(checkpoint / "final").model
    assert not plain.tok_emb.weight.untyped_storage().resizable()  # float32 weights load as maps of the file
    # once quantized, what stays float is copied out, so the file's map (and the pages quantizing read) go
    assert all(p.untyped_storage().resizable() for p in loaded.model.parameters() if type(p) is nn.Parameter)
    q = _quantized(plain, "int4")
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), q(x))  # the same quantization as quantizing the model directly
    args = ["--checkpoint", str(checkpoint / "final"), "--prompt", "the cat", "--max_new_tokens=4",
            "--temperature=0", "--device=cpu"]
    assert generate_cli([*args, "--quant=nf4"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert evaluate(["--checkpoint", str(checkpoint / "final"), "--perplexity.files", str(checkpoint / "doc.txt"),
                     "--out", str(tmp_path / "eval"), "--device=cpu", "--progress=false", "--quant=int8"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_a_bad_quant_is_one_line_before_the_weights_load(checkpoint, capsys):
    from temper.recipes.generate import main as generate_cli

    with pytest.raises(InputError, match="quant"):  # the config's choices, named at parse time
        generate_cli(["--checkpoint", str(checkpoint / "final"), "--prompt", "x", "--quant=int2"])
    with pytest.raises(CheckpointError, match=r"checkpoint .*final: int4 on CUDA .* needs bfloat16"):
        load_for_inference(checkpoint / "final", device="cuda", dtype=torch.float16, quant="int4")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_on_cuda_each_kind_decodes_compiled_as_eager(base, kind):
    """CUDA's kernels (int4: tinygemm, bfloat16 only) through the engine, eager and compiled (CUDA graphs)."""
    model = copy.deepcopy(base).to("cuda", torch.bfloat16)
    quantize_for_inference(model, kind)
    x = torch.randint(0, CFG.vocab_size, (4, 32), device="cuda")
    with torch.no_grad():
        ref = copy.deepcopy(base).to("cuda")(x)
        assert _rel(model(x), ref) < MAX_REL_ERROR[kind] + 0.02  # bfloat16 activations add ~1%
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    eager = generate(model, prompts, max_new_tokens=8, temperature=0)
    assert generate(model, prompts, max_new_tokens=8, temperature=0, compile=True) == eager
