"""Distillation losses against TRL's `GKDTrainer.generalized_jsd_loss` (called directly) and torch's kl_div,
the loss on real models with the hard-label mix, and the teacher's top-k cache: a round trip, its
checks, and k = V giving the on-the-fly loss exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from temper.align.distill import DistillLoss, generalized_jsd, topk_logprobs
from temper.align.topk_cache import build_cache, fingerprint, open_cache
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.losses import IGNORE_INDEX, Batch

B, T, V = 3, 7, 50


def _logits_and_labels():
    g = torch.Generator().manual_seed(0)
    student = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    return student, teacher, labels


def _ours(student, teacher, labels, beta, temperature):
    """Mean per valid token of our divergence, on full logits."""
    valid = labels != IGNORE_INDEX
    s = torch.log_softmax(student[valid] / temperature, dim=-1)
    t = torch.log_softmax(teacher[valid] / temperature, dim=-1)
    return generalized_jsd(s, t, beta).sum() / valid.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_generalized_jsd_equals_trl(beta, temperature):
    """Value and gradient; TRL defines beta 0 as forward KL(teacher || student) and beta 1 as reverse KL."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    student, teacher, labels = _logits_and_labels()
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s1, teacher, labels=labels, beta=beta, temperature=temperature)
    ours = _ours(s2, teacher, labels, beta, temperature)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_equal_torch_kl_div(temperature):
    student, teacher, labels = _logits_and_labels()
    valid = labels != IGNORE_INDEX
    s = torch.log_softmax(student[valid] / temperature, dim=-1)
    t = torch.log_softmax(teacher[valid] / temperature, dim=-1)
    forward = F.kl_div(s, t.exp(), reduction="sum")  # KL(teacher || student): kl_div(input=log q, target=p)
    reverse = F.kl_div(t, s.exp(), reduction="sum")
    torch.testing.assert_close(generalized_jsd(s, t, 0.0).sum(), forward, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0).sum(), reverse, rtol=1e-6, atol=1e-6)
    assert generalized_jsd(s, s, 0.5).abs().max() < 1e-12  # zero on equal distributions


def _models():
    cfg = replace(PRESETS["debug"], vocab_size=V, max_seq_len=16)
    torch.manual_seed(0)
    student = Transformer(cfg).eval()
    teacher = Transformer(replace(cfg, dim=96, n_heads=4)).eval()
    return student, teacher


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, T + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :3] = IGNORE_INDEX
    targets[2, 5:] = IGNORE_INDEX
    return Batch(tokens[:, :-1], targets)


@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.9)])
def test_loss_on_models_mixes_trl_divergence_and_cross_entropy(kind, beta):
    gkd = pytest.importorskip("trl.experimental.gkd")
    student, teacher = _models()
    batch = _batch()
    loss_fn = DistillLoss(kind, beta=beta, temperature=2.0, alpha=0.3, teacher=teacher)
    out = loss_fn(student, batch)
    n = int(loss_fn.count(batch))
    with torch.no_grad():
        s_logits, t_logits = student(batch.inputs), teacher(batch.inputs)
    div = gkd.GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=batch.targets, beta=beta, temperature=2.0)
    ce = F.cross_entropy(s_logits.reshape(-1, V), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss_sum / n, 0.3 * div + 0.7 * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics[loss_fn.metric] / n, div, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["ce"] / n, ce, rtol=1e-5, atol=1e-6)
    out.loss_sum.backward()  # the student gets gradients, the frozen teacher none
    assert student.tok_emb.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def _units():
    """Each row one unit; unit u = row u, its positions the row's valid targets."""
    batch = _batch()
    counts = (batch.targets != IGNORE_INDEX).sum(-1).tolist()
    return batch, counts


