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
     its last max_seq_len; with --draft or --prompt_lookup, speculative decoding
     (`temper.infer.speculative`: the same greedy text, the same sampling distribution, fewer target
     passes), one prompt after another;
  5. cut each completion at the first --stop string (held back while it could still be forming).
With --json_schema, --regex, --choice or --grammar every draw is masked to the tokens that keep the text inside that
grammar (`temper.infer.grammar`), so each completion parses; vLLM's structured outputs, offline.

It does not train, serve or evaluate; sampling itself lives in `temper.infer.engine`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import torch

from temper.config import ConfigError, parse
from temper.data.chat import ChatTemplateError, check_template_variables
from temper.data.tokenizer import UnknownCounter, check_unknown
from temper.infer.engine import check_compiled_decode, generate, stream
from temper.infer.grammar import (
    Grammar,
    GrammarError,
    choice,
    compile_grammar,
    json_schema,
    lark,
    regex,
    vocabulary,
)
from temper.infer.load import Checkpoint, Loaded, load_for_inference, open_checkpoint
from temper.infer.speculative import SpeculativeStats, speculative_stream
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
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra variables for the chat template, as apply_chat_template takes them: '{enable_thinking: false}' (Qwen3)."""
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
    draft: str = ""
    """Speculative decoding with this draft checkpoint (the same tokenizer; e.g. a `temper distill` student):
    it drafts --num_draft_tokens tokens, the model verifies them in one pass. The output is unchanged."""
    prompt_lookup: int = 0
    """Speculative decoding with prompt lookup: drafts copy what followed an earlier occurrence of the last
    N tokens (N down to 1) in the prompt and output, no draft model; 0: off. Pays off on repetitive text."""
    num_draft_tokens: int = 4
    """Tokens drafted per verification pass with --draft or --prompt_lookup."""
    quant: Literal["", "int8", "int4", "nf4"] = ""
    """Quantize the blocks' linear weights after loading (torchao, weight-only): "int8", "int4" (4-bit, groups
    of 64; on CUDA bfloat16 only) or "nf4" (QLoRA's NormalFloat); embeddings, norms and head stay in --dtype."""
    json_schema: str = ""
    """Every completion is JSON of this schema: the schema's JSON, or a file holding it ('': free text)."""
    regex: str = ""
    """Every completion matches this regular expression whole ('': free text)."""
    choice: list[str] = field(default_factory=list)
    """Every completion is one of these strings (repeat the flag)."""
    grammar: str = ""
    """Every completion is a sentence of this Lark or GBNF grammar: its text, or a file holding it ('': free text)."""

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
        check_template_variables(self.chat_template_kwargs)
        if self.chat_template_kwargs and not self.chat and self.system is None:
            raise ValueError("--chat_template_kwargs apply to chats: give --chat, or --prompt with --system ('' for "
                             "none)")
        self._check_speculative()
        formats = [k for k in ("json_schema", "regex", "choice", "grammar") if getattr(self, k)]
        if len(formats) > 1:
            raise ValueError(f"give one of --json_schema, --regex, --choice and --grammar, got {formats}")
        if formats and (self.draft or self.prompt_lookup):
            raise ValueError(f"--{formats[0]} constrains each draw: it does not combine with speculative decoding "
                             "(--draft, --prompt_lookup)")

    def _check_speculative(self) -> None:
        if self.prompt_lookup < 0 or self.num_draft_tokens < 1:
            raise ValueError(f"prompt_lookup must be >= 0 (0: off) and num_draft_tokens >= 1, got "
                             f"{self.prompt_lookup} and {self.num_draft_tokens}")
        if not (self.draft or self.prompt_lookup):
            return
        if self.draft and self.prompt_lookup:
            raise ValueError("give either --draft (a draft model) or --prompt_lookup (n-gram drafts), not both")
        if self.repetition_penalty != 1.0 or self.compile:
            raise ValueError("speculative decoding (--draft, --prompt_lookup) takes neither --repetition_penalty "
                             "nor --compile")


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
    return ([loaded.encode_chat(c, template, **cfg.chat_template_kwargs) for c in conversations],
            [""] * len(conversations))


def open_draft(checkpoint: str, draft_path: str) -> Checkpoint:
    """The draft checkpoint without its weights, once it is known to share the model's vocabulary: drafts
    are verified token id by token id (`generate` and `serve`)."""
    target, draft = open_checkpoint(checkpoint), open_checkpoint(draft_path)
    theirs, ours = draft.tokenizer.tokenizer.get_vocab(), target.tokenizer.tokenizer.get_vocab()
    if theirs != ours:
        differ = sum(theirs.get(t) != i for t, i in ours.items()) + len(theirs.keys() - ours.keys())
        raise ConfigError(f"draft {draft.path}: its tokenizer is not the model's ({target.path}): {differ} of "
                          f"{len(ours)} tokens differ or are missing; drafts are verified token id by token id")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"draft {draft.path}: vocab_size {draft.config.vocab_size} differs from the model's "
                          f"{target.config.vocab_size}: their next-token distributions must have one size")
    return draft


