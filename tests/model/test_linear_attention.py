"""Gated DeltaNet, the linear attention of Qwen3.5: the chunked rule equals the token-by-token recurrence (outputs,
final state and gradients), as it does Mamba 2's without the correction, and Mamba's two-level scan equals its
recurrence. For it, Mamba 2 (Granite 4.0-H's), Mamba and LFM2's short convolutions (between irregularly placed attention
layers), a packed row equals its documents alone, padding changes nothing, and a cache (prefill in pieces, right-padded
rows, forks, resets) gives the cache-free forward's logits. Parity with transformers' Qwen3.5, LFM2, Granite 4.0-H and
Mamba is in test_hf.py, speculative decoding in tests/infer/test_speculative.py."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from temper.infer.cache import fork, new_cache, reset
from temper.infer.engine import decode_step, generate, prefill
from temper.model import linear_attention
from temper.model.attention import Segments
from temper.model.config import ModelConfig
from temper.model.linear_attention import gated_delta_rule, selective_scan
from temper.model.transformer import Transformer

HYBRID = ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_size=16, mlp="swiglu",
                     norm="rmsnorm", pos="rope", rope_dim=4, bias=False, qk_norm=True, norm_unit_offset=True,
                     attn_output_gate=True, full_attention_every=2, linear_key_heads=2, linear_value_heads=4,
                     linear_key_size=8, linear_value_size=6, max_seq_len=160)
SHORT_CONV = replace(HYBRID, attn_output_gate=False, full_attention_every=None, attention_layers=(1, 2),
                     linear_layer="short_conv", linear_conv_size=3, rope_dim=None, norm_unit_offset=False)  # LFM2's layers
MAMBA2 = replace(SHORT_CONV, linear_layer="mamba2", linear_conv_size=4, linear_value_heads=4, linear_key_size=8,
                 linear_value_size=8)  # Granite 4.0-H's layers: 4 heads of 8, 2 groups of B and C, a state of 8
MAMBA = replace(MAMBA2, linear_layer="mamba", linear_key_heads=1, linear_value_heads=64, linear_value_size=1,
                linear_dt_rank=4)  # Mamba's layers (between attention ones, as Jamba's): 64 channels, a state of 8
LINEAR = pytest.mark.parametrize("cfg", [HYBRID, SHORT_CONV, MAMBA2, MAMBA],
                                 ids=["deltanet", "short_conv", "mamba2", "mamba"])


def _recurrence(q, k, v, g, beta, state=None, delta=True):
    """The gated delta rule one token at a time, as written in Yang et al. 2024 (eq. 10); delta=False: Mamba 2's
    recurrence (Dao and Gu 2024, eq. 1: h_t = exp(dt A) h_{t-1} + dt B_t x_t, y_t = C_t h_t)."""
    B, H, T, Dk = k.shape
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=q.dtype) if state is None else state
    out = []
    for t in range(T):
        S = S * g[:, :, t, None, None].exp()
        kt = k[:, :, t]
        written = v[:, :, t] - (kt[..., None] * S).sum(-2) if delta else v[:, :, t]
        S = S + kt[..., None] * (written * beta[:, :, t, None])[..., None, :]
        out.append((q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(out, 2), S


def test_groups_of_queries_and_keys_serve_their_heads_unrepeated():
    """Mamba 2's B and C: 2 groups of queries and keys, each serving 3 consecutive value heads, give what repeating
    them to every head gives, gradients summed over the heads they serve; the delta rule refuses groups."""
    q, k, v, g, beta = _inputs(H=6)
    q, k = q[:, ::3].detach().clone(), k[:, ::3].detach().clone()  # (B, 2, T, Dk)
    state = torch.randn(2, 6, 8, 6, dtype=torch.float64)
    for x in (q, k, v, g, beta, state):
        x.requires_grad_(True)
    ref = gated_delta_rule(q.repeat_interleave(3, 1), k.repeat_interleave(3, 1), v, g, beta, state, chunk=8,
                           delta=False)
    _assert_equal_with_gradients(gated_delta_rule(q, k, v, g, beta, state, chunk=8, delta=False), ref,
                                 (q, k, v, g, beta, state), atol=1e-12)
    step, _ = gated_delta_rule(q[:, :, :1], k[:, :, :1], v[:, :, :1], g[:, :, :1], beta[:, :, :1], state,
                                        delta=False)  # a decoding step
    torch.testing.assert_close(step, ref[0][:, :, :1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 query/key heads cannot serve 6 value heads .the delta rule"):
        gated_delta_rule(q, k, v, g, beta, state)


def _assert_equal_with_gradients(got, want, inputs, atol: float) -> None:
    """Two rules' (outputs, final state) equal to `atol`, and one loss's gradients over each to `inputs` to 10x."""
    (out, final), (ref, ref_final) = got, want
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=atol)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum() + final.sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum() + ref_final.sum(), inputs)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=10 * atol)


def _inputs(B=2, H=3, T=37, Dk=8, Dv=6, dtype=torch.float64):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(B, H, T, Dk, dtype=dtype), dim=-1) * Dk ** -0.5
    k = F.normalize(torch.randn(B, H, T, Dk, dtype=dtype), dim=-1)
    return q, k, torch.randn(B, H, T, Dv, dtype=dtype), -torch.rand(B, H, T, dtype=dtype), torch.rand(B, H, T,
                                                                                                      dtype=dtype)


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "mamba2"])
@pytest.mark.parametrize("chunk", [1, 8, 64])  # a chunk per token, a padded last chunk, one chunk
def test_chunks_compute_the_recurrence(chunk, delta):
    q, k, v, g, beta = _inputs()
    state = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    for x in (q, k, v, g, beta, state):
        x.requires_grad_(True)
    _assert_equal_with_gradients(gated_delta_rule(q, k, v, g, beta, state, chunk=chunk, delta=delta),
                                 _recurrence(q, k, v, g, beta, state, delta=delta), (q, k, v, g, beta, state), atol=1e-10)


def test_documents_restart_the_state():
    q, k, v, g, beta = _inputs()
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [5] * 37])  # boundaries inside chunks and across them
    for delta in (True, False):
        out, final = gated_delta_rule(q, k, v, g, beta, doc=doc, chunk=8, delta=delta)
        for b, spans in enumerate([[(0, 10), (10, 30), (30, 37)], [(0, 37)]]):
            for lo, hi in spans:
                ref, ref_final = _recurrence(*(x[b : b + 1, :, lo:hi] for x in (q, k, v, g, beta)), delta=delta)
                torch.testing.assert_close(out[b : b + 1, :, lo:hi], ref, rtol=0, atol=1e-10)
            torch.testing.assert_close(final[b : b + 1], ref_final, rtol=0, atol=1e-10)  # the last document's state


def _selective_recurrence(x, dt, A, b, c, state, doc=None):
    """Mamba's scan one token at a time (Gu and Dao 2023, Algorithm 2), restarting where the document changes."""
    out = []
    for t in range(x.shape[1]):
        if doc is not None and t > 0:
            state = state * (doc[:, t] == doc[:, t - 1]).to(state.dtype)[:, None, None]
        state = (dt[:, t, :, None] * A).exp() * state + (dt[:, t] * x[:, t])[..., None] * b[:, t, None, :]
        out.append((state * c[:, t, None, :]).sum(-1))
    return torch.stack(out, 1), state