def _build(tmp_path, teacher, k, dtype="float32", name="cache"):
    batch, counts = _units()

    def batch_of(j):  # two batches: rows 0-1 and row 2, to cover the split
        rows = [0, 1] if j == 0 else [2]
        return rows, Batch(batch.inputs[rows], batch.targets[rows])

    fp = fingerprint({"k": k, "dtype": dtype})
    return build_cache(tmp_path / name, teacher, 2, batch_of, counts, k=k, dtype=dtype, fingerprint=fp), fp


def test_cache_round_trip_and_checks(tmp_path):
    _, teacher = _models()
    batch, counts = _units()
    cache, fp = _build(tmp_path, teacher, k=5, dtype="float16")
    assert cache.units == B and cache.ids.shape == (sum(counts), 5)
    valid = batch.targets != IGNORE_INDEX
    with torch.no_grad():
        top = torch.log_softmax(teacher(batch.inputs, logits_at=valid).float(), -1).topk(5, dim=-1)
    got = cache.positions([0, 1, 2])
    assert torch.equal(got["teacher_ids"], top.indices)
    torch.testing.assert_close(got["teacher_logps"], top.values, rtol=1e-3, atol=2e-3)  # float16
    part = cache.positions([2, 0])  # any order of units: their rows concatenated
    assert torch.equal(part["teacher_ids"], torch.cat([top.indices[counts[0] + counts[1]:], top.indices[:counts[0]]]))
    # Reopened: the same; another fingerprint or a flipped byte: refused with the reason.
    again, why = open_cache(tmp_path / "cache", fp)
    assert why == "" and np.array_equal(again.ids, cache.ids)
    assert open_cache(tmp_path / "cache", "other")[1].endswith("caches another teacher, data set or setting")
    raw = bytearray((tmp_path / "cache" / "logps.bin").read_bytes())
    raw[3] ^= 0xFF
    (tmp_path / "cache" / "logps.bin").write_bytes(bytes(raw))
    assert "checksum" in open_cache(tmp_path / "cache", fp)[1]
    assert not (tmp_path / "cache.partial").exists()
    assert open_cache(tmp_path / "absent", fp) == (None, "no cache yet")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_cache_of_the_whole_vocabulary_gives_the_on_the_fly_loss(tmp_path, kind):
    """With k = V both renormalised distributions are the full ones: the cached loss is the exact loss."""
    student, teacher = _models()
    cache, _ = _build(tmp_path, teacher, k=V)
    batch = _batch()
    live = DistillLoss(kind, temperature=1.5, alpha=0.5, teacher=teacher)(student, batch)
    cached_batch = Batch(batch.inputs, batch.targets, extra=cache.positions([0, 1, 2]))
    cached = DistillLoss(kind, temperature=1.5, alpha=0.5)(student, cached_batch)
    torch.testing.assert_close(cached.loss_sum, live.loss_sum, rtol=1e-5, atol=1e-5)


def test_top_k_cache_renormalises_both_on_the_teachers_ids(tmp_path):
    student, teacher = _models()
    cache, _ = _build(tmp_path, teacher, k=4)
    batch = _batch()
    extra = cache.positions([0, 1, 2])
    out = DistillLoss("forward_kl", temperature=2.0, alpha=1.0)(student, Batch(batch.inputs, batch.targets, extra=extra))
    valid = batch.targets != IGNORE_INDEX
    with torch.no_grad():
        s_logits, t_logits = student(batch.inputs)[valid], teacher(batch.inputs)[valid]
    ids = extra["teacher_ids"]
    p_t = torch.softmax(t_logits.gather(-1, ids) / 2.0, -1)
    log_q = torch.log_softmax(s_logits.gather(-1, ids) / 2.0, -1)
    expected = (p_t * (p_t.log() - log_q)).sum()
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-5)


