"""Scale-out: bytes each parallel layout communicates per optimizer step, against its theory, and its step time
against DDP, side by side in one run.

One launch (`torch.distributed.run`, gloo on CPU) per rank count runs every layout in turn in the same
processes, each through temper's own path (`init_distributed` -> `parallelize` -> `build_optimizer` ->
`train_step`) on a Llama-shaped model (debug-llama widened: `--dim`, `--layers`, SwiGLU `3 * dim`) so that
parameters dominate. The global batch (`--batch` sequences per rank times the ranks) is the same for every
layout, so step times compare the same work.

Bytes are counted by `CommCounter`, a dispatch mode that sees every c10d op (whatever Python API issued it:
`all_reduce`, `all_gather_into_tensor` / `all_gather_single`, the coalesced variants, and DDP's C++ reducer,
which calls the same ops) and every functional collective (DTensor's), so nothing has to be wrapped by name.
The table gives, per rank and step, the bytes each rank *sends* under bandwidth-optimal (ring) algorithms:
an all-reduce of S bytes over n ranks sends 2(n-1)/n * S, an all-gather or reduce-scatter of a full tensor
of S bytes (n-1)/n * S, a broadcast (pipelined) (n-1)/n * S, a send its S (the same convention as
nccl-tests' bus bandwidth). Theory per layout, P the parameter bytes, N the data-parallel ranks:

    DDP             all-reduce of the gradients                        2 (N-1)/N P
    ZeRO-1          reduce-scatter grads + all-gather params           2 (N-1)/N P
    FSDP2 ZeRO-3    all-gather fwd + all-gather bwd + reduce-scatter    3 (N-1)/N P
    ZeRO-2          all-gather fwd + reduce-scatter                     2 (N-1)/N P
    HSDP R x S      ZeRO-3 within S, all-reduce of the shard over R     3 (S-1)/S P + 2 (R-1)/R P/S
    TP t (Megatron) 4 all-reduces of B*T*d per block (2 fwd, 2 bwd),     (4L+2) 2 (t-1)/t B T d (x4 bytes)
                    + the vocab-parallel embedding (fwd) and head (bwd);
                    sequence parallel: all-gather + reduce-scatter pairs, the same total
    PP p            activation fwd + its gradient bwd per boundary      2 (p-1)/p B T d (x4 bytes)

Counting runs over its own steps (the mode slows every op); timed steps run without it. Timings on a shared
CPU are noisy: the step-time column is a ratio against DDP measured in the same processes, never an absolute
claim. On one GPU (`--ranks 1 --device cuda --layouts ddp fsdp2`) it measures tokens/s and MFU of FSDP2
against DDP over a one-rank group: the same code paths, overheads only (no traffic).

    python benchmarks/scale_out.py --ranks 2 4 --dim 256 --layers 4 --steps 3
    python benchmarks/scale_out.py --ranks 2 --layouts ddp fsdp2 --dim 64 --layers 2 --json out.json
    python benchmarks/scale_out.py --ranks 1 --device cuda --shape llama-3.2-1b --batch 4 --seq 1024 \\
        --dtype bf16 --layouts ddp fsdp2 --steps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from temper.model.config import PRESETS, ModelConfig
from temper.model.transformer import Transformer
from temper.train.optim import OptimConfig, build_optimizer
from temper.train.parallel import DistInfo, ParallelConfig, apply_fsdp, init_distributed, parallelize, unwrap
from temper.train.step import datasheet_peak_flops, measured_matmul_peak_flops, throughput, train_step

ROOT = Path(__file__).resolve().parents[1]

# ---- the counter ------------------------------------------------------------------------------------------

AR, AG, RS, BC, SEND, RECV, OTHER = "all-reduce", "all-gather", "reduce-scatter", "broadcast", "send", "recv", "other"
KINDS = (AR, AG, RS, BC, SEND, OTHER)
"""The table's columns (a recv is its peer's send: counted once, as the send)."""

OP_KIND: dict[str, str | None] = {
    **dict.fromkeys(["allreduce_", "allreduce_coalesced_", "all_reduce", "all_reduce_", "all_reduce_coalesced",
                     "all_reduce_coalesced_"], AR),
    **dict.fromkeys(["allgather_", "_allgather_base_", "allgather_coalesced_", "allgather_into_tensor_coalesced_",
                     "all_gather_into_tensor", "all_gather_into_tensor_coalesced", "all_gather_into_tensor_out"], AG),
    **dict.fromkeys(["reduce_scatter_", "_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_",
                     "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "reduce_scatter_tensor_out"], RS),
    **dict.fromkeys(["broadcast_", "broadcast"], BC),
    **dict.fromkeys(["send", "isend"], SEND),
    **dict.fromkeys(["recv_", "recv_any_source_", "irecv"], RECV),
    **dict.fromkeys(["alltoall_", "alltoall_base_", "all_to_all_single", "reduce_", "gather_", "scatter_"], OTHER),
    **dict.fromkeys(["barrier", "monitored_barrier_", "wait_tensor", "check_for_nan", "_wrap_tensor_autograd"],
                    None),  # no payload
}
"""c10d and functional-collective op names -> kind; a name not here counts as `other` and is reported."""


def _nbytes(x: object) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def sent_factor(kind: str, n: int) -> float:
    """Bytes a rank sends per byte of a collective's full tensor over n ranks, bandwidth-optimal (ring)."""
    if kind == AR:
        return 2 * (n - 1) / n
    if kind == SEND:
        return 1.0
    if kind == RECV:
        return 0.0
    return (n - 1) / n


