"""`temper generate`: complete prompts or chats with a checkpoint in Hugging Face layout, streaming to the terminal.

Steps:
  1. parse GenerateConfig from flags / YAML;
  2. load the model, tokenizer, chat template and stop ids from --checkpoint (`temper.infer.load`,
     the loader `evaluate` and `lm-eval` use);
  3. encode the prompts, or render the chat (--chat messages, or --system with each --prompt as the
     user's turn) through the tokenizer's chat template, ending where the assistant's reply begins;
  4. generate with the engine (`temper.infer.engine`): one prompt streams text as it comes, several
     run as a batch; past the model's context each row goes on from its most recent tokens
     (nanoGPT's crop), so max_new_tokens is not bounded by max_seq_len, and a longer prompt keeps
     its last max_seq_len;
  5. cut each completion at the first --stop string (held back while it could still be forming).

It does not train, serve or evaluate; sampling itself lives in `temper.infer.engine`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from temper.config import parse
from temper.data.chat import ChatTemplateError
from temper.data.tokenizer import UnknownCounter, check_unknown
from temper.infer.engine import generate, stream
from temper.infer.load import Loaded, load_for_inference
from temper.infer.text import completion_text, cut_at_stop, safe_to_print
from temper.train.parallel import pick_device, pick_dtype


@dataclass
class GenerateConfig:
    """Options of `temper generate`."""

    checkpoint: str = ""
    """Directory in Hugging Face layout: config.json, model.safetensors, tokenizer.json (e.g. runs/x/final)."""
    prompt: list[str] = field(default_factory=list)
    """Prompt text; repeat the flag for a batch of prompts."""
    chat: list[dict[str, Any]] = field(default_factory=list)
    """A conversation to answer, as JSON messages rendered by the chat template: '[{"role": "user", "content": "hi"}]'
    (repeat the flag to add messages)."""
    system: str | None = None
    """With --prompt: each prompt becomes a chat, this system turn (none when '') then the prompt as the user's."""
    chat_template: str = ""
    """Which of the tokenizer's chat templates renders chats ('': its default)."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt; past the model's context it conditions on the most recent tokens."""
    temperature: float = 0.8
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens (None: off)."""
    top_p: float | None = None
    """Sample only within the smallest set of tokens whose probability reaches p (None: off)."""
    repetition_penalty: float = 1.0
    """Penalise tokens already present (CTRL); 1.0 is off, 1.1-1.3 is typical."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a completion ends before the first one; repeat the flag for several."""
    seed: int | None = None
    """Seed for sampling; the same seed gives the same text (prompt i of a batch uses seed + i)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu", "cuda", "cuda:1", ..."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"."""
    compile: bool = False
    """Compile the decode step (torch.compile; CUDA graphs on a GPU): worth it for long generations."""
    allow_pickle: bool = False
    """Also read pickled pytorch_model*.bin weights (with torch.load(weights_only=True), so no code runs)."""

    def __post_init__(self) -> None:
        pick_dtype(self.dtype, torch.device("cpu"))  # an unknown name fails here, naming the choices
        # Checked here, before the model loads: the engine's own checks would come after, as a traceback.
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        if any(not p for p in self.prompt):
            raise ValueError("--prompt is empty: give the text to continue")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.chat and (self.prompt or self.system is not None):
            raise ValueError("give either --chat (a whole conversation) or --prompt (with --system for chats), not both")
        if any(not isinstance(m.get("role"), str) for m in self.chat):
            raise ValueError(f"every --chat message needs a 'role' (and 'content'), got {self.chat}")


def chats(cfg: GenerateConfig) -> list[list[dict[str, Any]]] | None:
    """The conversations to answer (None: plain prompts)."""
    if cfg.chat:
        return [list(cfg.chat)]
    if cfg.system is None:
        return None
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return [[*system, {"role": "user", "content": p}] for p in cfg.prompt]


def encode(loaded: Loaded, cfg: GenerateConfig) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt or chat, and the text printed before its completion (a chat prints none)."""
    conversations = chats(cfg)
    if conversations is None:
        ids = [loaded.tokenizer.encode(p) for p in cfg.prompt]
        counter = UnknownCounter(loaded.tokenizer.tokenizer, added_are_tokens=not loaded.tokenizer.split_special_tokens)
        for p, x in zip(cfg.prompt, ids, strict=True):  # a dropped character is an error, an unknown one a note
            if n := check_unknown(counter, p, x, f"--prompt {p!r}"):
                print(f"temper generate: note: --prompt {p!r}: {counter.describe(p, n)}, encoded as "
                      f"{counter.unk_token}", file=sys.stderr)
        return ids, list(cfg.prompt)
    template = cfg.chat_template or None
    return [loaded.encode_chat(c, template) for c in conversations], [""] * len(conversations)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(GenerateConfig, argv, prog="generate")
    if not cfg.checkpoint or not (cfg.prompt or cfg.chat):
        print("temper generate: --checkpoint and at least one --prompt (or a --chat) are required", file=sys.stderr)
        return 2
    device = pick_device(cfg.device)
    try:
        loaded = load_for_inference(cfg.checkpoint, device=device, dtype=pick_dtype(cfg.dtype, device),
                                    allow_pickle=cfg.allow_pickle)
        prompts, shown = encode(loaded, cfg)
    except (OSError, ValueError, ChatTemplateError) as e:  # a wrong path, an unreadable checkpoint, no template
        print(f"temper generate: {e}", file=sys.stderr)
        return 2
    model, tokenizer = loaded.model, loaded.tokenizer
    for i, p in enumerate(prompts):
        if not p:
            print(f"temper generate: prompt {i} encodes to no tokens: give text the tokenizer knows", file=sys.stderr)
            return 2

    def decode(row: int, ids: list[int]) -> str:
        return completion_text(lambda x: tokenizer.decode(x, skip_special_tokens=True), prompts[row], ids)

    context = model.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) > context:  # the engine keeps the last `context` tokens, as nanoGPT's crop does
            print(f"temper generate: prompt {i} has {len(p)} tokens; only its last {context} (the context) are used",
                  file=sys.stderr)
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
              repetition_penalty=cfg.repetition_penalty, stop_token_ids=loaded.stop_ids, seed=cfg.seed,
              compile=cfg.compile)
    # Stop strings are text, so the row's tokens are decoded each step to find them.
    should_stop = (lambda i, ids: cut_at_stop(decode(i, ids), cfg.stop)[1]) if cfg.stop else None
    out = sys.stdout

    if len(prompts) == 1:
        out.write(shown[0])
        out.flush()
        ids: list[int] = []
        printed = 0
        for step in stream(model, prompts, should_stop=should_stop, **kw):
            if step[0] is not None:
                ids.append(step[0])
                text, _ = cut_at_stop(decode(0, ids), cfg.stop)
                end = safe_to_print(text, cfg.stop)
                if end > printed:
                    out.write(text[printed:end])
                    out.flush()
                    printed = end
        text, _ = cut_at_stop(decode(0, ids), cfg.stop)
        out.write(text[printed:] + "\n")
        out.flush()
        return 0

    completions = generate(model, prompts, should_stop=should_stop, **kw)
    for i, (prompt, ids) in enumerate(zip(shown, completions, strict=True)):
        text, _ = cut_at_stop(decode(i, ids), cfg.stop)
        out.write(f"--- [{i}]\n{prompt}{text}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
