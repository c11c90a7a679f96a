"""`temper <command> [--config FILE.yaml] [--section.key=value ...]`: a flat table of recipes."""

from __future__ import annotations

import sys

from temper.recipes import (
    best_of_n,
    distill,
    download,
    dpo,
    estimate,
    evaluate,
    generate,
    grpo,
    lm_eval,
    ppo,
    prepare,
    pretrain,
    rag,
    reward,
    scaling,
    serve,
    sft,
    sweep,
)

COMMANDS = {
    "prepare": prepare.main,
    "pretrain": pretrain.main,
    "sft": sft.main,
    "reward": reward.main,
    "dpo": dpo.main,
    "best-of-n": best_of_n.main,
    "grpo": grpo.main,
    "ppo": ppo.main,
    "distill": distill.main,
    "generate": generate.main,
    "serve": serve.main,
    "estimate": estimate.main,
    "scaling": scaling.main,
    "download": download.main,
    "lm-eval": lm_eval.main,
    "evaluate": evaluate.main,
    "sweep": sweep.main,
    "rag": rag.main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"temper: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: temper <command> [--help] [--config FILE.yaml] [--section.key=value ...]\n\ncommands:")
        for name, fn in COMMANDS.items():
            doc = (sys.modules[fn.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"  {name:<10} {doc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from temper.config import ConfigError
    from temper.errors import InputError

    # The one error boundary: bad input is one line and exit code 2; anything else is a bug and keeps
    # its traceback.
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
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
