"""lm-eval-harness model over a temper `Transformer`: every lm-eval task, scored by temper's fast paths.

`TemperLM(model, tokenizer)` is an lm-eval `TemplateLM` (EleutherAI's lm-evaluation-harness,
https://github.com/EleutherAI/lm-evaluation-harness) for a temper model in memory, so a model can
be evaluated mid-training without an export:

    import lm_eval
    from temper.eval.lm_eval_adapter import TemperLM
    lm_eval.simple_evaluate(model=TemperLM(model, tokenizer), tasks=["arc_easy"])

The model name "temper" (`--model temper --model_args checkpoint=DIR`) is registered by
`temper.recipes.lm_eval.register()`, which loads a checkpoint with `temper.infer.load` (as `temper
generate` and `temper evaluate` do): loading is the recipe's job, as for every other command. `temper lm-eval ...` is lm-eval's own command line with "temper" registered.

The numbers are lm-eval's `hf` backend's, computed by temper's code:
- `loglikelihood`: lm-eval's own tokenization (`TemplateLM.loglikelihood`: `_encode_pair`, the
  prefix token for an empty context), then `temper.eval.loglik.score`, which runs a context shared
  by several continuations once and the output head only where a token is scored;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (`get_rolling_token_windows` +
  `make_disjoint_window`, context_len=1) of the text encoded as `hf` does (with the tokenizer's
  BOS, after a prefix BOS: lm-eval's choice, kept for identical numbers), scored by `score`;
- `generate_until`: temper's KV-cache engine; the context keeps its last max_length - max_gen_toks
  tokens (lm-eval's left truncation), a row stops at the end-of-text token or once its decoded
  text holds a stop string, and the text is cut at the first stop string (lm-eval's helpers).
Greedy unless `do_sample` (then `temperature`, `top_k`, `top_p`, seeded by `seed`).

It runs in one process (no data-parallel ranks) and has no chat templates.
lm-eval is an optional dependency: importing this module without it raises one line saying how to
install it; `import temper.eval` never imports lm-eval.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from temper.data.tokenizer import HFTokenizer
from temper.eval.loglik import Request, score
from temper.eval.run import encode_text, generate_all, prefix_id

MISSING_LM_EVAL = "lm-eval is not installed: pip install 'temper[eval]'"

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as e:  # lm-eval itself missing: one line; anything else it lacks: the real error
    if (e.name or "").split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError(MISSING_LM_EVAL, name="lm_eval") from None
except ImportError as e:  # an lm-eval without the generation helpers (they came after 0.4.5)
    import lm_eval

    raise ImportError(f"lm-eval {getattr(lm_eval, '__version__', '?')} is too old for temper's adapter ({e}): "
                      f"pip install 'lm-eval>=0.4.13'") from None

log = logging.getLogger(__name__)

# Generation options a task may set, besides lm-eval's normalised until / max_gen_toks / do_sample /
# temperature. Anything else (num_beams > 1, ...) would change the text, so it is refused by name.
SAMPLING_KEYS = ("top_k", "top_p", "repetition_penalty")


class TemperLM(TemplateLM):
    """lm-eval model over a temper `Transformer` (any device and dtype) and its `HFTokenizer`."""

    def __init__(
        self, model: nn.Module, tokenizer: HFTokenizer, *, batch_tokens: int | str = 16384,
        max_gen_toks: int | str = 256, batch_size: int | str | None = 16, seed: int | str = 1234,
        max_batch_size: int | str | None = None, stop_token_ids: Sequence[int] = (),
    ) -> None:
        """
        batch_tokens: most tokens (rows x longest row) in one scoring forward pass (`loglik.score`).
        max_gen_toks: tokens generated when a task does not say (lm-eval's `hf` default: 256).
        batch_size: prompts generated together; lm-eval's command line passes its --batch_size
            here ("auto": 16). Scoring batches by `batch_tokens` instead.
        seed: seed of sampled generation (the i-th prompt of a request group uses seed + i).
        max_batch_size: accepted because lm-eval passes it; unused.
        stop_token_ids: ids that also end generation besides the end-of-text token (a checkpoint's
            generation_config eos ids, which `hf` stops on too through `generate`).
        Numbers may arrive as strings (lm-eval's "key=value" model_args).
        """
        super().__init__()
        if not hasattr(model, "cfg") or not hasattr(model.cfg, "max_seq_len"):
            raise TypeError(f"TemperLM needs a temper Transformer (with .cfg), got {type(model).__name__}")
        if tokenizer.bos_id is None and tokenizer.eos_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token: lm-eval needs one as the prefix "
                             "of an empty context and as the end of generated text")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_tokens = _positive_int(batch_tokens, "batch_tokens")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.batch_size = 16 if batch_size is None or str(batch_size).startswith("auto") else _positive_int(
            batch_size, "batch_size")
        self.seed = int(seed)
        self.stop_token_ids = sorted({int(i) for i in stop_token_ids})
        self._device = next(model.parameters()).device

    # ---- what lm-eval asks of a model --------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """End of text: the tokenizer's EOS (BOS when it has none)."""
        eos = self.tokenizer.eos_id
        return eos if eos is not None else self.tokenizer.bos_id  # type: ignore[return-value]

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty context: BOS, else EOS (lm-eval's `hf` rule)."""
        return prefix_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return int(self.model.cfg.max_seq_len)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids as lm-eval's `hf` makes them: the tokenizer's special tokens unless the text
        already starts with the prefix token's text (or `add_special_tokens` says otherwise)."""
        if add_special_tokens is None:
            ids = encode_text(self.tokenizer, string)
        else:
            ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: int | Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens,
                                     skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results["config"]."""
        p = next(self.model.parameters())
        return {"model_num_parameters": sum(q.numel() for q in self.model.parameters()),
                "model_dtype": str(p.dtype), "model_max_length": self.max_length}

    # ---- scoring -----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) of each (key, context ids, continuation ids), through `loglik.score`."""
        scores = self._score([Request(tuple(ctx), tuple(cont)) for _, ctx, cont in requests],
                             disable_tqdm, "loglikelihood")
        out = [(s.logprob, s.greedy) for s in scores]
        for (key, _, _), answer in zip(requests, out, strict=True):
            if key is not None:  # lm-eval's request cache (--use_cache)
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (perplexity tasks), over lm-eval's disjoint windows."""
        windows: list[Request] = []
        owner: list[int] = []
        for n, (text,) in enumerate(req.args for req in requests):
            # tok_encode with the tokenizer's own BOS, after the prefix token: what `hf` scores.
            pairs = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append(Request(tuple(context), tuple(continuation)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, s in zip(owner, self._score(windows, disable_tqdm, "loglikelihood_rolling"), strict=True):
            totals[n] += s.logprob  # windows in order, as `hf` adds them
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def _score(self, requests: list[Request], disable_tqdm: bool, what: str) -> list:
        if not requests:
            return []
        with self._eval_mode(), tqdm(total=len(requests), disable=disable_tqdm, desc=f"temper {what}") as bar:
            scores = score(self.model, requests, batch_tokens=self.batch_tokens, progress=bar.update)
        cut = sum(s.truncated > 0 for s in scores)
        if cut:
            log.warning("%d of %d %s requests were longer than the model's context (%d tokens) and lost tokens "
                        "from the left, as lm-eval truncates them", cut, len(scores), what, self.max_length)
        return scores

    # ---- generation --------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Completion of each (context, gen_kwargs): greedy or sampled, cut at the first stop string."""
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same options generate together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        with self._eval_mode(), tqdm(total=len(requests), disable=disable_tqdm, desc="temper generate_until") as bar:
            for members in groups.values():
                gen_kwargs = requests[members[0]].args[1]
                if not isinstance(gen_kwargs, dict):
                    raise TypeError(f"generate_until: expected a dict of generation options, got {gen_kwargs!r}")
                opts = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
                until = handle_stop_sequences(opts.pop("until", None), eos=eos_text)
                stops = [s for s in until if s]  # lm-eval ignores an empty stop string
                max_new = int(opts.pop("max_gen_toks"))
                room = self.max_length - max_new
                if room < 1:
                    raise ValueError(f"generate_until: max_gen_toks={max_new} leaves no room for a prompt in the "
                                     f"model's context of {self.max_length} tokens")
                sampling = self._sampling(opts)
                # lm-eval's left truncation: the context keeps its last max_length - max_gen_toks tokens.
                prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in members]
                # A row ends once its decoded text holds a stop string (the engine works on ids only).
                stopped = (lambda _, ids, stops=stops: any(s in self.tok_decode(ids) for s in stops)) if stops else None
                stop_ids = sorted({self.eot_token_id, *self.stop_token_ids})
                completions = generate_all(self.model, prompts, max_new_tokens=max_new, batch_size=self.batch_size,
                                           seed=self.seed, stop_token_ids=stop_ids, stopped=stopped,
                                           progress=bar.update, **sampling)
                for i, ids in zip(members, completions, strict=True):
                    # Decoded alone, as `hf` decodes the new tokens, then cut at the first stop string.
                    out[i] = postprocess_generated_text(self.tok_decode(ids), stops, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    @staticmethod
    def _sampling(opts: dict[str, Any]) -> dict[str, Any]:
        """Engine arguments from lm-eval's normalised options; options that would change the text and
        that temper cannot honour are refused by name."""
        do_sample = bool(opts.pop("do_sample", False))
        temperature = float(opts.pop("temperature", 1.0 if do_sample else 0.0))
        if int(opts.pop("num_beams", 1)) != 1:
            raise ValueError("generate_until: beam search (num_beams > 1) is not supported by temper's engine")
        out: dict[str, Any] = {"temperature": temperature if do_sample else 0.0}
        for key in SAMPLING_KEYS:
            if key in opts:
                value = opts.pop(key)
                out[key] = None if value is None else (int(value) if key == "top_k" else float(value))
        if opts:
            raise ValueError(f"generate_until: unsupported generation options {sorted(opts)} (supported: until, "
                             f"max_gen_toks, do_sample, temperature, num_beams=1, {', '.join(SAMPLING_KEYS)})")
        return out

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) while lm-eval calls us; a model lent mid-training gets its mode back."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


def _positive_int(value: int | str, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n
