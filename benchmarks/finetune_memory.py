"""Fine-tuning memory and speed: temper's full, LoRA and QLoRA steps against transformers (full)
and peft (LoRA, and QLoRA over bitsandbytes) on the same model shape, batch and precision, in one run.

Every side trains the same Llama-shaped model (random weights, exported once by temper and loaded
by transformers) on the same random tokens, with AdamW. Memory is the peak of live tensor bytes
during one steady-state step (forward, backward, optimizer step), counted by the same meter for
every side (`temper.train.memory.LiveTensorBytes`, which sees every tensor storage); speed is
tokens per second over `--steps` steps after a warm-up, the sides alternating, medians reported.

peft's QLoRA is peft's LoRA over a transformers model loaded with bitsandbytes' `BitsAndBytesConfig`
(NF4, double quantization, block 64 with scales in blocks of 256 as temper's torchao layout, compute
dtype float32 as every side here), the blocks' linear layers in 4 bits, embeddings and head in
float32, all frozen but the adapters: what temper's QLoRA side is. `prepare_model_for_kbit_training`
is not called: it would turn on activation checkpointing whatever `--checkpointing` says, and its
other work (casting the non-4-bit weights to float32, freezing them) is already so here.
bitsandbytes is optional (`pip install bitsandbytes`): without it (or without a backend for the device: it has a CPU backend
since 0.45) the QLoRA row says why it has no peer. Its 4-bit weights (`Params4bit`, packed uint8)
are plain tensor storages for the meter; their quantization state (8-bit absmax, the float32
scales of those, code tables) is not a parameter or buffer, so it is tracked from the start too.

    python benchmarks/finetune_memory.py                       # CPU shape: dim 512, 8 layers, seq 256
    python benchmarks/finetune_memory.py --device cuda --dim 4096 --layers 32 --heads 32 --kv-heads 8 \\
        --ffn 14336 --vocab 128256 --seq 2048 --checkpointing   # Llama-3-8B shape on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from temper.model.config import PRESETS
from temper.model.convert import save_hf
from temper.model.lora import ALL_LINEAR_TARGETS, apply_lora
from temper.model.transformer import Transformer
from temper.train.memory import LiveTensorBytes
from temper.train.step import train_step


def temper_side(cfg, method: str, device: str, rank: int, ckpt: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                                 Callable]:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if method == "qlora":
        from temper.model.quant import quantize_nf4

        quantize_nf4(model)
    if method in ("lora", "qlora"):
        apply_lora(model, rank, 2 * rank, ALL_LINEAR_TARGETS)
    if ckpt:
        from temper.train.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(model, every=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(model, opt, [(x, y)], step=1)

    return model, opt, step


def bnb_missing(device: str) -> str | None:
    """Why peft's QLoRA cannot run on `device` (None when it can): bitsandbytes absent or without a backend."""
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64 * 256, device=device), quant_type="nf4", compress_statistics=True)
    except Exception as e:  # ImportError, or no kernel for the device: either way no peer
        return f"bitsandbytes: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def bnb_side(path: str, device: str, rank: int, ckpt: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                     Callable]:
    """peft LoRA over a 4-bit NF4 transformers model (bitsandbytes): the peer of temper's QLoRA."""
    import transformers

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    # A 4-bit model cannot be moved with .to(): it is quantized as it is loaded onto its device.
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                                              device_map={"": str(dev)})
    return _hf_train(model, "lora", rank, ckpt)


def hf_side(path: str, method: str, device: str, rank: int, ckpt: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                             Callable]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path).to(device)
    return _hf_train(model, method, rank, ckpt)


def _hf_train(model: torch.nn.Module, method: str, rank: int, ckpt: bool) -> tuple[torch.nn.Module,
                                                                                  torch.optim.Optimizer, Callable]:
    if ckpt:
        model.gradient_checkpointing_enable()
    if method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(
            ALL_LINEAR_TARGETS), lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as transformers' Trainer does (max_grad_norm=1.0), as temper does
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def peak_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, step: Callable, x: torch.Tensor,
               y: torch.Tensor) -> int:
    """Peak live tensor bytes of one steady-state step (after a first step made the optimizer state)."""
    step(x, y)
    tracker = LiveTensorBytes()
    states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for t in [*model.parameters(), *model.buffers(), *_quant_states(model), *states, x, y]:
        for leaf in _leaves(t):
            tracker.track(leaf)
    tracker.mark_peak("start")
    with tracker:
        step(x, y)
    return tracker.peak


def _quant_states(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of bitsandbytes' 4-bit weights' quantization state (absmax, nested absmax, code
    tables): held by the weights, not registered as parameters or buffers."""
    out = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            out += [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return out


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's bytes: a wrapper subclass (torchao's NF4) reports its
    dense size as its storage, so its inner tensors are counted instead."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [leaf for n in names for leaf in _leaves(getattr(t, n))]
    return [t]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
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
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every side")
    args = ap.parse_args(argv)
    cfg = replace(PRESETS["debug-llama"], dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                  n_kv_heads=args.kv_heads, ffn_dim=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq,
                  tie_embeddings=False)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    y = torch.roll(x, -1, dims=1)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_hf(Transformer(cfg), cfg, tmp)
        sides = {
            ("full", "temper"): lambda: temper_side(cfg, "full", args.device, args.rank, args.checkpointing),
            ("full", "transformers"): lambda: hf_side(tmp, "full", args.device, args.rank, args.checkpointing),
            ("lora", "temper"): lambda: temper_side(cfg, "lora", args.device, args.rank, args.checkpointing),
            ("lora", "peft"): lambda: hf_side(tmp, "lora", args.device, args.rank, args.checkpointing),
            ("qlora", "temper"): lambda: temper_side(cfg, "qlora", args.device, args.rank, args.checkpointing),
        }
        no_qlora_peer = bnb_missing(args.device)
        if no_qlora_peer is None:
            sides[("qlora", "peft")] = lambda: bnb_side(tmp, args.device, args.rank, args.checkpointing)
        results: dict = {k: {"peak": 0, "tps": []} for k in sides}
        for r in range(args.repeats):
            for key in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                model, opt, step = sides[key]()
                model.train()
                if r == 0:
                    results[key]["peak"] = peak_bytes(model, opt, step, x, y)
                step(x, y)  # warm-up
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(x, y)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                results[key]["tps"].append(args.steps * args.batch * args.seq / (time.perf_counter() - t))
                del model, opt, step
    print(f"dim {args.dim}, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
          f"LoRA r={args.rank} on every linear layer of the blocks, fp32, {args.device}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, median of {args.repeats}\n")
    print("| method | implementation | peak live tensors (MiB) | tokens/s | temper's peak / peer's | temper's tokens/s / peer's |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for (method, impl), res in results.items():
        tps = statistics.median(res["tps"])
        ours = results[(method, "temper")]
        mem = f"{ours['peak'] / res['peak']:.2f}x" if impl != "temper" else ""
        speed = f"{statistics.median(ours['tps']) / tps:.2f}x" if impl != "temper" else ""
        print(f"| {method} | {impl} | {res['peak'] / 2**20:.1f} | {tps:,.0f} | {mem} | {speed} |")
    if no_qlora_peer is not None:
        print(f"\nqlora: no peft peer ({no_qlora_peer})")
    else:
        import bitsandbytes

        print(f"\nqlora peer: peft LoRA over bitsandbytes {bitsandbytes.__version__} NF4 (double quantization, "
              f"compute dtype float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