def write_streamed(out: TextIO, tokens: Iterable[int], text_of: Callable[[list[int]], str], stop: list[str]) -> None:
    """Print a completion as its tokens come, holding back text that may still become a stop string; it
    ends at the first stop string."""
    ids: list[int] = []
    printed = 0
    for t in tokens:
        ids.append(t)
        text, stopped = cut_at_stop(text_of(ids), stop)
        end = safe_to_print(text, stop)
        if end > printed:
            out.write(text[printed:end])
            out.flush()
            printed = end
        if stopped:
            break
    text, _ = cut_at_stop(text_of(ids), stop)
    out.write(text[printed:] + "\n")
    out.flush()


def speculative(cfg: GenerateConfig, model: torch.nn.Module, draft: torch.nn.Module | None, prompts: list[list[int]],
                shown: list[str], decode: Callable[[int, list[int]], str], stop_ids: list[int]) -> int:
    """Speculative decoding of each prompt in turn (it runs one at a time), streamed, then the acceptance
    rate on stderr. Prompt i samples with seed + i."""
    stats = SpeculativeStats()
    for i, prompt in enumerate(prompts):
        sys.stdout.write(shown[i] if len(prompts) == 1 else f"--- [{i}]\n{shown[i]}")
        tokens = speculative_stream(
            model, prompt, draft=draft, prompt_lookup=cfg.prompt_lookup or None, k=cfg.num_draft_tokens,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            seed=None if cfg.seed is None else cfg.seed + i, stop_token_ids=stop_ids, stats=stats)
        write_streamed(sys.stdout, tokens, lambda ids, i=i: decode(i, ids), cfg.stop)
    print(f"temper generate: speculative decoding: {stats.describe()}", file=sys.stderr)
    return 0


def output_grammar(cfg: GenerateConfig, loaded: Loaded) -> Grammar | None:
    """The grammar --json_schema, --regex, --choice or --grammar asks for, compiled (`temper.infer.grammar`); a value
    that is a file's path is read from it. ValueError (GrammarError) names the flag and what is wrong."""
    def text(value: str) -> tuple[str, str]:
        """The value, or the file it names, and where it came from (for errors)."""
        path = Path(value)
        if len(value) < 4096 and path.is_file():
            return path.read_text(encoding="utf-8"), f" (file {path})"
        return value, ""

    if cfg.json_schema:
        schema, where = text(cfg.json_schema)
        try:
            source, flag = json_schema(json.loads(schema)), f"json_schema{where}"
        except json.JSONDecodeError as e:
            raise ValueError(f"--json_schema{where} is not JSON: {e}") from None
    elif cfg.regex:
        source, flag = regex(cfg.regex), "regex"
    elif cfg.choice:
        source, flag = choice(cfg.choice), "choice"
    elif cfg.grammar:
        rules, where = text(cfg.grammar)
        source, flag = lark(rules), f"grammar{where}"
    else:
        return None
    try:
        return compile_grammar(vocabulary(loaded.tokenizer.tokenizer, loaded.config.vocab_size, loaded.stop_ids), source)
    except GrammarError as e:
        raise GrammarError(f"--{flag}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    cfg = parse(GenerateConfig, argv, prog="generate")
    if not cfg.checkpoint or not (cfg.prompt or cfg.chat):
        print("temper generate: --checkpoint and at least one --prompt (or a --chat) are required", file=sys.stderr)
        return 2
    device = pick_device(cfg.device)
    try:
        draft = open_draft(cfg.checkpoint, cfg.draft) if cfg.draft else None  # checked before any weights are read
        loaded = load_for_inference(cfg.checkpoint, device=device, dtype=pick_dtype(cfg.dtype, device),
                                    allow_pickle=cfg.allow_pickle, quant=cfg.quant)
        prompts, shown = encode(loaded, cfg)
        constraint = output_grammar(cfg, loaded)
        draft_model = draft.load(device, pick_dtype(cfg.dtype, device), cfg.allow_pickle).model if draft else None
        if cfg.compile:
            check_compiled_decode(loaded.model)
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
              compile=cfg.compile, grammar=constraint)
    # Stop strings are text, so the row's tokens are decoded each step to find them.
    should_stop = (lambda i, ids: cut_at_stop(decode(i, ids), cfg.stop)[1]) if cfg.stop else None
    out = sys.stdout
    if draft_model is not None or cfg.prompt_lookup:
        return speculative(cfg, model, draft_model, prompts, shown, decode, loaded.stop_ids)

    if len(prompts) == 1:
        out.write(shown[0])
        out.flush()
        steps = stream(model, prompts, should_stop=should_stop, **kw)
        write_streamed(out, (s[0] for s in steps if s[0] is not None), lambda ids: decode(0, ids), cfg.stop)
        return 0

    completions = generate(model, prompts, should_stop=should_stop, **kw)
    for i, (prompt, ids) in enumerate(zip(shown, completions, strict=True)):
        text, _ = cut_at_stop(decode(i, ids), cfg.stop)
        out.write(f"--- [{i}]\n{prompt}{text}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
