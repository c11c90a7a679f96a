"""`temper lm-eval ...`: lm-evaluation-harness's command line, with temper checkpoints as model "temper".

    temper lm-eval --model temper --model_args checkpoint=runs/x/final --tasks arc_easy --device cpu
    temper lm-eval --model temper --model_args checkpoint=runs/x/final,batch_tokens=32768,max_gen_toks=128 ...

Every other argument is lm-eval's own (`temper lm-eval --help`, `temper lm-eval ls tasks`).
lm-eval 0.4.13 finds models only in its own package (lm_eval/models/__init__.py's MODEL_MAPPING;
the registry reads no plugin entry points), so the bare `lm_eval` command cannot see "temper".

Steps:
  1. `register()`: "temper" becomes an lm-eval model name, built from model_args
     `checkpoint=DIR` (Hugging Face layout: config.json, the weights, tokenizer.json, read by
     `temper.infer.load`, as `temper generate` and `temper evaluate` read it) and
     optionally `device` (default: cuda when available), `dtype` (default: bfloat16 on a GPU,
     float32 on the CPU), `batch_tokens`, `max_gen_toks`, `seed`, `allow_pickle`;
  2. run lm-eval's own `cli_evaluate` with the remaining arguments.

From Python:

    import lm_eval
    from temper.recipes.lm_eval import register
    register()
    lm_eval.simple_evaluate(model="temper", model_args="checkpoint=runs/x/final", tasks=["arc_easy"])

A model in memory needs no checkpoint: `simple_evaluate(model=TemperLM(model, tokenizer), ...)` with
`temper.eval.lm_eval_adapter.TemperLM`, which does the scoring and generation. This recipe only
loads checkpoints (with `temper.infer.load`, the one loader). lm-eval is an optional
dependency: without it the command says how to install it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from temper.infer.load import Loaded, open_checkpoint
from temper.train.parallel import pick_dtype

log = logging.getLogger(__name__)

_registered: type | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto": cuda when available. A CUDA device on a machine without one falls back to the CPU
    with a warning, as lm-eval's `hf` does: lm-eval's command line passes "cuda:0" unless told."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s asked for, but CUDA is not available: using the CPU", device)
        return torch.device("cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None / "auto": bfloat16 on a GPU, float32 on the CPU; else a name (or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return pick_dtype("auto" if dtype is None else str(dtype).removeprefix("torch."), device)


def load_checkpoint(checkpoint: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
                    trust_remote_code: bool = False, revision: str | None = None) -> Loaded:
    """A Hugging Face layout directory such as runs/x/final through `temper.infer.load` (the loader
    `generate` and `evaluate` use): model (eval mode), tokenizer, stop ids. The tokenizer is read
    before the weights, so a checkpoint without one fails naming the directory and what it holds."""
    dev = resolve_device(device)
    ckpt = open_checkpoint(checkpoint, trust_remote_code=trust_remote_code, revision=revision)
    return ckpt.load(dev, resolve_dtype(dtype, dev), allow_pickle=allow_pickle)


def register() -> type:
    """Make "temper" an lm-eval model name (idempotent) and return its class.

    Raises ModuleNotFoundError with a one-line install hint when lm-eval is missing.
    """
    global _registered
    from temper.eval.lm_eval_adapter import TemperLM  # imports lm-eval, or says how to install it

    if _registered is not None:
        return _registered
    # lm-eval fills its registry with its own models only while the registry is empty
    # (`get_model`), so they are put in first: registering "temper" alone would hide "hf".
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry, register_model

    class TemperCheckpointLM(TemperLM):
        """lm-eval model "temper": a temper checkpoint directory (model_args checkpoint=DIR)."""

        def __init__(self, checkpoint: str = "", device: str | None = None, dtype: str | None = None,
                     allow_pickle: bool | str = False, trust_remote_code: bool | str = False,
                     revision: str | None = None, **options: Any) -> None:
            if not checkpoint:
                raise ValueError("model 'temper' needs model_args checkpoint=DIR (a Hugging Face layout directory "
                                 "such as runs/<name>/final)")
            pickle_ok = str(allow_pickle).lower() in ("1", "true", "yes")
            trust = str(trust_remote_code).lower() in ("1", "true", "yes")  # lm-eval's --trust_remote_code
            loaded = load_checkpoint(checkpoint, device, dtype, allow_pickle=pickle_ok, trust_remote_code=trust,
                                     revision=revision)
            super().__init__(loaded.model, loaded.tokenizer, stop_token_ids=loaded.stop_ids, **options)
            self.checkpoint = str(checkpoint)

    if "temper" in model_registry:  # registered by an earlier import of this module (e.g. a reload)
        _registered = model_registry.get("temper")
    else:
        _registered = register_model("temper")(TemperCheckpointLM)
    return _registered


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        register()
    except ModuleNotFoundError as e:
        print(f"temper lm-eval: {e}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's parser reads sys.argv (and inserts its "run" subcommand there).
    saved = sys.argv
    sys.argv = ["temper lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors, or an exit with a message
        if isinstance(e.code, str):
            print(f"temper lm-eval: {e.code}", file=sys.stderr)
            return 1
        return e.code or 0
    except (OSError, ValueError) as e:  # a wrong path, an unreadable checkpoint, a bad option: one line
        print(f"temper lm-eval: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
