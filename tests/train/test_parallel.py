"""Wrapping for training: per-block compile (one graph for identical blocks, the plain model's names), whole-model
compile with the loss (the eager step's numbers, the plain model's names; refused under a device mesh) and activation checkpointing with the checkpointed inputs offloaded to CPU memory (same gradients)."""

import copy
import functools
import weakref
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from temper.config import ConfigError
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
from temper.train.losses import CompiledLoss, LMLoss
from temper.train.memory import RunShape, estimate
from temper.train.methods import LoRAConfig, apply_method
from temper.train.parallel import (
    MESH_DIMS,
    DistInfo,
    HostEmbedding,
    ParallelConfig,
    apply_activation_checkpointing,
    clip_grads,
    grad_norm,
    parallelize,
    remove_host_embeddings,
    shared_store_restarts,
    shutdown_distributed,
)
from temper.train.run import TrainSection
from temper.train.step import train_step

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


def _grads(model, x):
    model(x).float().pow(2).mean().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_with_and_without_offload_gives_the_same_gradients(offload):
    torch.manual_seed(0)
    plain = Transformer(PRESETS["debug-llama"])
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped, 1, offload=offload)
    x = torch.randint(0, 256, (2, 24))
    ref, got = _grads(plain, x), _grads(wrapped, x)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_activation_offload_holds_gemma4s_frozen_per_layer_table_on_the_host():
    """Gemma 4 E2B's per-layer table (2.3B of its 5.1B parameters) is only looked up: under LoRA and activation offload
    it goes to host memory as the untied token table does (the tied one stays, being the head), with the same logits
    and gradients, and the memory estimate takes it off the device's parameters."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["debug-llama"], per_layer_input_size=8)
    plain = Transformer(cfg)
    apply_method(plain, "lora", LoRAConfig(dropout=0.0))
    model = copy.deepcopy(plain)
    parallelize(model, CPU, activation_checkpointing=1, activation_offload=True)
    assert isinstance(model.per_layer_emb, HostEmbedding) and not isinstance(model.tok_emb, HostEmbedding)
    assert list(model.state_dict()) == list(plain.state_dict()) and model.num_params() == plain.num_params()
    x = torch.randint(0, 256, (2, 24))
    for m in (model, plain):
        m(x).float().pow(2).mean().backward()
    for a, b in zip((p.grad for p in model.parameters() if p.requires_grad),
                    (p.grad for p in plain.parameters() if p.requires_grad), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    remove_host_embeddings(model)
    assert type(model.per_layer_emb) is torch.nn.Embedding and not model.per_layer_emb.weight.requires_grad
    run = RunShape(recipe="lora", precision="bf16", activation_checkpointing=1)
    offloaded = estimate(cfg, replace(run, activation_offload=True))
    table = 2 * plain.per_layer_emb.weight.numel()
    assert estimate(cfg, run)["parameters"].bytes - offloaded["parameters"].bytes == table


def test_activation_offload_holds_a_frozen_untied_embedding_on_the_host():
    """Under activation offload a LoRA model's frozen, untied token table becomes a `HostEmbedding`: the same state
    dict (names, order, tensors), no parameter any more (callers read the device off the first one), the same
    gradients; the KV cache still takes the weights' dtype; the export puts a plain frozen embedding back. A
    trained or tied table stays where it is."""
    torch.manual_seed(0)
    plain = Transformer(replace(PRESETS["debug-llama"], tie_embeddings=False))
    apply_method(plain, "lora", LoRAConfig(dropout=0.0))
    model = copy.deepcopy(plain)
    parallelize(model, CPU, activation_checkpointing=1, activation_offload=True)
    assert isinstance(model.tok_emb, HostEmbedding) and model.tok_emb.weight.device.type == "cpu"
    assert "tok_emb.weight" not in dict(model.named_parameters())
    assert list(model.state_dict()) == list(plain.state_dict()) and model.num_params() == plain.num_params()
    x = torch.randint(0, 256, (2, 24))
    for m in (model, plain):
        m(x).float().pow(2).mean().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert len(got) == len(ref) > 0
    for (_, a), b in zip(got.items(), ref.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    host_table = model.tok_emb.weight
    model.tok_emb.weight = host_table.double()  # a dtype of its own: the cache follows the weights', not the table's
    assert model.new_cache(1, 4).k.dtype == torch.float32
    model.tok_emb.weight = host_table
    remove_host_embeddings(model)
    assert type(model.tok_emb) is torch.nn.Embedding and not model.tok_emb.weight.requires_grad
    torch.testing.assert_close(model.tok_emb.weight, plain.tok_emb.weight, rtol=0, atol=0)
    for cfg, method in ((PRESETS["debug-llama"], "lora"), (replace(PRESETS["debug-llama"], tie_embeddings=False), "full")):
        kept = Transformer(cfg)  # tied (the head's weight too), or trained (its gradient is made on the device)
        apply_method(kept, method, LoRAConfig())
        parallelize(kept, CPU, activation_checkpointing=1, activation_offload=True)
        assert type(kept.tok_emb) is torch.nn.Embedding


@pytest.mark.gpu
def test_on_a_gpu_the_host_held_table_leaves_the_device_and_changes_no_number():
    """On CUDA the table's bytes leave the device, a bf16 LoRA step's loss and gradients are the device table's,
    and greedy generation (the engine reads its device off the parameters, the cache off the weights) is the same."""
    from temper.infer.engine import generate

    cfg = replace(PRESETS["debug-llama"], tie_embeddings=False, vocab_size=32768, max_seq_len=256)
    gpu = DistInfo(0, 0, 1, torch.device("cuda"))
    x = torch.randint(0, cfg.vocab_size, (2, 129), device="cuda")
    out = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg).cuda()
        apply_method(model, "lora", LoRAConfig(dropout=0.0), amp_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        parallelize(model, gpu, activation_checkpointing=1, activation_offload=offload)
        freed = before - torch.cuda.memory_allocated()
        assert freed == (cfg.vocab_size * cfg.dim * 2 if offload else 0)
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        text = generate(model.eval(), [[1, 2, 3], [4, 5]], max_new_tokens=8, temperature=0.0)
        out[offload] = loss.detach(), grads, text
        del model
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=0)
    for a, b in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert out[True][2] == out[False][2]


def test_compiling_per_block_keeps_names_and_compiles_one_graph(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    model = Transformer(replace(PRESETS["debug-llama"], n_layers=6))
    names = list(model.state_dict())
    out = parallelize(model, CPU, activation_checkpointing=1, compile=True)
    assert out is model and list(model.state_dict()) == names
    x = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        model(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1  # six identical blocks, one compiled graph
    torch._dynamo.reset()


def test_compiling_the_whole_model_and_its_loss_keeps_names_and_the_step(monkeypatch):
    """train.compile_scope=model: the model compiled in place (no `_orig_mod.` in its names) and the loss compiled
    with its forward (`CompiledLoss`, one graph); two steps equal the eager ones (aot_eager: no code generation,
    so the same kernels and the same numbers up to summation order)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = Transformer(replace(PRESETS["debug-llama"], n_layers=2))
    model = copy.deepcopy(eager)
    names = list(model.state_dict())
    assert parallelize(model, CPU, compile=True, compile_scope="model") is model
    assert list(model.state_dict()) == names and list(dict(model.named_parameters())) == names
    x = torch.randint(0, 256, (2, 2, 17))
    batches = [(x[i, :, :-1], x[i, :, 1:]) for i in range(2)]  # two micro-batches: accumulation
    results = {}
    for name, m, loss in (("eager", eager, LMLoss()), ("compiled", model, CompiledLoss(LMLoss()))):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        results[name] = [train_step(m, opt, batches, step=s, loss_fn=loss) for s in range(2)]
    assert counters["stats"]["unique_graphs"] == 1  # the forward and the loss, one graph (same shapes: no recompile)
    for a, b in zip(results["eager"], results["compiled"], strict=True):
        assert (a.tokens, a.skipped) == (b.tokens, b.skipped)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.grad_norm, a.grad_norm, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(eager.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=n)
    torch._dynamo.reset()


