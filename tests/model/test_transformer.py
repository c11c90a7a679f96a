"""The Transformer's numbers: parameter and FLOP counts by hand, causality, the KV cache and padding."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from temper.model.attention import LatentAttention, Segments
from temper.model.config import PRESETS, ModelConfig
from temper.model.layers import XIELU
from temper.model.transformer import Transformer


def _model(name: str, **over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(replace(PRESETS[name], **over)).eval()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=65, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="mlp"):
        ModelConfig(mlp="relu")
    with pytest.raises(ValueError, match="rope_scaling is missing"):
        ModelConfig(pos="rope", rope_scaling={"rope_type": "yarn"})
    with pytest.raises(ValueError, match=r"rope_scaling: unknown keys \['beta_fst'\] for rope_type 'yarn'"):
        ModelConfig(pos="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                              "beta_fst": 16})
    for bad, match in [({"n_experts": 4}, "n_experts needs a gated MLP"),
                       ({"mlp": "swiglu", "n_experts": 4, "experts_per_token": 5}, "experts_per_token=5 between 1"),
                       ({"mlp": "swiglu", "expert_ffn_dim": 32}, "expert_ffn_dim=32 needs n_experts"),
                       ({"norm": "rmsnorm", "qk_norm_whole": True}, "qk_norm_whole needs qk_norm"),
                       ({"pre_norm": False}, "pre_norm=false needs sandwich_norm"),
                       ({"attn_softcap": 0.0}, "attn_softcap must be positive or None, got 0.0"),
                       ({"swiglu_limit": 7.0}, "swiglu_limit=7.0 needs mlp='swiglu'"),
                       ({"routed_scaling": 2.5}, "routed_scaling needs n_experts"),
                       ({"mlp": "swiglu", "n_experts": 6, "expert_groups": 4}, "expert_groups=4 needs n_experts"),
                       ({"mlp": "swiglu", "n_experts": 8, "experts_per_token": 4, "expert_groups": 4},
                        "its groups must hold experts_per_token=4"),
                       ({"mlp": "swiglu", "n_experts": 8, "n_layers": 2, "dense_layers": 2}, "dense_layers=2 needs"),
                       ({"mlp": "swiglu", "n_experts": 8, "router_scores": "relu"}, "router_scores must be one of"),
                       ({"mlp": "swiglu", "n_experts": 8, "expert_groups": 4, "expert_groups_per_token": 2,
                         "expert_group_best": 3}, r"expert_group_best=3 must be between 1 and the experts in a group \(2\)"),
                       ({"router_float32": True}, "router_float32 needs n_experts"),
                       ({"pos": "rope", "kv_lora_rank": 16}, "kv_lora_rank=16 .* needs a positive rank"),
                       ({"q_lora_rank": 16}, "q_lora_rank=16 needs kv_lora_rank"),
                       ({"attention_layers": (1,), "linear_layer": "mamba3"}, "linear_layer must be one of"),
                       ({"attention_layers": (1,), "linear_layer": "mamba"},
                        r"Mamba layers take one group of B and C \(linear_key_heads 1, got 4\)"),
                       ({"attention_layers": (1,), "linear_layer": "mamba", "linear_key_heads": 1,
                         "linear_value_size": 1, "linear_dt_rank": 0}, "a positive linear_dt_rank .got 0"),
                       ({"attention_layers": (1,), "linear_layer": "mamba2", "linear_bcdt_eps": 1e-6},
                        "linear_bcdt_eps=1e-06 needs Mamba layers"),
                       ({"attention_layers": (1,), "linear_layer": "mamba", "linear_key_heads": 1,
                         "linear_value_size": 1, "linear_bcdt_weights": True},
                        "linear_bcdt_weights needs linear_bcdt_eps"),
                       ({"mlp": "swiglu", "n_experts": 4, "expert_layers": (1, 0)}, "expert_layers=.1, 0. needs"),
                       ({"sliding_window": 4, "global_first": True}, "global_first needs global_every"),
                       ({"window_chunked": True}, "window_chunked needs sliding_window"),
                       ({"qk_l2_norm": True}, "qk_l2_norm needs pos='rope'"),
                       ({"pos": "rope", "nope_query_scale": 0.1}, "nope_query_scale=0.1 needs nope_every"),
                       ({"expert_input_weights": True}, "expert_input_weights needs n_experts"),
                       ({"mlp": "swiglu", "n_experts": 4, "router_rounded": True}, "router_rounded needs router_scores"),
                       ({"mlp": "swiglu", "n_experts": 4, "expert_layers": (2,)}, "layers of the 2 once each"),
                       ({"mlp": "swiglu", "expert_layers": (1,)}, "needs n_experts"),
                       ({"mlp": "swiglu", "n_experts": 4, "n_layers": 3, "dense_layers": 1, "expert_layers": (2,)},
                        "without dense_layers"),
                       ({"no_mlp_layers": (2,)}, r"no_mlp_layers=\(2,\) must list layers of the 2"),
                       ({"no_mlp_layers": (0,), "parallel_block": True}, "not with parallel_block"),
                       ({"mlp": "swiglu", "gelu_exact": True}, "gelu_exact needs mlp='gelu'"),
                       ({"norm": "rmsnorm", "norm_weightless": True, "norm_unit_offset": True},
                        "norm_weightless does not take norm_unit_offset"),
                       ({"qkv_clip": 0.0}, "qkv_clip must be positive"),
                       ({"norm": "rmsnorm", "norm_bias": True}, "norm_bias needs norm='layernorm'"),
                       ({"pos": "rope", "query_scale_beta": 0.1}, "query_scale_beta=0.1 needs a rope_scaling"),
                       ({"head_bias": True}, "head_bias needs an untied head"),
                       ({"rope_reversed": True}, "rope_reversed needs pos='rope'"),
                       ({"parallel_mlp_norm": True}, "parallel_mlp_norm needs parallel_block")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**bad)
    assert ModelConfig(mlp="swiglu", dim=64).hidden_dim == 256  # int(8*64/3)=170 -> next multiple of 256
    assert ModelConfig(dim=64).hidden_dim == ModelConfig(dim=64, mlp="relu2").hidden_dim == 256  # 4*dim


def _xielu_reference(act: XIELU, x: torch.Tensor) -> torch.Tensor:
    """The paper's xIELU as Apertus' reference writes it, autograd through every operation."""
    a_p, a_n = F.softplus(act.alpha_p), act.beta + F.softplus(act.alpha_n)
    return torch.where(x > 0, a_p * x * x + act.beta * x, (torch.expm1(torch.min(x, act.eps)) - x) * a_n + act.beta * x)


@pytest.mark.parametrize("dtype, autocast", [(torch.float64, False), (torch.float32, False), (torch.bfloat16, False),
                                             (torch.float32, True)])
def test_xielu_equals_its_reference_and_saves_only_its_input(dtype, autocast):
    """xIELU's hand-written backward (`_XIELUFunction`) gives autograd's gradients of the reference expression (x and
    both learned scalars, at the kink between eps and 0 too), its forward the reference's values bit for bit, and it
    keeps only its input for backward, where the reference keeps four hidden-sized tensors."""
    torch.manual_seed(0)
    act = XIELU().to(dtype)
    with torch.no_grad():
        act.alpha_p.fill_(0.3)
        act.alpha_n.fill_(-0.2)
    x_dtype = torch.bfloat16 if autocast else dtype  # autocast: a bf16 input beside float32 scalars
    edge = torch.tensor([0.0, -1e-7, -9e-7, -1.1e-6, -2e-6, 1e-7])  # about eps (at it, autograd splits a tie)
    x = torch.cat([torch.randn(4000) * 3, edge]).to(x_dtype).requires_grad_()
    saved = []

    def counted(f):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            return f(x)

    ours, ref = counted(act), None
    ours_saved, saved[:] = sum(saved), []
    ref = counted(lambda x: _xielu_reference(act, x))
    assert torch.equal(ours, ref) and ours.dtype == ref.dtype
    assert ours_saved <= x.numel() + 8 < 4 * x.numel() < sum(saved)
    g = torch.randn_like(ours)
    params = (x, act.alpha_p, act.alpha_n)
    got, want = torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[x_dtype]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_gelu_exact_and_a_parallel_block_on_two_norms():
    """gelu_exact: the MLP's GELU is erf's, not its tanh approximation (up to 3e-4 apart, too little for the logits of a
    parity test to tell); parallel_mlp_norm: x + attn(attn_norm(x)) + mlp(mlp_norm(x)) (GPT-NeoX)."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["debug"], pos="rope", gelu_exact=True, parallel_block=True, parallel_mlp_norm=True)
    model = Transformer(cfg).eval()
    block, x = model.layers[0], torch.randn(2, 8, cfg.dim) * 3
    mlp = block.mlp
    with torch.no_grad():
        torch.nn.init.normal_(block.mlp_norm.weight, 1.0, 0.5)  # a norm of its own, unlike attention's
        torch.testing.assert_close(mlp(x), mlp.down_proj(F.gelu(mlp.up_proj(x))), rtol=0, atol=0)
        assert (mlp(x) - mlp.down_proj(F.gelu(mlp.up_proj(x), approximate="tanh"))).abs().max() > 1e-5
        rope = (model.rope_cos[None, :8, None], model.rope_sin[None, :8, None])  # (1, T, 1, R/2)
        want = x + block.attn(block.attn_norm(x), rope, None, True, None) + mlp(block.mlp_norm(x))
        torch.testing.assert_close(block(x, rope), want, rtol=0, atol=1e-6)


