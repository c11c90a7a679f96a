"""FlexAttention's block mask against SDPA's dense mask: the same logits for packed documents, padding, a
shared prefix, a sliding window and grouped-query heads, and the choice of kernel.

The mask is temper's part (one `mask_mod` for both kernels), so the CPU tests compare forwards: torch refuses
flex_attention's backward on a CPU. The `gpu` test compares gradients too, through the compiled CUDA kernel.
"""

from dataclasses import replace

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from temper.model.attention import Segments
from temper.model.config import PRESETS
from temper.model.prefix import apply_prefix
from temper.model.transformer import Transformer

# A CPU runs flex_attention's eager reference on purpose: torch's advice to compile it is for speed.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _model(name: str, **over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(replace(PRESETS[name], **over))


def _positions(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions restarting at 0 wherever a row's id changes (packed documents, padding)."""
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    idx = torch.arange(ids.shape[1]).expand_as(ids)
    start = torch.where(new, idx, 0).cummax(dim=1).values  # (B, T) the index where each token's run began
    return idx - start


# Row 0 packs three documents and ends in padding; row 1 is one document, right-padded.
PACKED = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4 + [-1] * 4, [0] * 19 + [-1] * 5])
SHARED = torch.tensor([[0] * 8 + [1] * 6 + [2] * 7 + [-1] * 3, [0] * 5 + [1] * 10 + [2] * 9])  # a context and its continuations
CASES = {
    # name: (preset, config overrides, segment ids, shared_prefix)
    "packed-mha-learned": ("debug", {}, PACKED, False),
    "packed-gqa-rope": ("debug-llama", {}, PACKED, False),  # debug-llama: 2 kv heads for 4 query heads
    "shared-prefix-gqa": ("debug-llama", {}, SHARED, True),
    "packed-window-gqa": ("debug-llama", {"sliding_window": 5}, PACKED, False),
    "window-without-segments": ("debug-llama", {"sliding_window": 5}, None, False),
    # Gemma 3's layout: a windowed layer (its own RoPE base) then a global one, so two masks in one forward.
    "packed-local-global": ("debug-llama", {"sliding_window": 5, "global_every": 2, "rope_local_theta": 100.0,
                                            "sandwich_norm": True, "qk_norm": True}, PACKED, False),
    # Gemma 2's capped scores: FlexAttention's score_mod against the written-out form, with and without a mask.
    "packed-capped-local-global": ("debug-llama", {"sliding_window": 5, "global_every": 2, "attn_softcap": 0.02},
                                   PACKED, False),
    "capped-without-segments": ("debug-llama", {"attn_softcap": 0.02}, None, False),
    # GPT-OSS's sinks: applied to FlexAttention's output through its log-sum-exp, against the written-out column.
    "packed-sinks-local-global": ("debug-llama", {"sliding_window": 5, "global_every": 2, "attn_sinks": True},
                                  PACKED, False),
    "sinks-without-segments": ("debug-llama", {"attn_sinks": True}, None, False),
    # Llama 4's chunks, counted in each document's positions, beside layers without them
    "packed-chunks": ("debug-llama4", {"sliding_window": 5}, PACKED, False),
    "shared-prefix-chunks": ("debug-llama4", {"sliding_window": 5}, SHARED, True),
}


@pytest.mark.parametrize("case", CASES)
def test_flex_matches_sdpa_logits(case):
    preset, over, ids, shared = CASES[case]
    m = _model(preset, **over).eval()
    x = torch.randint(0, 256, (2, 24))
    kw = {} if ids is None else {"positions": _positions(ids), "segments": Segments(ids, shared_prefix=shared)}
    with torch.no_grad():
        m.attn_impl = "sdpa"
        dense = m(x, **kw)
        m.attn_impl = "flex"
        torch.testing.assert_close(m(x, **kw), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["debug", "debug-llama", "debug-llama4"])