class CommCounter(TorchDispatchMode):
    """Counts every c10d op and functional collective issued while active: calls, full-tensor bytes
    (`payload`: an all-gather's gathered output, a reduce-scatter's unreduced input) and the bytes this rank
    sends under ring algorithms (`sent`), by kind.

    Ops on DTensors are handed back (NotImplemented) so that DTensor desugars them first and the
    collectives it issues come through here (torch's CommDebugMode does the same). Dispatch modes are
    thread-local state that autograd carries into its backward threads, so hooks (DDP's reducer, FSDP2's
    reduce-scatter) are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.payload: dict[str, float] = defaultdict(float)
        self.sent: dict[str, float] = defaultdict(float)
        self.unknown: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional"):
            self._record(func, args, kwargs)
        return out

    def _record(self, func, args: tuple, kwargs: dict) -> None:
        name = func._schema.name.split("::")[1]
        if name not in OP_KIND:
            self.unknown.add(f"{func.namespace}::{name}")
        kind = OP_KIND.get(name, OTHER)
        schema = [a.name for a in func._schema.arguments]
        if kind is None or not {"process_group", "group_name", "group_size"} & set(schema):
            return  # no data moved (a wait, a wrapper), or nothing to count it by: listed as unknown above
        bound = {**dict(zip(schema, args)), **kwargs}
        if func.namespace == "c10d":  # the input is the argument just before the group (every c10d schema)
            at = schema.index("process_group")
            group, inputs = dist.ProcessGroup.unbox(bound["process_group"]), bound[schema[at - 1]]
            n = group.size()
        else:
            from torch.distributed.distributed_c10d import _resolve_process_group

            n = bound.get("group_size") or _resolve_process_group(bound["group_name"]).size()
            inputs = bound.get("input", bound.get("inputs", bound.get("tensor")))
        if name == "batch_p2p_ops":  # a list of isend / irecv, one tensor each
            for op, t in zip(bound["op_list"], bound["tensors"], strict=True):
                self._add(SEND if "send" in op else RECV, _nbytes(t), n)
            return
        full = _nbytes(inputs) * (n if kind == AG else 1)  # an all-gather's input is this rank's shard
        self._add(kind, full, n)

    def _add(self, kind: str, full: int, n: int) -> None:
        self.calls[kind] += 1
        self.payload[kind] += full
        self.sent[kind] += full * sent_factor(kind, n)


# ---- layouts and their theory -------------------------------------------------------------------------------


@dataclass
class Shape:
    """What the theory needs: parameter bytes (all, and the FSDP2 root's), activations' sizes."""

    param_bytes: int
    root_bytes: int
    global_batch: int
    seq: int
    dim: int
    layers: int
    act_bytes: int
    """Bytes per activation element (4: fp32)."""


def layout_config(name: str, world: int) -> ParallelConfig | None:
    """The ParallelConfig of a named layout on `world` ranks; None where it does not fit."""
    half = world // 2
    configs = {
        "ddp": ParallelConfig(),
        "zero1": ParallelConfig(zero1=True),
        "fsdp2": ParallelConfig(dp_shard=world, dp_replicate=1),
        "zero2": ParallelConfig(dp_shard=world, dp_replicate=1, reshard_after_forward=False),
        "hsdp": ParallelConfig(dp_replicate=2, dp_shard=half) if world >= 4 and world % 2 == 0 else None,
        "tp": ParallelConfig(tp=world, dp_replicate=1, sequence_parallel=False),
        "tp+sp": ParallelConfig(tp=world, dp_replicate=1, sequence_parallel=True),
        "pp": ParallelConfig(pp=world, dp_replicate=1),
        "fsdp2+tp": ParallelConfig(dp_shard=half, dp_replicate=1, tp=2) if world >= 4 and world % 2 == 0 else None,
    }
    return configs[name]


LAYOUT_LABEL = {
    "ddp": "DDP", "zero1": "ZeRO-1 (DDP + ZeroRedundancyOptimizer)", "fsdp2": "FSDP2 ZeRO-3",
    "zero2": "FSDP2 ZeRO-2 (reshard_after_forward=false)", "hsdp": "HSDP", "tp": "TP", "tp+sp": "TP + sequence parallel",
    "pp": "PP", "fsdp2+tp": "2-D: FSDP2 x TP",
}
LAYOUTS = tuple(LAYOUT_LABEL)
NEEDS = {"tp": "temper.train.tensor_parallel", "tp+sp": "temper.train.tensor_parallel",
         "fsdp2+tp": "temper.train.tensor_parallel", "pp": "temper.train.pipeline"}
"""Layouts whose module may not exist yet: listed as not measured when it does not."""


def theory(name: str, cfg: ParallelConfig, world: int, s: Shape) -> tuple[float, str, str]:
    """(bytes each rank sends per optimizer step, the formula, a note on known deviations)."""
    deg = cfg.degrees(world)
    P, n = s.param_bytes, deg["dp_replicate"] * deg["dp_shard"]
    root = s.root_bytes / P

    def zero3_note(total: float, shard: int) -> str:
        expect = 1 - (shard - 1) / shard * s.root_bytes / total
        return (f"the root unit (embedding, final norm, head: {root:.1%} of P) stays gathered after forward, so it "
                f"is not gathered again in backward: expect {expect:.3f}")

    if name == "ddp":
        return 2 * (n - 1) / n * P, "2(N-1)/N P", ""
    if name == "zero1":
        return (2 * (n - 1) / n * P, "2(N-1)/N P (reduce-scatter + all-gather)",
                "torch's ZeroRedundancyOptimizer all-reduces whole gradients (DDP) then broadcasts each shard: "
                "3(N-1)/N P, expect 1.5")
    if name == "fsdp2":
        return 3 * (n - 1) / n * P, "3(N-1)/N P", zero3_note(3 * (n - 1) / n * P, n)
    if name == "zero2":
        return 2 * (n - 1) / n * P, "2(N-1)/N P", ""
    if name == "hsdp":
        r, sh = deg["dp_replicate"], deg["dp_shard"]
        total = 3 * (sh - 1) / sh * P + 2 * (r - 1) / r * P / sh
        return total, f"3(S-1)/S P + 2(R-1)/R P/S, R={r} S={sh}", zero3_note(total, sh)
    act = s.global_batch // n * s.seq * s.dim * s.act_bytes  # B T d bytes of one data-parallel rank's batch
    t, p = deg["tp"], deg["pp"]
    # Megatron: 2 all-reduces of B T d per block forward (after o_proj, after down_proj) and 2 backward
    # (the inputs' gradients of q/k/v and gate/up), plus the vocabulary-parallel embedding's output (forward)
    # and the head's input gradient (backward). Sequence parallel turns each into an all-gather and a
    # reduce-scatter pair: the same bytes.
    tp_bytes = (4 * s.layers + 2) * 2 * (t - 1) / t * act
    sp_note = ("the sequence is gathered back before the final norm and split again in backward: expect "
               f"{(4 * s.layers + 3) / (4 * s.layers + 2):.3f}")
    if name in ("tp", "tp+sp"):
        return (tp_bytes, "(4L+2) 2(t-1)/t B T d",
                sp_note if cfg.sequence_parallel else "the loss's (B, T) reductions are not in the formula")
    if name == "pp":
        return 2 * (p - 1) / p * act, "2(p-1)/p B T d", ""
    if name == "fsdp2+tp":
        return (3 * (n - 1) / n * P / t + tp_bytes, "3(N-1)/N P/t + (4L+2) 2(t-1)/t B T d",
                "norms are replicated over tp, not split by t; the root unit is not gathered again in backward "
                "(as FSDP2 ZeRO-3) and the sequence is gathered before the final norm (as TP + sequence parallel)")
    raise ValueError(name)


# ---- one rank -----------------------------------------------------------------------------------------------


def model_config(a: argparse.Namespace) -> ModelConfig:
    if a.shape:
        cfg = PRESETS[a.shape]
        return dataclasses.replace(cfg, max_seq_len=max(a.seq, 64), dropout=0.0, rope_scaling=None)
    # Untied, as Llama-3-8B and larger are: a pipeline cannot tie the first stage's embedding to the last's head.
    return dataclasses.replace(PRESETS["debug-llama"], dim=a.dim, n_layers=a.layers, n_heads=a.heads,
                               n_kv_heads=max(a.heads // 2, 1), ffn_dim=3 * a.dim, max_seq_len=max(a.seq, 64),
                               tie_embeddings=False)


def wrap(name: str, model: nn.Module, d: DistInfo, amp_dtype: torch.dtype) -> nn.Module:
    """The layout, as the recipes apply it; on one rank, the same wrappers over a one-rank group (parallelize
    leaves a one-rank model plain)."""
    if d.world > 1:
        return parallelize(model, d, amp_dtype=amp_dtype)
    if name == "ddp":
        ids = [d.device.index or 0] if d.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh

    apply_fsdp(model, init_device_mesh(d.device.type, (1,)), param_dtype=amp_dtype)
    return model


def run_layout(name: str, a: argparse.Namespace, world: int, device_name: str) -> dict:
    layout = layout_config(name, world)
    d = init_distributed(device_name, layout)
    cfg = model_config(a)
    amp_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    with torch.device(d.device):  # built where it trains (a 1B model's init on the CPU takes seconds)
        model = Transformer(cfg)
    params = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    shape = Shape(param_bytes=sum(params.values()),
                  root_bytes=sum(b for n, b in params.items() if not n.startswith("layers.")),
                  global_batch=a.batch * world, seq=a.seq, dim=cfg.dim, layers=cfg.n_layers,
                  act_bytes=4)  # the theory's activations in fp32, as the multi-rank runs (CPU) train
    flops_per_token = model.flops_per_token(a.seq)  # the whole model's (a pipeline prunes it to its stages)
    train_model = wrap(name, model, d, amp_dtype)
    opt = build_optimizer(unwrap(model), OptimConfig(lr=1e-4), d.device.type, shard_states=layout.zero1)
    per_rank = shape.global_batch // d.dp_world
    gen = torch.Generator(device=d.device)

    def step(i: int) -> None:
        gen.manual_seed(1000 * i + d.dp_rank)  # the ranks of one tensor-parallel group share a batch
        x = torch.randint(0, cfg.vocab_size, (per_rank, a.seq + 1), device=d.device, generator=gen)
        train_step(train_model, opt, [(x[:, :-1], x[:, 1:])], step=i, amp_dtype=amp_dtype, dp_group=d.dp_group)

    for i in range(a.warmup):
        step(i)
    counter = CommCounter()
    if world > 1:
        with counter:
            for i in range(a.steps):
                step(a.warmup + i)
    times = []
    for i in range(a.steps):
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step(a.warmup + a.steps + i)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64, device=d.device)  # on the device: NCCL reduces no CPU tensor
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
    # Every rank's counts, averaged: a pipeline's stages send different amounts.
    kinds = (*KINDS, RECV)
    sums = torch.tensor([[counter.sent[k] for k in kinds], [counter.payload[k] for k in kinds],
                         [counter.calls[k] for k in kinds]], dtype=torch.float64, device=d.device) / max(a.steps, 1)
    dist.all_reduce(sums)
    sums /= world
    unknown: list[set[str]] = [set() for _ in range(world)]
    dist.all_gather_object(unknown, counter.unknown)
    step_s = statistics.median(slowest.tolist())
    tokens_per_s = shape.global_batch * a.seq / step_s
    row = {
        "layout": name, "ranks": world, "degrees": layout.degrees(world), "device": str(d.device),
        "sent": dict(zip(kinds, sums[0].tolist())), "payload": dict(zip(kinds, sums[1].tolist())),
        "calls": dict(zip(kinds, sums[2].tolist())), "unknown_ops": sorted(set().union(*unknown)),
        "shape": dataclasses.asdict(shape), "step_s": step_s, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
    }
    row["sent_total"] = sum(row["sent"][k] for k in KINDS)
    if world > 1:
        row["theory"], row["formula"], row["note"] = theory(name, layout, world, shape)
        row["ratio"] = row["sent_total"] / row["theory"] if row["theory"] else None
    return row


def worker(a: argparse.Namespace) -> None:
    """One rank under torch.distributed.run: every layout in turn; rank 0 writes the rows to `a.out`."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Joined here, with a timeout, so that a layout failing on one rank ends the run instead of hanging it
    # (init_distributed then finds the group and only builds each layout's mesh).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=a.timeout),
                            device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None)
    rows = []
    for name in a.layouts:
        try:
            rows.append(run_layout(name, a, world, a.device))
            gc.collect()  # the layout's model and optimizer go before the next one is built
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:  # reported in the table; the other ranks fail the same way (same code, same shapes)
            rows.append({"layout": name, "ranks": world, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"rank {rank}: {name} failed: {e!r}", file=sys.stderr, flush=True)
    if rank == 0:
        Path(a.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


# ---- the launcher and the table -----------------------------------------------------------------------------


def launch(a: argparse.Namespace, world: int, layouts: list[str], out: Path) -> list[dict]:
    """Every layout on `world` ranks in one torch.distributed.run job; its rows, or one error row per layout."""
    forwarded = ["--dim", a.dim, "--layers", a.layers, "--heads", a.heads, "--batch", a.batch, "--seq", a.seq,
                 "--steps", a.steps, "--warmup", a.warmup, "--device", a.device, "--dtype", a.dtype,
                 "--threads", a.threads, "--timeout", a.timeout]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(Path(__file__).resolve()), "--worker", "--out", str(out), "--layouts", *layouts,
           *map(str, forwarded), *(["--shape", a.shape] if a.shape else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    # In this process group, so that a `timeout` around this script ends the ranks too.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torch.distributed.run passes SIGTERM on to its workers
        try:
            log, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        log += f"\n(stopped after {a.timeout} s)"
    if proc.returncode == 0 and out.exists():
        return json.loads(out.read_text())
    print(log[-4000:], file=sys.stderr)
    return [{"layout": n, "ranks": world, "error": f"launch failed (exit {proc.returncode})"} for n in layouts]


def mb(x: float | None) -> str:
    return "" if x is None else f"{x / 1e6:.3f}"


def layout_text(r: dict) -> str:
    deg = r.get("degrees") or {}
    shown = ", ".join(f"{k}={v}" for k, v in deg.items() if v > 1)
    return f"{LAYOUT_LABEL[r['layout']]}{f' ({shown})' if shown else ''}"


def table(rows: list[dict], peak: float | None) -> list[str]:
    head = ("| layout | ranks | " + " | ".join(f"{k} MB" for k in KINDS) +
            " | sent MB/rank | theory MB/rank | formula | measured / theory | step s | step vs DDP | tokens/s | MFU |")
    lines = [head, "| --- | ---: | " + "---: | " * len(KINDS) + "---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    ddp = {r["ranks"]: r["step_s"] for r in rows if r["layout"] == "ddp" and "step_s" in r}
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {LAYOUT_LABEL[r['layout']]} | {r['ranks']} | {r.get('error', 'not measured')} |")
            continue
        vs = r["step_s"] / ddp[r["ranks"]] if r["ranks"] in ddp else None
        mfu = peak and throughput(r["tokens_per_s"], 1.0, r["flops_per_token"], peak * r["ranks"])[1]
        ratio = r.get("ratio")
        lines.append(
            f"| {layout_text(r)} | {r['ranks']} | " + " | ".join(mb(r["sent"][k]) for k in KINDS) +
            f" | {mb(r['sent_total'])} | {mb(r.get('theory'))} | {r.get('formula', 'n/a (one rank)')} "
            f"| {'' if ratio is None else f'{ratio:.3f}'} | {r['step_s']:.4f} | {'' if vs is None else f'{vs:.2f}'} "
            f"| {r['tokens_per_s']:,.0f} | {'n/a' if peak is None else f'{mfu:.1%}'} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="one launch per rank count")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8, help="query heads (kv heads: half); tp must divide both")
    p.add_argument("--shape", choices=sorted(PRESETS), help="a preset instead of the widened debug-llama")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank under DDP (the global batch / ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="counted steps, then as many timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) per rank")
    p.add_argument("--timeout", type=int, default=600,
                   help="seconds a launch may take before it is stopped (and a collective may wait)")
    p.add_argument("--json", help="also write every row to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    if 1 in a.ranks and set(a.layouts) - {"ddp", "fsdp2"}:
        p.error("--ranks 1 measures ddp and fsdp2 only (the wrappers over a one-rank group)")

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in a.ranks:
            runnable = []
            for name in a.layouts:
                missing = NEEDS.get(name) and importlib.util.find_spec(NEEDS[name]) is None
                if missing or layout_config(name, world) is None:
                    why = f"not measured: {NEEDS[name]} does not exist" if missing else "not measured: needs 4+ ranks"
                    rows.append({"layout": name, "ranks": world, "error": why})
                else:
                    runnable.append(name)
            if runnable:
                rows += launch(a, world, runnable, Path(tmp) / f"rows-{world}.json")
    order = {n: i for i, n in enumerate(LAYOUTS)}
    rows.sort(key=lambda r: (r["ranks"], order[r["layout"]]))

    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    peak = measured_matmul_peak_flops(device, dtype) if a.device == "cuda" else None
    datasheet = datasheet_peak_flops(device, dtype) if a.device == "cuda" else None
    cfg = model_config(a)
    print(f"model: {a.shape or 'debug-llama widened'} dim {cfg.dim}, {cfg.n_layers} layers, ffn {cfg.hidden_dim}, "
          f"vocab {cfg.vocab_size}; batch {a.batch} x seq {a.seq} per rank (global batch = batch x ranks), "
          f"{a.dtype}, {a.steps} counted + {a.steps} timed steps, device {a.device}")
    print("bytes: per rank per optimizer step, sent under ring algorithms (see the docstring); step time: median "
          "of the slowest rank's, and its ratio to DDP in the same launch")
    if peak:
        print(f"measured {a.dtype} matmul peak {peak / 1e12:.0f} TFLOP/s (datasheet "
              f"{'n/a' if datasheet is None else f'{datasheet / 1e12:.0f}'}); MFU against the measured peak")
    print()
    print("\n".join(table(rows, peak)))
    for r in rows:
        if r.get("layout") == "ddp" and "payload" in r and r["ranks"] > 1:
            share = r["payload"][AR] / r["shape"]["param_bytes"]
            print(f"\ncounter check ({r['ranks']} ranks): DDP all-reduce payload {mb(r['payload'][AR])} MB per step "
                  f"= {share:.4f} x the parameter bytes ({mb(r['shape']['param_bytes'])} MB)")
    notes = {(r["layout"], r.get("note")) for r in rows if r.get("note")}
    for name, note in sorted(notes):
        print(f"note, {LAYOUT_LABEL[name]}: {note}")
    unknown = sorted({op for r in rows for op in r.get("unknown_ops", [])})
    if unknown:
        print(f"ops counted as 'other' (not in OP_KIND): {', '.join(unknown)}")
    if a.json:
        for r in rows:
            if "tokens_per_s" in r and peak:
                r["mfu_measured"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * r["ranks"])
                r["mfu_datasheet"] = datasheet and r["tokens_per_s"] * r["flops_per_token"] / (datasheet * r["ranks"])
        Path(a.json).write_text(json.dumps({"rows": rows, "peak_flops": peak, "datasheet_flops": datasheet,
                                            "args": vars(a)}, indent=1))
    failed = [r for r in rows if "error" in r and not r["error"].startswith("not measured")]
    return 1 if failed else 0  # a layout that exists but failed fails the run (its row says why)


if __name__ == "__main__":
    sys.exit(main())
