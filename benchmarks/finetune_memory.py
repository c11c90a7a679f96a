"""Fine-tuning memory and speed: temper's full, LoRA and QLoRA steps against transformers (full)
and peft (LoRA, and QLoRA over bitsandbytes) on the same model shape, batch and precision, in one run.

Every side builds the same Llama-shaped model with random weights directly on the device (an 8B
shape needs no download and no 16 GB file) and trains it on the same random tokens with AdamW over its
trainable parameters, in `--dtype` (float32 on CPU, bfloat16 on a GPU, the same for every side) as the
recipes run it: bf16 is autocast around the forward, the frozen base of lora/qlora held in bf16 and full
fine-tuning's weights in float32 (`temper.train.methods.base_dtype`, what `temper sft` loads; a Hugging
Face Trainer with `bf16=True` over a model loaded with `torch_dtype=torch.bfloat16` does the same), the
adapters in float32. Memory is the peak of one steady-state step (forward, backward, optimizer step):
on a GPU `torch.cuda.max_memory_allocated`; on the CPU the bytes of the tensors alive as the step
starts plus the highest net total of what the step allocates, from the profiler's memory events,
which see every allocation, a compiled graph's buffers included (a TorchDispatchMode meter would not:
dynamo runs a frame eagerly under one). Speed is tokens per second over `--steps` steps after a
warm-up, the sides alternating, medians reported.
After its first step every side must have changed all its trainable parameters (a side whose
adapters got no gradient, e.g. under reentrant checkpointing with frozen inputs, would look fast).

peft's QLoRA is peft's LoRA over the transformers model whose blocks' linear layers are replaced by
bitsandbytes `Linear4bit` (NF4, double quantization, block 64; compute dtype `--dtype`), which is
what `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` builds, done
here in memory from random weights. Embeddings and head stay in the base's dtype, frozen; only the adapters
train: what temper's QLoRA side is. `prepare_model_for_kbit_training` is not called: it would turn
on activation checkpointing whatever `--checkpointing` says and cast the other weights to float32.
bitsandbytes is optional (`pip install bitsandbytes`): without it (or without a backend for the
device: it has a CPU backend since 0.45) the QLoRA row says why it has no peer. Its 4-bit weights
(`Params4bit`, packed uint8) are plain tensor storages for the meter; their quantization state
(8-bit absmax, the float32 scales of those, code tables) is not a parameter or buffer, so it is
tracked from the start too.

    python benchmarks/finetune_memory.py                       # CPU shape: dim 512, 8 layers, seq 256
    python benchmarks/finetune_memory.py --device cuda --shape llama-3-8b --seq 2048 --batch 1 \\
        --checkpointing --methods lora qlora --repeats 1     # Llama-3-8B shape on a GPU, bf16
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from profiling import print_top_kernels
from torch import nn

from temper.model.config import PRESETS, ModelConfig
from temper.model.hf.config import to_hf_config
from temper.model.lora import ALL_LINEAR_TARGETS
from temper.model.transformer import Transformer
from temper.train.memory import storage_leaves
from temper.train.methods import LoRAConfig, apply_method, base_dtype
from temper.train.parallel import DistInfo, parallelize
from temper.train.step import autocast, train_step

Side = tuple[nn.Module, torch.optim.Optimizer, Callable]


def temper_side(cfg: ModelConfig, method: str, device: str, dtype: torch.dtype, rank: int, ckpt: bool,
                compile: bool = False, offload: bool = False) -> Side:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(base_dtype(method, dtype))  # as `temper sft` loads it
    apply_method(model, method, LoRAConfig(rank, 2 * rank, 0.0, list(ALL_LINEAR_TARGETS)), amp_dtype=dtype)
    # temper's own wrapping, as `--train.activation_checkpointing 1 --train.compile true` does
    parallelize(model, DistInfo(0, 0, 1, torch.device(device)), activation_checkpointing=int(ckpt),
                activation_offload=offload, compile=compile)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(model, opt, [(x, y)], step=1, amp_dtype=dtype)

    return model, opt, step


def bnb_missing(device: str) -> str | None:
    """Why peft's QLoRA cannot run on `device` (None when it can): bitsandbytes absent or without a backend."""
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64 * 256, device=device), quant_type="nf4", compress_statistics=True)
    except Exception as e:  # ImportError, or no kernel for the device: either way no peer
        return f"bitsandbytes: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def hf_model(cfg: ModelConfig, device: str, dtype: torch.dtype) -> nn.Module:
    """The transformers model of this shape, random weights made on `device`."""
    import transformers

    config = transformers.AutoConfig.for_model(**to_hf_config(cfg))
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def bnb_side(cfg: ModelConfig, device: str, dtype: torch.dtype, rank: int, ckpt: bool) -> Side:
    """peft LoRA over a transformers model whose blocks' linear layers are bitsandbytes NF4: the peer of temper's QLoRA."""
    import bitsandbytes as bnb

    model = hf_model(cfg, device, base_dtype("qlora", dtype))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in ALL_LINEAR_TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", compress_statistics=True, device="meta")
                # Params4bit quantizes (64-weight blocks, double-quantized scales) when moved to a device.
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(child.weight.device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what from_pretrained sets: peft then wraps Linear4bit with its 4-bit LoRA layer
    return _hf_train(model, "lora", rank, ckpt, dtype)


def hf_side(cfg: ModelConfig, method: str, device: str, dtype: torch.dtype, rank: int, ckpt: bool) -> Side:
    return _hf_train(hf_model(cfg, device, base_dtype(method, dtype)), method, rank, ckpt, dtype)


def _hf_train(model: nn.Module, method: str, rank: int, ckpt: bool, dtype: torch.dtype) -> Side:
    if ckpt:  # non-reentrant, as temper's: reentrant checkpointing with frozen inputs would drop the adapters' gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(
            ALL_LINEAR_TARGETS), lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(x.device, dtype):  # as the Trainer's bf16=True does
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as transformers' Trainer does (max_grad_norm=1.0), as temper does
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def peak_bytes(model: nn.Module, opt: torch.optim.Optimizer, step: Callable, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes of one steady-state step (after a first step made the optimizer state): the CUDA
    allocator's peak on a GPU; on the CPU, the tensors alive as the step starts plus the highest net total
    of the step's own allocations."""
    step(x, y)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    alive = {}  # storage address -> bytes: a storage once, however many tensors view it
    for t in [*model.parameters(), *model.buffers(), *_quant_states(model), *states, x, y]:
        for leaf in storage_leaves(t):
            alive[leaf.untyped_storage().data_ptr()] = leaf.untyped_storage().nbytes()
    return sum(alive.values()) + _cpu_allocation_peak(lambda: step(x, y))


def _cpu_allocation_peak(fn: Callable[[], None]) -> int:
    """The highest net bytes that `fn` has allocated on the CPU at any moment, from the profiler's memory
    events (every allocation of PyTorch's CPU allocator, a compiled graph's buffers included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    net = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        net += e.nbytes()  # negative for a free
        peak = max(peak, net)
    return peak


def _quant_states(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of bitsandbytes' 4-bit weights' quantization state (absmax, nested absmax, code
    tables): held by the weights, not registered as parameters or buffers."""
    out = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            out += [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return out


def unchanged_after_a_step(trainable: list[nn.Parameter], step: Callable, x: torch.Tensor, y: torch.Tensor) -> int:
    """Run one step; how many trainable tensors it left unchanged (0 for a side that trains what it should)."""
    before = [p.detach().clone() for p in trainable]
    step(x, y)
    return sum(bool(torch.equal(b, p.detach())) for b, p in zip(before, trainable))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on cuda, else fp32")
    ap.add_argument("--shape", default="", help="a preset (e.g. llama-3-8b); else the --dim/--layers/... shape")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["full", "lora", "qlora"], choices=["full", "lora", "qlora"])
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every side")
    ap.add_argument("--compile", action="store_true",
                    help="temper's blocks compiled (rows 'temper+compile'); a side that fails to compile runs eager")
    ap.add_argument("--eager", nargs="*", default=[], choices=["full", "lora", "qlora"],
                    help="with --compile, also measure temper uncompiled for these methods (rows 'temper')")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick dry run)")
    ap.add_argument("--offload", nargs="*", default=[], choices=["full", "lora", "qlora"],
                    help="for these methods temper offloads the checkpointed inputs to CPU (needs --checkpointing)")
    ap.add_argument("--profile", nargs="*", default=[], choices=["full", "lora", "qlora"],
                    help="profile one more step of every side of these methods (peers too): top kernels to stderr")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.compile_backend != "inductor":  # nn.Module.compile and torch.compile both read this name
        torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype if args.dtype != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.shape:
        cfg = replace(PRESETS[args.shape], max_seq_len=args.seq, dropout=0.0)
    else:
        cfg = replace(PRESETS["debug-llama"], dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, ffn_dim=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq,
                      tie_embeddings=False)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    y = torch.roll(x, -1, dims=1)
    ckpt, rank, dev = args.checkpointing, args.rank, args.device
    peers = {"full": "transformers", "lora": "peft", "qlora": "peft"}
    sides: dict[tuple[str, str], Callable[[], Side]] = {}
    for m in args.methods:
        offload = m in args.offload
        suffix = "+offload" if offload else ""
        for compiled in [args.compile] + ([False] if args.compile and m in args.eager else []):
            name = "temper" + ("+compile" if compiled else "") + suffix
            sides[(m, name)] = lambda m=m, o=offload, c=compiled: temper_side(cfg, m, dev, dtype, rank, ckpt, c, o)
        if m != "qlora":
            sides[(m, peers[m])] = lambda m=m: hf_side(cfg, m, dev, dtype, rank, ckpt)
    no_qlora_peer = bnb_missing(args.device) if "qlora" in args.methods else None
    if "qlora" in args.methods and no_qlora_peer is None:
        sides[("qlora", "peft")] = lambda: bnb_side(cfg, dev, dtype, rank, ckpt)
    results: dict = {k: {"peak": 0, "tps": [], "error": None} for k in sides}

    def run(key: tuple[str, str], first: bool) -> None:
        model = opt = step = None
        try:
            model, opt, step = sides[key]()
            model.train()
            if first:
                trainable = [p for p in model.parameters() if p.requires_grad]
                if unchanged_after_a_step(trainable, step, x, y):
                    raise RuntimeError("some trainable parameters did not change in a step")
                results[key]["peak"] = peak_bytes(model, opt, step, x, y)
            step(x, y)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            results[key]["tps"].append(args.steps * args.batch * args.seq / (time.perf_counter() - t))
            if first and key[0] in args.profile:
                print_top_kernels(" ".join(key), functools.partial(step, x, y), args.device.startswith("cuda"))
        except Exception as e:  # one side failing (e.g. out of memory) must not hide the others
            results[key]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"# {key}: {results[key]['error']}", file=sys.stderr, flush=True)
        del model, opt, step
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    for r in range(args.repeats):
        for key in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            if results[key]["error"]:
                continue
            run(key, first=r == 0)
            method, impl = key
            if results[key]["error"] and "+compile" in impl and (method, impl.replace("+compile", "")) not in sides:
                eager = (method, impl.replace("+compile", ""))  # measure it uncompiled rather than not at all
                sides[eager] = lambda m=method, o="+offload" in impl: temper_side(cfg, m, dev, dtype, rank, ckpt, False, o)
                results[eager] = {"peak": 0, "tps": [], "error": None}
                run(eager, first=True)
    meter = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "CPU allocations"
    print(f"{args.shape or 'custom'} shape: dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, batch "
          f"{args.batch} x {args.seq}, LoRA r={args.rank} on every linear layer of the blocks, {dtype}, {args.device}, "
          f"checkpointing {'on' if ckpt else 'off'}, median of {args.repeats}\n")
    print(f"| method | implementation | peak GiB ({meter}) | tokens/s | peak / peer's | tokens/s / peer's |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    rows = []
    for (method, impl), res in results.items():
        if res["error"] or not res["tps"]:
            print(f"| {method} | {impl} | failed: {res['error']} | | | |")
            rows.append({"method": method, "impl": impl, "error": res["error"]})
            continue
        tps = statistics.median(res["tps"])
        peer = results.get((method, peers[method]), {})
        ok = impl.startswith("temper") and peer and not peer["error"] and peer["tps"]
        mem = res["peak"] / peer["peak"] if ok else None
        speed = tps / statistics.median(peer["tps"]) if ok else None
        rows.append({"method": method, "impl": impl, "peak_gib": res["peak"] / 2**30, "tokens_per_s": tps,
                     "temper_peak_ratio": mem, "temper_speed_ratio": speed})
        print(f"| {method} | {impl} | {res['peak'] / 2**30:.2f} | {tps:,.0f} | {'' if mem is None else f'{mem:.2f}x'} "
              f"| {'' if speed is None else f'{speed:.2f}x'} |")
    if no_qlora_peer is not None:
        print(f"\nqlora: no peft peer ({no_qlora_peer})")
    elif "qlora" in args.methods:
        import bitsandbytes

        print(f"\nqlora peer: peft LoRA over bitsandbytes {bitsandbytes.__version__} NF4 (double quantization, "
              f"compute dtype {dtype})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape or "custom", "seq": args.seq, "batch": args.batch, "dtype": str(dtype),
                       "checkpointing": ckpt, "meter": meter, "qlora_peer_missing": no_qlora_peer, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
