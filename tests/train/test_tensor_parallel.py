"""Tensor parallel (`train.tensor_parallel`) against one process: `temper pretrain` on 2 tensor-parallel ranks
and on 2-D layouts (FSDP2 dp_shard=2 x tp=2, 4 ranks), with and without sequence parallel, trains the global
batch of one process (4 sequences a step) with its losses and final weights; a tensor-parallel checkpoint
(DCP) resumes on one process and on 2 FSDP2 ranks; greedy generation and the vocabulary-parallel loss (and its
gradients) of a tensor-parallel model equal one process's.

Two models: Llama-like (RoPE, RMSNorm, SwiGLU, grouped-query attention with 4 query and 2 key/value heads,
Qwen3's q/k norms: one weight over heads split by rank, tied embeddings: the vocabulary-parallel head is the
embedding) and GPT-2-like (learned positions, LayerNorm,
biases, an untied head). Dropout is 0: under tensor parallel each rank draws masks for its slices, so a run
with dropout is not one process's bit for bit. The char vocabulary (61) is padded to 64 to split over 2 ranks.

Tolerances: the all-reduces sum partial products in another order than one process, so losses match to 1e-6
relative and weights after 4 AdamW steps to 1e-5 (as FSDP2 and DDP do, RELIABILITY row 10). One exception:
the key bias has no gradient but rounding noise (softmax is unchanged by a shift of every key's score), and
AdamW turns a noise g into an update of about lr * g / eps, so the GPT model's fused q/k/v bias gets 1e-4.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from temper.config import ConfigError
from temper.model.config import PRESETS, ModelConfig
from temper.model.lora import apply_lora
from temper.model.transformer import Transformer
from temper.train.tensor_parallel import check_splittable_layers, check_tensor_parallel
from tests.recipes import test_pretrain
from tests.recipes.test_pretrain import final_weights, metrics, ranks_train, train

char_data = test_pretrain.char_data

STEPS = ["--train.steps=4", "--eval.every=2"]
"""4 steps, a checkpoint every 2 (TINY), validation at steps 2 and 4."""

MODELS = {
    "llama": ["--preset=debug-llama", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.ffn_dim=64",
              "--model.vocab_size=64", "--model.qk_norm=true"],
    "gpt": ["--model.tie_embeddings=false", "--model.vocab_size=64"],
}
"""Flags after TINY (dim 32, 2 layers, max_seq_len 32)."""

SP_OFF = "--train.parallel.sequence_parallel=false"
SP_ON = "--train.parallel.sequence_parallel=true"
LAYOUTS = {
    "llama_tp2_sp": ("llama", 2, 4, ["--train.parallel.tp=2", SP_ON]),
    "llama_tp2": ("llama", 2, 4, ["--train.parallel.tp=2", SP_OFF]),
    "llama_2d": ("llama", 4, 2, ["--train.parallel.tp=2", "--train.parallel.dp_shard=2", SP_OFF]),
    "gpt_2d_sp": ("gpt", 4, 2, ["--train.parallel.tp=2", "--train.parallel.dp_shard=2", SP_ON]),
}
"""name: (model, ranks, micro-batch, flags); ranks / tp x micro-batch = 4 sequences of 32 tokens."""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TEMPER_FAULT": ""}


def on_ranks(root: Path, data: Path, name: str, model: str, ranks: int, micro: int, *extra: str) -> str:
    """`temper pretrain` of MODELS[model] (STEPS, micro-batch `micro`) on `ranks` forked ranks; returns their output."""
    return ranks_train(data, root, name, ranks, *STEPS, *MODELS[model], f"--train.micro_batch_size={micro}", *extra)


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> Path:
    """Each model's one-process reference (micro-batch 4, `ref_<model>`) and each layout of LAYOUTS."""
    root = tmp_path_factory.mktemp("tp")
    torch.set_num_threads(1)
    for model, flags in MODELS.items():
        assert train(char_data, root, f"ref_{model}", *STEPS, *flags, "--train.micro_batch_size=4") == 0
    for name, (model, ranks, micro, flags) in LAYOUTS.items():
        on_ranks(root, char_data, name, model, ranks, micro, *flags)
    return root