def test_debug_counts_by_hand():
    m = Transformer(PRESETS["debug"])  # vocab 256, dim 64, 2 layers, ffn 256, seq 128, biases, tied
    V, C, L, F, S = 256, 64, 2, 256, 128
    per_layer_matmul = 4 * C * C + 2 * C * F  # q, k, v, o + up, down
    per_layer_rest = 4 * C + F + C + 2 * 2 * C  # biases of q, k, v, o, up, down + two LayerNorms
    assert m.num_params() == V * C + S * C + L * (per_layer_matmul + per_layer_rest) + 2 * C == 124672
    assert m.num_params(exclude_embedding=True) == 124672 - S * C  # the tied embedding is the head
    N = L * per_layer_matmul + V * C  # the tied head counts, the lookups do not
    assert m.flops_per_token(S) == 6 * N + 12 * L * C * S == 884736


def _moe_counts(name: str) -> tuple[int, int, int]:
    """(num_params, matmul_params, embedding rows x dim) of a mixture-of-experts preset, from two meta builds: its
    dense layers with one and with two expert layers. Every expert layer holds the same parameters (windows change
    none), so the whole count follows exactly, where building DeepSeek-V3's 15k experts would take seconds."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        one, two = (Transformer(replace(cfg, n_layers=cfg.dense_layers + k)) for k in (1, 2))
    more = cfg.n_layers - cfg.dense_layers - 1
    return (one.num_params() + more * (two.num_params() - one.num_params()),
            one.matmul_params() + more * (two.matmul_params() - one.matmul_params()), one.tok_emb.weight.numel())


def test_preset_sizes_on_meta():
    with torch.device("meta"):
        gpt2 = Transformer(PRESETS["gpt2-124m"])
        llama = Transformer(PRESETS["llama-3.2-1b"])
        llama125 = Transformer(PRESETS["llama-125m"])
        qwen3_small, qwen3_8b = Transformer(PRESETS["qwen3-0.6b"]), Transformer(PRESETS["qwen3-8b"])
        gemma3_270m, gemma3_1b = Transformer(PRESETS["gemma3-270m"]), Transformer(PRESETS["gemma3-1b"])
        gemma2 = [Transformer(PRESETS[f"gemma-2-{size}"]) for size in ("2b", "9b", "27b")]
    assert gpt2.num_params() == 124_475_904  # nanoGPT's count with the padded 50304 vocab
    assert llama.num_params() == 1_235_814_400  # meta-llama/Llama-3.2-1B
    assert 120e6 < llama125.num_params() < 130e6
    assert qwen3_small.num_params() == 596_049_920  # Qwen/Qwen3-0.6B
    assert qwen3_8b.num_params() == 8_190_735_360  # Qwen/Qwen3-8B
    assert gemma3_270m.num_params() == 268_098_176  # google/gemma-3-270m
    assert gemma3_1b.num_params() == 999_885_952  # google/gemma-3-1b-pt
    # google/gemma-2-2b, -9b, -27b
    assert [m.num_params() for m in gemma2] == [2_614_341_888, 9_241_705_984, 27_227_128_320]
    # Mixtures of experts, counted from one and two expert layers (`_moe_counts`); the real whole-model counts agree
    # (Qwen3-30B-A3B built whole: test_moe_counts_extrapolate_exactly).
    mixtral, qwen3_moe = _moe_counts("mixtral-8x7b"), _moe_counts("qwen3-30b-a3b")
    assert mixtral[0] == 46_702_792_704  # mistralai/Mixtral-8x7B-v0.1
    # openai/gpt-oss-20b and -120b: 20.91B and 116.83B, of which 3.61B and 5.13B active (the model card's count:
    # matrix weights without biases or the input embedding, 4 of the experts)
    gpt_oss = [_moe_counts(f"gpt-oss-{size}") for size in ("20b", "120b")]
    assert [c[:2] for c in gpt_oss] == [(20_914_757_184, 3_607_142_400), (116_829_156_672, 5_131_100_160)]
    assert qwen3_moe[0] == 30_532_122_624  # Qwen/Qwen3-30B-A3B
    # FLOPs count the experts a token runs (2 of 8; 8 of 128): the published 12.9B and 3.3B active parameters
    # (the input embedding included there, as a lookup not here).
    assert mixtral[1] + mixtral[2] == 12_879_659_008
    assert qwen3_moe[1] + qwen3_moe[2] == 3_352_821_760
    # zai-org/GLM-4.5 and -Air: the published 355B and 106B total, 32B and 12B active (without the embeddings and
    # head, untied: twice the embedding's; the totals without the multi-token-prediction layer, which temper does not
    # build)
    glm45 = [_moe_counts(name) for name in ("glm-4.5", "glm-4.5-air")]
    assert [(c[0], c[1] - c[2]) for c in glm45] == [(352_797_814_784, 32_078_069_760), (106_852_245_504, 12_181_569_536)]
    # deepseek-ai/DeepSeek-V3: the published 671B total (without its multi-token-prediction layer), 37B active
    deepseek_v3 = _moe_counts("deepseek-v3")
    assert (deepseek_v3[0], deepseek_v3[1] + deepseek_v3[2]) == (671_026_404_352, 37_551_276_032)
    # deepseek-ai/DeepSeek-V2-Lite: the published 15.7B total, 2.4B active (without the input embedding here)
    deepseek_v2_lite = _moe_counts("deepseek-v2-lite")
    assert (deepseek_v2_lite[0], deepseek_v2_lite[1]) == (15_706_484_224, 2_451_308_544)
    # MiniMaxAI/MiniMax-M2: the published 229B total, 10B active
    minimax_m2 = _moe_counts("minimax-m2")
    assert (minimax_m2[0], minimax_m2[1]) == (228_689_748_992, 10_415_112_192)
    # moonshotai/Kimi-K2-Instruct: the published 1T total (without its multi-token-prediction layer) and 32B active
    # google/gemma-4-26B-A4B's text model: the published 25.2B total, 3.8B active (its dense MLPs run for every token;
    # the tied head counted once), from one period of its layers (five windowed and a global one) built on meta
    with torch.device("meta"):
        period = Transformer(replace(PRESETS["gemma-4-26b-a4b"], n_layers=6))
    shared = period.tok_emb.weight.numel() + period.norm.weight.numel()
    periods = PRESETS["gemma-4-26b-a4b"].n_layers // 6
    assert shared + periods * (period.num_params() - shared) == 25_233_141_760
    emb = period.tok_emb.weight.numel()
    assert emb + periods * (period.matmul_params() - emb) == 3_821_830_144
    # baidu/ERNIE-4.5-21B-A3B-PT: the published 21B total, 3B active
    ernie_moe = _moe_counts("ernie-4.5-21b-a3b")
    assert (ernie_moe[0], ernie_moe[1]) == (21_825_436_160, 3_352_002_560)
    kimi_k2 = _moe_counts("kimi-k2")
    assert (kimi_k2[0], kimi_k2[1] + kimi_k2[2]) == (1_026_408_209_408, 32_860_471_296)
    # Qwen/Qwen3.5-9B's language model (its vision tower apart): the 8.95B llama.cpp counts
    with torch.device("meta"):
        assert Transformer(PRESETS["qwen3.5-9b"]).num_params() == 8_953_803_264
        # baidu/ERNIE-4.5-0.3B-PT: 0.36B
        assert Transformer(PRESETS["ernie-4.5-0.3b"]).num_params() == 360_748_032
        # google/gemma-4-31B's text model: the 30.7B of its model card (the vision encoder apart)
        assert Transformer(PRESETS["gemma-4-31b"]).num_params() == 30_697_345_280


def test_moe_counts_extrapolate_exactly():
    """`_moe_counts` equals the count of the model built whole, dense first layers and windows included."""
    for name in ("qwen3-30b-a3b", "gpt-oss-20b"):
        with torch.device("meta"):
            whole = Transformer(PRESETS[name])
        assert _moe_counts(name) == (whole.num_params(), whole.matmul_params(), whole.tok_emb.weight.numel())
    small = replace(PRESETS["deepseek-v3"], vocab_size=512, dim=256, n_layers=6, n_experts=16, expert_groups=4)
    with torch.device("meta"):
        whole, one, two = (Transformer(replace(small, n_layers=n)) for n in (6, 4, 5))
    assert whole.num_params() == one.num_params() + 2 * (two.num_params() - one.num_params())


def test_causal_future_tokens_do_not_change_the_past():
    m = _model("debug-llama")
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


VARIANTS = {
    "debug": {}, "debug-llama": {},
    # Mistral's window (shorter than the sequence), Gemma's parts, Qwen2's q/k/v biases, Qwen3's q/k norms, a wide head.
    "window-gemma-qkv": {"sliding_window": 5, "mlp": "geglu", "norm_unit_offset": True, "scale_embeddings": True,
                         "qkv_bias": True, "qk_norm": True, "head_size": 24},
    # Gemma 3's layout: a windowed layer with its own RoPE base, then a global one; norms on the sublayers' outputs.
    "window-local-global": {"sliding_window": 5, "global_every": 2, "rope_local_theta": 100.0, "sandwich_norm": True},
    # OLMo 2's blocks: no pre-norms, norms on the sublayers' outputs, q/k norms over all heads at once.
    "olmo2": {"pre_norm": False, "sandwich_norm": True, "qk_norm": True, "qk_norm_whole": True},
    # OLMo 3's: OLMo 2's blocks, a windowed layer then a global one stretched by YaRN (its original length 4).
    "olmo3-yarn": {"pre_norm": False, "sandwich_norm": True, "qk_norm": True, "qk_norm_whole": True,
                   "sliding_window": 5, "global_every": 2, "rope_local_theta": 10000.0,
                   "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}},
    # Ministral-8B's: the first layer of each group global, the others windowed
    "global-first": {"sliding_window": 5, "global_every": 2, "global_first": True},
    # Gemma 2's: windowed layers alternating with global ones, one RoPE; scores and logits capped (low, to bend
    # init-size scores).
    "gemma2-caps": {"sliding_window": 5, "global_every": 2, "sandwich_norm": True, "attn_softcap": 0.02,
                    "logit_softcap": 2.0},
    # GPT-OSS's: a sink per head, biases everywhere, experts with clamped SwiGLU (clamped low, to bind at init).
    "gpt-oss": {"attn_sinks": True, "bias": True, "n_experts": 4, "experts_per_token": 2, "swiglu_limit": 0.05,
                "sliding_window": 5, "global_every": 2},
    # Mixtral's and Qwen3-MoE's MLPs: 4 experts, 2 per token; a padded row's tokens are routed like any others.
    "experts": {"n_experts": 4, "experts_per_token": 2, "expert_ffn_dim": 32},
    # DeepSeek-V3's latent attention: keys and values from a cached latent, queries through theirs, narrower values.
    "latent": {"n_kv_heads": None, "head_size": 24, "rope_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 24,
               "v_head_size": 12},
    # DeepSeek-V3's and GLM-4.5's: sigmoid scores, a choice bias, 2 of 4 groups, scaled weights, a shared expert, a
    # dense first layer.
    "deepseek-routing": {"n_experts": 8, "experts_per_token": 2, "expert_ffn_dim": 32, "router_scores": "sigmoid",
                         "expert_choice_bias": True, "expert_groups": 4, "expert_groups_per_token": 2,
                         "routed_scaling": 2.5, "shared_expert_ffn_dim": 32, "dense_layers": 1},
    # Gemma 4's: a windowed layer, then a global one of wider heads, one kv head, values from k_proj (its own cache
    # slots), value norms, layer scalars; its dense MLP beside experts normalised apart, the router's input scaled.
    "gemma4": {"sliding_window": 5, "global_every": 2, "rope_local_theta": 100.0, "sandwich_norm": True,
               "qk_norm": True, "norm_cast_after": True, "head_size": 16, "global_head_size": 32, "global_kv_heads": 1,
               "global_values_are_keys": True, "value_norm": True, "layer_scalar": True, "attn_scale_dim": 1,
               "rope_scaling": {"rope_type": "proportional", "partial_rotary_factor": 0.25}, "n_experts": 4,
               "expert_ffn_dim": 32, "shared_expert_ffn_dim": 48, "experts_own_norms": True, "router_input_norm": True},
    # Gemma 4 E2B's: per-layer embeddings; the last two layers attend to the cached keys and values of the last earlier
    # layer of their kind (windowed, global), with MLPs twice as wide.
    "gemma4-e2b": {"n_layers": 4, "sliding_window": 5, "global_every": 2, "rope_local_theta": 100.0,
                   "sandwich_norm": True, "qk_norm": True, "head_size": 16, "global_head_size": 32, "value_norm": True,
                   "layer_scalar": True, "kv_shared_layers": 2, "kv_shared_wide_mlp": True, "per_layer_input_size": 8},
    # Llama 4's: chunks of 5 (counted from each row's own start, so the left-padded row below chunks as it does
    # alone), weightless q/k norms, layers without positions whose queries take a temperature (stepping every 3
    # positions), experts weighing their inputs.
    "llama4": {"sliding_window": 5, "window_chunked": True, "global_every": 2, "nope_every": 2, "qk_l2_norm": True,
               "nope_query_scale": 0.5, "nope_query_floor": 3, "n_experts": 4, "experts_per_token": 2,
               "expert_ffn_dim": 32, "shared_expert_ffn_dim": 32, "router_scores": "sigmoid", "router_rounded": True,
               "renormalize_experts": False, "expert_input_weights": True},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_and_left_padding_match_full_forward(name):
    m = _model("debug" if name == "debug" else "debug-llama", **VARIANTS[name])
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = m(x)  # (2, 12, V)
        cache = m.new_cache(2, 16)
        parts = [m(x[:, :7], cache=cache), m(x[:, 7:8], cache=cache), m(x[:, 8:12], cache=cache)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
        assert cache.length == 12
        # Row 0 left-padded by 3: the same logits as the 9-token sequence alone.
        short = x[:1, 3:]
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
        valid = torch.arange(12)[None] >= 3
        pos = (valid.cumsum(-1) - 1).clamp(min=0)
        out = m(padded, positions=pos, segments=Segments.padding(valid))
        torch.testing.assert_close(out[:, 3:], m(short), rtol=0, atol=1e-5)
        assert torch.isfinite(out).all()


def test_latent_attention_decodes_absorbed_as_it_computes_expanded(monkeypatch):
    """Decoding over a latent cache takes DeepSeek-V2's absorbed form (kv_b_proj folded into the queries and the
    output), where it costs fewer products, and gives the expanded form's logits; a long prefill stays expanded."""
    m = _model("debug-llama", **VARIANTS["latent"])
    attn = m.layers[0].attn
    assert attn._absorbs(1, 64) and attn._absorbs(4, 64) and not attn._absorbs(64, 64)
    x = torch.randint(0, 256, (2, 20))
    runs, expansions = {}, []
    for layer in m.layers:
        layer.attn.kv_b_proj.register_forward_hook(lambda *_: expansions.append(1))  # the expanded form's call
    for form in ("absorbed", "expanded"):
        if form == "expanded":
            monkeypatch.setattr(LatentAttention, "_absorbs", lambda self, T, S: False)
        with torch.no_grad():
            cache = m.new_cache(2, 64)
            runs[form] = torch.cat([m(x[:, :12], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(12, 20)], 1)
        assert len(expansions) == (0 if form == "absorbed" else 2 * 9)  # 2 layers x 9 forwards
    torch.testing.assert_close(runs["absorbed"], runs["expanded"], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(runs["absorbed"], m(x), rtol=0, atol=1e-5)


def test_dropout_only_in_training():
    m = _model("debug", dropout=0.5)
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.equal(m(x), m(x))


def test_init_scales_residual_projections():
    m = Transformer(replace(PRESETS["debug"], n_layers=8, dim=256, n_heads=4))
    std = lambda t: t.float().std().item()
    assert abs(std(m.layers[0].attn.q_proj.weight) - 0.02) < 2e-3
    assert abs(std(m.layers[0].attn.o_proj.weight) - 0.02 / 4) < 1e-3  # 1/sqrt(2 * 8)
    assert m.layers[0].mlp.up_proj.bias.abs().sum() == 0


def test_sliding_window_limits_what_a_query_sees():
    m = _model("debug-llama", sliding_window=4)
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 256  # token 0 is outside the window of positions 4..: they must not change
    with torch.no_grad():
        a, b = m(x), m(y)
    assert not torch.allclose(a[:, :4], b[:, :4])
    # Position 4 sees tokens 1..4 directly, but token 0 still reaches it through earlier layers' positions 1..3.
    one_layer = _model("debug-llama", sliding_window=4, n_layers=1)
    with torch.no_grad():
        torch.testing.assert_close(one_layer(x)[:, 4:], one_layer(y)[:, 4:], rtol=0, atol=0)


def test_chunked_attention_sees_its_chunk_alone():
    """Llama 4's chunks: a query sees the earlier keys of its own chunk of positions; the first of a chunk sees itself
    alone, whatever came before, in a forward, in a packed document (its positions restarting) and through a cache."""
    m = _model("debug-llama", sliding_window=4, window_chunked=True, n_layers=1)
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, :4] = (y[0, :4] + 1) % 256  # chunk 0 changed: chunks 1 and 2 (positions 4..11) must not see it
    with torch.no_grad():
        a, b = m(x), m(y)
        torch.testing.assert_close(a[:, 4:], b[:, 4:], rtol=0, atol=0)
        assert not torch.allclose(a[:, :4], b[:, :4])
        ids = torch.tensor([[0] * 3 + [1] * 9])  # a document of 3 tokens, then one of 9: chunks 3..6, 7..10, 11
        packed = m(x, positions=torch.tensor([[0, 1, 2, *range(9)]]), segments=Segments(ids))
        torch.testing.assert_close(packed[:, 3:], m(x[:, 3:]), rtol=0, atol=1e-5)
        cache = m.new_cache(1, 12)
        steps = torch.cat([m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(6, 12)], 1)
        torch.testing.assert_close(steps, a, rtol=0, atol=1e-5)


def test_attention_runs_on_a_tensor_parallel_shard_of_its_heads():
    """Head counts come from the projections (views with -1): two shards of half the query and kv heads
    each (column-split q/k/v, row-split o_proj, as tensor parallelism splits them) add up to the whole."""
    import copy
    from dataclasses import replace

    from temper.model.attention import Attention
    from temper.model.config import PRESETS

    cfg = replace(PRESETS["debug-llama"], n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    full = Attention(cfg, 0).eval()
    x = torch.randn(2, 7, cfg.dim)
    want = full(x, None, None, True, None)
    D = cfg.head_dim
    out = 0
    for part in range(2):
        shard = copy.deepcopy(full)
        q, kv = slice(part * 2 * D, (part + 1) * 2 * D), slice(part * D, (part + 1) * D)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            layer = getattr(shard, name)
            layer.weight = torch.nn.Parameter(layer.weight[rows].clone())
        shard.o_proj.weight = torch.nn.Parameter(shard.o_proj.weight[:, q].clone())
        out = out + shard(x, None, None, True, None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_segments_mask_documents_padding_and_a_shared_prefix():
    docs = Segments(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself: no fully masked row, no NaN
    ], dtype=torch.bool)
    assert torch.equal(docs.dense(), expected[None, None])
    # Two continuations (1, 2) of one context (0): each sees the context and itself, not the other.
    shared = Segments(torch.tensor([[0, 0, 1, 1, 2, -1]]), shared_prefix=True).dense()[0, 0]
    assert shared[3].tolist() == [1, 1, 1, 1, 0, 0] and shared[4].tolist() == [1, 1, 0, 0, 1, 0]
    assert torch.equal(Segments.padding(torch.tensor([[True, True, False]])).ids, torch.tensor([[0, 0, -1]]))


def test_segments_give_flex_attention_the_same_mask_as_sdpa():
    """`Segments.mask_mod` is a FlexAttention mask_mod: the block mask built from it attends exactly as
    the dense mask does under SDPA, so a GPU path can skip the masked blocks of packed rows."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    B, H, T, D = 2, 2, 256, 16
    ids = torch.tensor([[0] * 100 + [1] * 130 + [-1] * 26, [0] * 40 + [1] * 40 + [2] * 176])
    seg = Segments(ids)
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.dense())
    block = create_block_mask(seg.mask_mod, B, None, T, T, device="cpu", BLOCK_SIZE=128)
    flex = flex_attention(q, k, v, block_mask=block)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    assert block.sparsity() > 0  # whole blocks skipped, not just masked


def test_segments_with_a_sliding_window_and_a_wrong_shape():
    m = _model("debug-llama", sliding_window=3)
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        whole = m(x, segments=Segments(torch.zeros(1, 8, dtype=torch.long)))
        torch.testing.assert_close(whole, m(x), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match=r"segments.ids must be \(batch, tokens\) = \(1, 8\), got \(1, 7\)"):
            m(x, segments=Segments(torch.zeros(1, 7, dtype=torch.long)))