def test_a_packed_document_gives_its_own_logits_under_flex(preset):
    """With positions restarting at each document, a document packed in a row (flex block mask) gets the
    logits it gets alone (no mask at all)."""
    m = _model(preset).eval()
    m.attn_impl = "flex"
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        packed = m(x, positions=_positions(PACKED), segments=Segments(PACKED))
        for row, lo, hi in ((0, 0, 7), (0, 7, 16), (0, 16, 20), (1, 0, 19)):
            alone = m(x[row : row + 1, lo:hi])
            torch.testing.assert_close(packed[row : row + 1, lo:hi], alone, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(packed).all()  # padding sees itself: no NaN anywhere


def test_the_kernel_choice():
    """auto: a dense mask on a CPU; flex: one block mask per forward; SDPA wherever flex cannot serve (no
    mask needed, a KV cache, attention dropout in training, prefix keys); a bad value names the attribute."""
    m = _model("debug-llama", dropout=0.1).eval()
    seg, cpu = Segments(PACKED), torch.device("cpu")
    assert m.attn_impl == "auto" and isinstance(m._attention_mask(seg, 2, 24, cpu)[0], torch.Tensor)
    m.attn_impl = "flex"
    mask, causal = m._attention_mask(seg, 2, 24, cpu)
    assert isinstance(mask, BlockMask) and not causal
    assert m._attention_mask(None, 2, 24, cpu) == (None, True)  # SDPA's is_causal (flash on a GPU)
    cache_mask, _ = m._attention_mask(None, 2, 1, cpu, cache_positions=torch.zeros(2, 1, dtype=torch.long), cache_len=8)
    assert isinstance(cache_mask, torch.Tensor)  # decoding with a cache
    m.train()  # attention dropout: flex has none, so training keeps SDPA and its dense mask
    assert isinstance(m._attention_mask(seg, 2, 24, cpu)[0], torch.Tensor)
    m = _model("debug-llama").eval()
    m.attn_impl = "flex"
    apply_prefix(m, 3)  # prefix keys extend a dense mask
    assert isinstance(m._attention_mask(seg, 2, 24, cpu)[0], torch.Tensor)
    m.attn_impl = "flash"
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        m(torch.zeros(2, 24, dtype=torch.long), segments=seg)


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_flex_under_compile(scope):
    """The block mask, built outside the blocks, goes into blocks compiled in place (`train.parallel`'s
    per-block compile) or is built inside a whole compiled model; aot_eager traces the same graph as a GPU's
    inductor, without generating code, so the numbers are SDPA's."""
    torch._dynamo.reset()
    m = _model("debug-llama", sliding_window=5).eval()
    x = torch.randint(0, 256, (2, 24))
    batches = [{"positions": _positions(ids), "segments": Segments(ids)} for ids in (PACKED, PACKED.flip(1))]
    with torch.no_grad():
        m.attn_impl = "sdpa"
        dense = [m(x, **kw) for kw in batches]  # eager
        if scope == "blocks":
            for block in m.layers:
                block.compile(backend="aot_eager")
        else:
            m.compile(backend="aot_eager")
        m.attn_impl = "flex"
        for kw, want in zip(batches, dense, strict=True):  # a new batch: new ids, the same graph
            torch.testing.assert_close(m(x, **kw), want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("over", [{}, {"attn_softcap": 0.5, "attn_sinks": True}])
def test_compiled_flex_on_cuda_matches_sdpa(over):
    """The compiled CUDA kernels, called from eager blocks and traced inside blocks compiled in place
    (`train.parallel`'s compile): float32 logits and gradients agree with SDPA's dense mask (with capped scores and
    sinks: with the written-out attention, the sinks' gradient through flex's log-sum-exp included), and bf16 flex
    is as close to the float32 reference as bf16 SDPA is."""
    T = 512  # several 128-token blocks, so that whole blocks are skipped
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate((200, 150, 100))] + [torch.full((62,), -1)])
    ids = torch.stack([ids, torch.zeros(T, dtype=torch.long)])
    kw = {"positions": _positions(ids).cuda(), "segments": Segments(ids.cuda())}
    m = _model("debug-llama", max_seq_len=T, sliding_window=300, **over).cuda()
    if over:
        with torch.no_grad():
            for layer in m.layers:
                layer.attn.sinks.normal_()  # sinks that differ by head
    x = torch.randint(0, 256, (2, T), device="cuda")

    def run(impl: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.attn_impl = impl
        m.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = m(x, **kw)
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device="cuda")).sum().backward()
        return logits.float().detach(), [p.grad.clone() for p in m.parameters()]

    assert m.attn_impl == "auto" and isinstance(m._attention_mask(kw["segments"], 2, T, x.device)[0], BlockMask)
    for compiled in (False, True):
        if compiled:
            for block in m.layers:
                block.compile()
        ref, ref_grads = run("sdpa", torch.float32)
        flex32, flex_grads = run("auto", torch.float32)
        torch.testing.assert_close(flex32, ref, rtol=1e-4, atol=1e-4)
        for g_flex, g_ref in zip(flex_grads, ref_grads, strict=True):
            torch.testing.assert_close(g_flex, g_ref, rtol=1e-3, atol=1e-3)
        err_sdpa = (run("sdpa", torch.bfloat16)[0] - ref).abs().max()
        err_flex = (run("auto", torch.bfloat16)[0] - ref).abs().max()
        assert err_flex <= 2 * err_sdpa + 1e-3, (compiled, err_flex, err_sdpa)