def assert_same_training(ref: Path, got: Path, steps=range(1, 5)) -> None:
    a, b = metrics(ref), metrics(got)
    assert sorted(b) == list(steps)
    torch.testing.assert_close([b[s]["loss"] for s in steps], [a[s]["loss"] for s in steps], rtol=1e-6, atol=0)
    va, vb = metrics(ref, "val"), metrics(got, "val")
    assert sorted(vb) == [s for s in (2, 4) if s in steps]
    torch.testing.assert_close([vb[s]["val_loss"] for s in vb], [va[s]["val_loss"] for s in vb], rtol=1e-6, atol=0)
    wa, wb = final_weights(ref), final_weights(got)
    assert wa.keys() == wb.keys()
    for k in wa:
        atol = 1e-4 if k.endswith("attn.c_attn.bias") else 1e-5  # the key bias: see the module docstring
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(runs, layout):
    model = LAYOUTS[layout][0]
    assert_same_training(runs / f"ref_{model}", runs / layout)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("target", ["one_process", "fsdp2"])
def test_tensor_parallel_checkpoint_resumes_in_another_layout(runs, char_data, target):
    """The tp=2 (sequence-parallel) step-2 checkpoint, DCP shards split by heads, columns and vocabulary rows,
    resumed by one process or by 2 FSDP2 ranks, continues with the reference's steps 3-4."""
    step = runs / "llama_tp2_sp" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (step / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    name = f"from_tp_{target}"
    (runs / name / "checkpoints").mkdir(parents=True)
    shutil.copytree(step, runs / name / "checkpoints" / "step-0000002")
    if target == "one_process":
        assert train(char_data, runs, name, *STEPS, *MODELS["llama"], "--train.micro_batch_size=4") == 0
    else:
        on_ranks(runs, char_data, name, "llama", 2, 2, "--train.parallel.dp_shard=2")
    assert_same_training(runs / "ref_llama", runs / name, steps=range(3, 5))


WORKER = textwrap.dedent('''
    """Run by torchrun on 2 ranks: tensor-parallel models against one process, on every rank."""
    from dataclasses import replace

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from temper.infer.engine import generate
    from temper.model.config import PRESETS
    from temper.model.transformer import Transformer
    from temper.train.losses import Batch, LMLoss
    from temper.train.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))["tp"]
    configs = {
        "llama": replace(PRESETS["debug-llama"], dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                         max_seq_len=32, qk_norm=True),
        # Gemma 3's parts: sandwich norms on the sublayers' outputs, a windowed layer (own RoPE base) then a global one;
        # Gemma 2's capped scores and logits (low caps, to bend the larger init-size values; the loss caps each
        # vocabulary slice). A harder attention cap (0.05) saturates tanh, and the split heads' rounding, amplified
        # by it, came within 1.0x of the gradient tolerance; at 0.2 the worst gradient is 0.23x of it (0.15x uncapped).
        "gemma3": replace(PRESETS["debug-llama"], dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                          max_seq_len=32, mlp="geglu", norm_unit_offset=True, scale_embeddings=True, qk_norm=True,
                          sandwich_norm=True, sliding_window=6, global_every=2, rope_local_theta=100.0,
                          attn_softcap=0.2, logit_softcap=0.3,
                          tie_embeddings=False),  # tied, its scaled embeddings make greedy decoding repeat the input
        # (a head with a bias, Phi's: the vocabulary-parallel loss adds each rank's slice of it)
        "gpt": replace(PRESETS["debug"], dim=32, n_heads=2, vocab_size=64, max_seq_len=32, tie_embeddings=False,
                       head_bias=True),
        # Apertus': xIELU's learned scalars over each rank's MLP columns (their gradients summed over the ranks),
        # attention biases beside an MLP without
        "apertus": replace(PRESETS["debug-llama"], dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                           max_seq_len=32, mlp="xielu", qk_norm=True, attn_bias=True),
        # Cohere2's: attention beside the MLP (both reading one LayerNorm without biases: under sequence parallel
        # both gather its output), a windowed layer with RoPE then a global one without, scaled tied logits
        "cohere2": replace(PRESETS["debug-llama"], dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                           max_seq_len=32, norm="layernorm", bias=False, parallel_block=True, rope_float32=True,
                           rope_tables_rounded=True, sliding_window=6, global_every=2, nope_every=2,
                           logit_divisor=4.0, tie_embeddings=True),
        # GPT-NeoX's (Pythia's): attention beside the MLP on two LayerNorms with biases (under sequence parallel
        # each gathers its own), exact GELU, a quarter of each head rotated
        "gpt_neox": replace(PRESETS["debug"], pos="rope", dim=32, n_heads=4, vocab_size=64, max_seq_len=32,
                            gelu_exact=True, parallel_block=True, parallel_mlp_norm=True, rope_dim=4,
                            tie_embeddings=False),
        # Gemma 4's attention: a windowed layer, then a global one of its own shape (2 kv heads of 16, values from
        # k_proj, proportional RoPE, its own cache slots); value norms, layer scalars, unscaled scores
        "gemma4": replace(PRESETS["debug-llama"], dim=32, n_heads=4, n_kv_heads=2, head_size=8, ffn_dim=64,
                          vocab_size=64, max_seq_len=32, mlp="geglu", norm_cast_after=True, scale_embeddings=True,
                          qk_norm=True, sandwich_norm=True, sliding_window=6, global_every=2, rope_local_theta=100.0,
                          rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25},
                          global_head_size=16, global_values_are_keys=True, value_norm=True, layer_scalar=True,
                          attn_scale_dim=1, tie_embeddings=False),
    }
    prompts = [[1, 2, 3, 4, 5], [9, 8], [17, 30, 41, 52, 63, 7, 11]]  # padded prefill: the masked GQA path
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    y[0, :5] = -100

    def pair(cfg, sp):
        """A model (seed 0) and its copy split over the 2 ranks."""
        torch.manual_seed(0)
        ref, tp = Transformer(cfg), Transformer(cfg)
        tp.load_state_dict(ref.state_dict())
        apply_tensor_parallel(tp, mesh, sequence_parallel=sp)
        return ref, tp

    for name, cfg in configs.items():
        for sp in (False, True):
            ref, tp = pair(cfg, sp)
            for smoothing in (0.0, 0.1):
                a = LMLoss(smoothing)(ref, Batch(x, y)).loss_sum
                b = LMLoss(smoothing)(tp, Batch(x, y)).loss_sum
                torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
                a.backward()
                b.backward()
                for (n, p), q in zip(ref.named_parameters(), tp.parameters(), strict=True):
                    # Relative to the tensor's largest gradient (an entry near 0 keeps the others' rounding),
                    # and 1e-8 for the key bias, whose gradient is rounding noise around 0.
                    tol = 1e-5 * float(p.grad.abs().max()) + 1e-8
                    torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=0, atol=tol,
                                               msg=lambda m, n=n: f"{name} sp={sp} {n}: {m}")
                ref.zero_grad()
                tp.zero_grad()
            with torch.no_grad():
                torch.testing.assert_close(tp(x), ref(x), rtol=1e-5, atol=1e-5)  # gathered logits
            if sp:
                try:
                    tp(x[:, :15])
                    raise AssertionError("an odd length under sequence parallel was not refused")
                except ValueError as e:
                    assert "sequence_parallel" in str(e), e
                continue
            # Weights large enough (init_std 0.5) that greedy decoding does not repeat one token (and a logit cap
            # that leaves their top ones apart: a low one would round them all to the cap).
            ref, tp = pair(replace(cfg, init_std=0.5, logit_softcap=cfg.logit_softcap and 50.0), sp)
            assert tp.new_cache(3, 16).k.shape[2] == cfg.kv_heads // 2  # this rank's kv heads
            want = generate(ref, prompts, max_new_tokens=12, temperature=0)
            got = generate(tp, prompts, max_new_tokens=12, temperature=0)
            assert got == want, (name, got, want)
            assert len({t for row in want for t in row}) > 6, want  # a test that could fail
    if dist.get_rank() == 0:
        print("TP WORKER OK")
    dist.destroy_process_group()
''')


@pytest.mark.distributed
@pytest.mark.slow
def test_generation_and_loss_of_a_tensor_parallel_model_equal_one_process(tmp_path):
    """On 2 ranks, for both models and with and without sequence parallel: the vocabulary-parallel loss (plain
    and label-smoothed, some targets ignored) and every parameter's gradient equal one process's; logits are
    gathered whole; greedy generation with the KV cache (each rank caching its kv heads) gives one process's
    tokens; a sequence-parallel model refuses a length that does not split over the ranks."""
    script = tmp_path / "tp_worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=Path(__file__).parents[2])
    assert out.returncode == 0 and "TP WORKER OK" in out.stdout, (out.stdout + out.stderr)[-4000:]


def test_a_model_that_does_not_split_is_refused():
    """Heads, kv heads, MLP columns and vocabulary must split evenly; the error names the key and the fix."""
    llama = PRESETS["debug-llama"]  # 4 heads, 2 kv heads, ffn 192, vocab 256
    check_tensor_parallel(llama, 2)
    with pytest.raises(ConfigError, match=r"train\.parallel\.tp=4 must divide the model's n_kv_heads 2$"):
        check_tensor_parallel(llama, 4)
    with pytest.raises(ConfigError, match=r"tp=2 must divide the model's vocab_size 61 \(pad it: --model\.vocab_size=62\)"):
        check_tensor_parallel(replace(llama, vocab_size=61), 2)
    with pytest.raises(ConfigError, match="tp=2 must divide the model's n_heads 3, n_kv_heads 3, ffn hidden dim 75$"):
        check_tensor_parallel(ModelConfig(dim=72, n_heads=3, ffn_dim=75), 2)
    with pytest.raises(ConfigError, match=r"tp=2 does not split a mixture of experts \(n_experts=4\): shard it with "
                                          r"train\.parallel\.dp_shard"):
        check_tensor_parallel(replace(llama, n_experts=4), 2)
    with pytest.raises(ConfigError, match=r"tp=2 does not split latent attention \(kv_lora_rank=16"):
        check_tensor_parallel(replace(llama, n_kv_heads=None, head_size=24, rope_dim=8, kv_lora_rank=16), 2)
    with pytest.raises(ConfigError, match=r"tp=2 does not split OLMo 2's blocks"):
        check_tensor_parallel(replace(llama, pre_norm=False, sandwich_norm=True, qk_norm=True, qk_norm_whole=True), 2)
    with pytest.raises(ConfigError, match=r"tp=2 does not split attention sinks"):
        check_tensor_parallel(replace(llama, attn_sinks=True), 2)
    with pytest.raises(ConfigError, match=r"tp=2 does not split blocks without an MLP \(no_mlp_layers\)"):
        check_tensor_parallel(replace(llama, no_mlp_layers=(1,)), 2)  # Nemotron-H's
    gemma4 = replace(llama, sliding_window=8, global_every=2, rope_local_theta=100.0, global_kv_heads=1)
    with pytest.raises(ConfigError, match=r"tp=2 must divide the model's global_kv_heads 1$"):
        check_tensor_parallel(gemma4, 2)
    with pytest.raises(ConfigError, match=r"tp=2 does not split Gemma 4 E2B's and E4B's per-layer embeddings"):
        check_tensor_parallel(replace(llama, per_layer_input_size=8), 2)


def test_adapted_layers_are_refused_with_the_key():
    """LoRA's adapted layers are not plain `nn.Linear`s, which torch's styles split: one line naming the key."""
    model = Transformer(PRESETS["debug-llama"])
    check_splittable_layers(model)
    apply_lora(model, 4, 8.0, ["v_proj", "down_proj"])
    with pytest.raises(ConfigError, match=r"train\.parallel\.tp .*layers\.0\.attn\.v_proj \(LoRALinear\).*dp_shard"):
        check_splittable_layers(model)
