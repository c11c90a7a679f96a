"""Peak host memory and time of loading a Hugging Face checkpoint: temper's `load_hf` against
`transformers.AutoModelForCausalLM.from_pretrained`, on the same files, each in a fresh process.

The checkpoint is a preset's shape with zero weights (the values do not change what loading
costs), written once with temper's `save_hf`. Memory is the growth of the process's peak resident
set (VmHWM) over the set after the imports and torch's one-time set-up, divided by the size of the
weights in the loaded dtype: 1.0x means the weights were held once. It is taken after loading and
again after reading every weight once, since a loader that memory-maps the files (transformers
does, when no cast is needed) only pays for a page when it is first read. The two loaders alternate
`--repeats` times; the table shows medians.

    python benchmarks/load_memory.py                                  # llama-3.2-1b in bf16 (2.5 GB)
    python benchmarks/load_memory.py --preset gpt2-124m --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer

_MEASURE = """
import json, sys, time, torch
from temper.model.config import PRESETS
from temper.model.transformer import Transformer
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
def status(key): return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
if which == "transformers":
    import transformers
with torch.device("meta"):
    Transformer(PRESETS["debug-llama"])  # torch's one-time set-up is not the loader's
base = status("VmRSS")
t = time.perf_counter()
if which == "temper":
    from temper.model.hf.checkpoint import load_hf
    model, _ = load_hf(path, dtype=dtype)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
seconds = time.perf_counter() - t
weights = sum(p.numel() * p.element_size() for p in model.parameters())
loaded = status("VmHWM") - base
t = time.perf_counter()
with torch.no_grad():
    for p in model.parameters():  # a memory-mapped loader's pages become resident only when read
        p.sum()
read = seconds + time.perf_counter() - t
used = status("VmHWM") - base
print(json.dumps({"loaded": loaded / weights, "used": used / weights, "seconds": seconds, "read": read,
                  "weights": weights}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--max-seq-len", type=int, default=4096, help="context of the checkpoint (RoPE tables)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cfg = replace(PRESETS[args.preset], max_seq_len=args.max_seq_len)
    with tempfile.TemporaryDirectory(prefix="temper-load-") as tmp:
        with torch.device("meta"):
            model = Transformer(cfg).to(dtype)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        save_hf(model, cfg, tmp)
        del model
        runs: dict[str, list[dict]] = {"temper": [], "transformers": []}
        for r in range(args.repeats):
            for which in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                out = subprocess.run([sys.executable, "-c", _MEASURE, which, tmp, args.dtype],
                                     capture_output=True, text=True, check=True)
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    weights = runs["temper"][0]["weights"]
    print(f"{args.preset} ({weights / 1e9:.2f} GB of {args.dtype} weights, {size / 1e9:.2f} GB on disk), "
          f"median of {args.repeats}\n")
    print("| loader | peak memory / weights: loaded | after reading every weight | seconds: load "
          "| load + read every weight | that / temper's |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    for which, m in med.items():
        print(f"| {which} | {m['loaded']:.2f}x | {m['used']:.2f}x | {m['seconds']:.2f} | {m['read']:.2f} | "
              f"{m['read'] / med['temper']['read']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