@pytest.mark.parametrize("T", [1, 36, 37])  # a decoding step, chunks that fill the row, a padded last chunk
@pytest.mark.parametrize("documents", [False, True])
def test_selective_scan_computes_the_recurrence(T, documents):
    """Mamba's two-level scan (chunks from zero, then the states entering them) equals the recurrence in float64:
    outputs, final state and gradients, from a given state, with documents restarting it inside chunks and across."""
    torch.manual_seed(0)
    B, D, N = 2, 5, 3
    x, b, c = torch.randn(B, T, D, dtype=torch.float64), *torch.randn(2, B, T, N, dtype=torch.float64)
    dt, A = torch.rand(B, T, D, dtype=torch.float64), -3 * torch.rand(D, N, dtype=torch.float64)
    state = torch.randn(B, D, N, dtype=torch.float64)
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [5] * 37])[:, :T] if documents else None
    inputs = (x, dt, A, b, c, state)
    for t in inputs:
        t.requires_grad_(True)
    _assert_equal_with_gradients(selective_scan(*inputs, doc), _selective_recurrence(*inputs, doc), inputs,
                                 atol=1e-12)


@pytest.mark.parametrize("documents", [False, True])
def test_the_checkpointed_scan_carries_its_state_across_stretches(monkeypatch, documents):
    """Training's scan, in recomputed stretches of 8 tokens (a document starting at a stretch's first token, and inside
    one), equals the whole scan: outputs, final state and gradients."""
    monkeypatch.setattr(linear_attention, "SCAN_SEGMENT", 8)
    torch.manual_seed(0)
    x, b, c = torch.randn(2, 37, 5, dtype=torch.float64), *torch.randn(2, 2, 37, 3, dtype=torch.float64)
    dt, A = torch.rand(2, 37, 5, dtype=torch.float64), -3 * torch.rand(5, 3, dtype=torch.float64)
    state = torch.randn(2, 5, 3, dtype=torch.float64)
    doc = torch.tensor([[0] * 16 + [1] * 14 + [2] * 7, [5] * 37]) if documents else None
    inputs = (x, dt, A, b, c, state)
    for t in inputs:
        t.requires_grad_(True)
    _assert_equal_with_gradients(linear_attention.checkpointed_scan(*inputs, doc), selective_scan(*inputs, doc),
                                 inputs, atol=1e-12)


