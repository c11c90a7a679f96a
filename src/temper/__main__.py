"""`temper <command> [--config FILE.yaml] [--section.key=value ...]`: a flat table of recipes."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

# Each command's recipe module in `temper.recipes`, imported when its command runs: importing all of them costs
# ~4 s of CPU (transformers, FSDP, the server's stack), which every torchrun rank would pay again for nothing.
COMMANDS = {
    "prepare": "prepare",
    "pretrain": "pretrain",
    "sft": "sft",
    "reward": "reward",
    "dpo": "dpo",
    "best-of-n": "best_of_n",
    "grpo": "grpo",
    "ppo": "ppo",
    "distill": "distill",
    "generate": "generate",
    "serve": "serve",
    "estimate": "estimate",
    "scaling": "scaling",
    "download": "download",
    "lm-eval": "lm_eval",
    "evaluate": "evaluate",
    "sweep": "sweep",
    "rag": "rag",
}


def recipe(command: str) -> ModuleType:
    """The recipe module of `command` (a key of COMMANDS), with its `main(argv) -> int`."""
    return importlib.import_module(f"temper.recipes.{COMMANDS[command]}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"temper: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: temper <command> [--help] [--config FILE.yaml] [--section.key=value ...]\n\ncommands:")
        for name in COMMANDS:
            doc = (recipe(name).__doc__ or "").strip().splitlines()[0]
            print(f"  {name:<10} {doc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from temper.config import ConfigError
    from temper.errors import InputError

    # The one error boundary: bad input is one line and exit code 2; anything else is a bug and keeps
    # its traceback.
    try:
        return recipe(argv[0]).main(argv[1:]) or 0
    except ConfigError as e:
        print(f"temper {argv[0]}: config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"temper {argv[0]}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which checkpoints and exits 143)
        print(f"temper {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