def _unchunked(kind, student, teacher, batch, extra, temperature, alpha):
    """The loss on full (N, V) logits of both models: the formula the chunked loss must equal."""
    valid = batch.targets != IGNORE_INDEX
    logits = student(batch.inputs)[valid].float()
    ce = F.cross_entropy(logits, batch.targets[valid], reduction="sum")
    if extra:
        s, t = topk_logprobs(logits, extra["teacher_ids"], extra["teacher_logps"], temperature)
    else:
        with torch.no_grad():
            t_logits = teacher(batch.inputs)[valid].float()
        s, t = torch.log_softmax(logits / temperature, -1), torch.log_softmax(t_logits / temperature, -1)
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, 0.7)
    div = generalized_jsd(s, t, beta).sum()
    return alpha * div + (1 - alpha) * ce, div, ce


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_loss_equals_full_logits_in_value_and_gradient(tmp_path, kind, cached):
    """Chunks of 3 positions (fewer than a row's 7; 16 valid positions, so the last chunk is partial) give the
    loss, metrics and every student gradient of the loss on the full logits."""
    student, teacher = _models()
    student.train()
    batch = _batch()
    extra = _build(tmp_path, teacher, k=6)[0].positions([0, 1, 2]) if cached else {}
    loss_fn = DistillLoss(kind, beta=0.7, temperature=1.5, alpha=0.4, teacher=None if cached else teacher, chunk=3)
    out = loss_fn(student, Batch(batch.inputs, batch.targets, extra=extra))
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    loss, div, ce = _unchunked(kind, student, teacher, batch, extra, 1.5, 0.4)
    loss.backward()
    torch.testing.assert_close(out.loss_sum, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics[loss_fn.metric], div.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["ce"], ce.detach(), rtol=1e-5, atol=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_no_logits_are_kept_for_the_backward(kind):
    """What autograd saves between forward and backward, counted by a saved-tensors hook (deterministic, unlike a
    peak-memory reading): no (positions x V) tensor, only the hidden states; the full-logit loss keeps 20-40 x V
    bytes per position (module docstring)."""
    student, teacher = _models()
    batch = _batch()
    vocab_sized = []
    weights = {p.untyped_storage().data_ptr() for p in [*student.parameters(), *teacher.parameters()]}

    def pack(t):
        if t.dim() == 2 and t.shape[-1] == V and t.untyped_storage().data_ptr() not in weights:
            vocab_sized.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = DistillLoss(kind, temperature=2.0, teacher=teacher, chunk=4)(student, batch)
        _unchunked(kind, student, teacher, batch, {}, 2.0, 0.5)[0].backward()  # the control: it keeps them
    n = int((batch.targets != IGNORE_INDEX).sum())
    assert vocab_sized and all(shape == (n, V) for shape in vocab_sized)  # all from the control
    vocab_sized.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = DistillLoss(kind, temperature=2.0, teacher=teacher, chunk=4)(student, batch)
    assert vocab_sized == []
    out.loss_sum.backward()
    assert student.tok_emb.weight.grad is not None


def test_a_batch_without_valid_targets_still_has_a_graph():
    """A rank left with only ignored targets must still take part in the backward (DDP)."""
    student, teacher = _models()
    batch = _batch()
    empty = Batch(batch.inputs, torch.full_like(batch.targets, IGNORE_INDEX))
    out = DistillLoss("jsd", teacher=teacher, chunk=4)(student, empty)
    assert out.loss_sum.item() == 0 and out.loss_sum.requires_grad
    out.loss_sum.backward()


def test_cache_is_built_a_chunk_of_positions_at_a_time(tmp_path, monkeypatch):
    """The teacher's output layer and softmax in chunks of 3 positions write the cache the full logits give."""
    import temper.align.topk_cache as topk_cache

    _, teacher = _models()
    whole, _ = _build(tmp_path, teacher, k=5, name="whole")
    monkeypatch.setattr(topk_cache, "distill_chunk_tokens", lambda vocab: 3)
    chunked, _ = _build(tmp_path, teacher, k=5, name="chunked")
    assert np.array_equal(chunked.ids, whole.ids)
    np.testing.assert_allclose(chunked.logps, whole.logps, rtol=1e-6, atol=1e-6)  # matrix products of other shapes