def test_selective_scan_restarts_where_a_document_does():
    """Guards the test above: with the documents' restarts, row 0's outputs from the second document on differ."""
    torch.manual_seed(0)
    x, dt = torch.randn(1, 37, 5, dtype=torch.float64), torch.rand(1, 37, 5, dtype=torch.float64)
    b, c, A = *torch.randn(2, 1, 37, 3, dtype=torch.float64), -torch.rand(5, 3, dtype=torch.float64)
    doc = torch.tensor([[0] * 10 + [1] * 27])
    alone, _ = selective_scan(x, dt, A, b, c)
    packed, _ = selective_scan(x, dt, A, b, c, doc=doc)
    torch.testing.assert_close(packed[:, :10], alone[:, :10], rtol=0, atol=0)
    # in float64: the second document alone is scanned in other chunks (float32 put them 1e-6 apart, on 10)
    torch.testing.assert_close(packed[:, 10:], selective_scan(*(t[:, 10:] for t in (x, dt)), A, b[:, 10:],
                                                              c[:, 10:])[0], rtol=0, atol=1e-12)
    assert (packed[:, 10:] - alone[:, 10:]).abs().max() > 1e-2


def _model(cfg: ModelConfig = HYBRID) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        for m in model.modules():  # decay rates as trained models have them: most of the state kept per token
            if hasattr(m, "A_log"):
                m.A_log.uniform_(-3, 0)
    return model