def test_whole_model_compile_is_refused_where_it_cannot_work(tmp_path):
    """Under a device mesh (FSDP2, tensor or pipeline parallel) the scope is refused, naming the key: by the config
    when its degrees say so, and by `parallelize` for any mesh."""
    with pytest.raises(ValueError, match="compile_scope=model needs compile=true"):
        TrainSection(compile_scope="model")
    for layout in (ParallelConfig(dp_shard=2), ParallelConfig(tp=2), ParallelConfig(pp=2)):
        with pytest.raises(ValueError, match="compile_scope=model compiles the whole model"):
            TrainSection(compile=True, compile_scope="model", parallel=layout)
    TrainSection(compile=True, compile_scope="model")  # one process or DDP: fine
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1, 1, 1), mesh_dim_names=MESH_DIMS)
        d = DistInfo(0, 0, 1, torch.device("cpu"), mesh=mesh, layout=ParallelConfig(dp_shard=1))
        with pytest.raises(ConfigError, match="train.compile_scope=model"):
            parallelize(Transformer(PRESETS["debug-llama"]), d, compile=True, compile_scope="model")
    finally:
        dist.destroy_process_group()


def test_clipping_sharded_gradients_never_reads_the_norm_on_the_host(tmp_path):
    """clip_grads scales DTensor gradients (FSDP2, TP) by the coefficient as a tensor (no `.item()` per parameter,
    a host sync each on a GPU): bit for bit what scaling by the coefficient read on the host gave, and what the
    plain gradients get."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        plain = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
        for p in plain:
            p.grad = torch.randn_like(p) * 3
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in plain]
        for p, q in zip(sharded, plain, strict=True):
            p.grad = distribute_tensor(q.grad.clone(), mesh, [Shard(0)])
        norm = grad_norm(plain)
        coef = torch.clamp(1.0 / (norm + 1e-6), max=1.0).item()  # the host read this replaces
        expected = [q.grad * coef for q in plain]
        clip_grads(sharded, 1.0, grad_norm(sharded))
        clip_grads(plain, 1.0, norm)
        for p, q, e in zip(sharded, plain, expected, strict=True):
            assert torch.equal(p.grad.to_local(), e) and torch.equal(q.grad, e)
    finally:
        dist.destroy_process_group()


def test_torchrun_restarts_over_a_shared_store_are_flagged(monkeypatch):
    """Row 16: torchrun keeps one TCP store across --max-restarts restarts, and a restarted group can read the
    dead workers' addresses from it (pytorch#135712): init_distributed warns unless each attempt gets its own
    store (ELASTIC_STORE_FIX, which test_pretrain_reliability's elastic restart uses)."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert shared_store_restarts()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: the shared store is harmless
    assert not shared_store_restarts()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what ELASTIC_STORE_FIX makes torchrun set
    assert not shared_store_restarts()


def test_leaving_on_an_exception_frees_the_model_before_the_group(tmp_path, monkeypatch):
    """Row 14 (`fail` on 2 ranks): a recipe's `finally: shutdown_distributed()` runs while the exception's
    traceback still holds the DDP model. Freed after the group was destroyed, gloo's teardown could wait for
    a peer that had left (one run in two hung with 2 CPU ranks); the model must be gone before the group."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    model_ref, alive_at_destroy = [], []
    destroy = dist.destroy_process_group

    def watched_destroy():
        alive_at_destroy.append(model_ref[0]() is not None)
        destroy()

    monkeypatch.setattr(dist, "destroy_process_group", watched_destroy)

    def failing_loop():
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        model_ref.append(weakref.ref(model))
        raise RuntimeError("non-finite loss")

    with pytest.raises(RuntimeError, match="non-finite loss"):
        try:
            failing_loop()
        finally:
            shutdown_distributed()
    assert alive_at_destroy == [False] and not dist.is_initialized()