@LINEAR
def test_a_packed_row_computes_its_documents_alone_and_padding_changes_nothing(cfg):
    model = _model(cfg)
    torch.manual_seed(1)
    a, b = torch.randint(0, 97, (1, 23)), torch.randint(0, 97, (1, 50))
    pad = torch.zeros(1, 5, dtype=torch.long)
    row = torch.cat((a, pad, b, pad), dim=1)  # padding between and after the documents
    ids = torch.tensor([[1] * 23 + [-1] * 5 + [2] * 50 + [-1] * 5])
    with torch.no_grad():
        packed = model(row, segments=Segments(ids))
        torch.testing.assert_close(packed[:, :23], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 28:78], model(b), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="shared_prefix"):
            model(row, segments=Segments(ids.clamp(min=0), shared_prefix=True))
        with pytest.raises(ValueError, match="segments.ids must be"):  # named, not a gather's index error
            model(row, segments=Segments(ids[:, :-1]))


@LINEAR
def test_a_cache_gives_the_forward_logits_in_pieces_padded_forked_and_reset(cfg):
    model = _model(cfg)
    torch.manual_seed(2)
    x = torch.randint(0, 97, (3, 90))
    lengths = [90, 41, 7]
    with torch.no_grad():
        alone = [model(x[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
        cache = new_cache(model, 4, 96)
        # right-padded rows of different lengths in one prefill, then the longest in two more pieces
        last = prefill(model, cache, x[:, :30], lengths=[30, 30, 7])
        torch.testing.assert_close(last[2], alone[2][6], rtol=0, atol=1e-5)
        prefill(model, cache, [x[0, 30:70].tolist(), x[1, 30:41].tolist()], rows=[0, 1])
        prefill(model, cache, [x[0, 70:89].tolist()], rows=[0])
        assert cache.lengths.tolist() == [89, 41, 7, 0]
        fed = torch.tensor([[x[0, 89]], [11], [12], [13]])  # every row takes a token
        torch.testing.assert_close(decode_step(model, cache, fed)[0], alone[0][89], rtol=0, atol=1e-5)
        # a fork continues as its source does; a reset row restarts from an empty state, whatever it held
        fork(cache, 1, [3])
        reset(cache, [2])
        prefill(model, cache, [x[2, :7].tolist()], rows=[2])
        nxt = torch.tensor([[5], [6], [7], [6]])
        step = decode_step(model, cache, nxt)
        torch.testing.assert_close(step[1], step[3], rtol=0, atol=0)
        torch.testing.assert_close(step[2], model(torch.cat((x[2:3, :7], nxt[2:3]), 1))[0, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(step[1], model(torch.cat((x[1:2, :41], fed[1:2], nxt[1:2]), 1))[0, -1], rtol=0,
                                   atol=1e-5)


@LINEAR
def test_generation_equals_the_cache_free_forward(cfg):
    model = _model(cfg)
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    out = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    with torch.no_grad():
        for p, o in zip(prompts, out, strict=True):
            seq = p + o
            logits = model(torch.tensor([seq[:-1]]))[0, len(p) - 1 :]
            assert logits.argmax(-1).tolist() == o


@LINEAR
def test_training_steps_through_both_kinds_of_layer(cfg):
    model = _model(replace(cfg, max_seq_len=64)).train()
    x = torch.randint(0, 97, (2, 64))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [HYBRID, MAMBA], ids=["deltanet", "mamba"])
def test_cuda_bf16_packed_rows_follow_float32(cfg):
    """On a GPU in bf16, a packed row (FlexAttention's block mask for the attention layers, `Runs` for the linear
    ones) gives the float32 CPU logits to bf16's precision, and its backward runs."""
    model = _model(cfg)
    torch.manual_seed(1)
    row = torch.randint(0, 97, (2, 150))
    ids = torch.tensor([[1] * 40 + [2] * 100 + [-1] * 10, [3] * 150])
    with torch.no_grad():
        ref = model(row, segments=Segments(ids))
    gpu = model.cuda().to(torch.bfloat16).train()
    gpu.attn_impl = "flex"
    out = gpu(row.cuda(), segments=Segments(ids.cuda()))
    real = ids >= 0
    assert (out.float().cpu() - ref)[real].abs().max() < 0.05 * ref.abs().max()
    out.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
