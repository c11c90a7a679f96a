"""One way to load a checkpoint for inference: model, tokenizer, chat template and stop ids.

`temper generate`, `temper evaluate`, `temper lm-eval` (and the server) all call
`load_for_inference`, so they read the same files in the same order and stop generating on the
same tokens:
  1. the directory: Hugging Face layout (config.json, weights, tokenizer files); a run directory
     (runs/<name>) means its final/;
  2. config.json (the model's shape), before anything large is read;
  3. the tokenizer directory (tokenizer.json, tokenizer_config.json, chat templates), so a
     checkpoint without one fails naming what the directory holds, before the weights are read;
  4. the weights (`temper.model.hf.checkpoint.load_hf`: safetensors, pickled .bin only when allowed);
  5. stop ids: generation_config.json's eos_token_id (an id or a list: Llama 3 instruct stops on
     <|eot_id|> and <|end_of_text|>), config.json's, and the tokenizer's EOS, as transformers'
     `generate` and lm-eval's `hf` backend stop on them;
  6. with `quant` ("int8", "int4", "nf4"), the blocks' linear weights quantized in place
     (`temper.model.quant.quantize_for_inference`; whether the kind runs on the device is checked
     before the weights are read).

`open_checkpoint` does all but step 4, so a recipe can check the rest of its input against the
tokenizer before the weights are read; `Checkpoint.load` then reads them.
Every failure is a CheckpointError (an InputError: one line at the command's boundary) whose
message starts with "checkpoint DIR:". Files are named and symlinks followed by
`temper.files.checkpoint_file`, the rule every loader shares (a hub-cache snapshot reads as it is).
It does not pick a device or dtype ("auto" is the recipes' choice, `temper.train.parallel`), or generate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from temper.data.tokenizer import HFTokenizer, load_hf_tokenizer
from temper.errors import InputError
from temper.files import check_remote_code, checkpoint_file, read_json_object
from temper.model.config import ModelConfig
from temper.model.hf.checkpoint import load_hf, read_hf_config
from temper.model.hf.files import CheckpointError
from temper.model.transformer import Transformer


@dataclass
class Checkpoint:
    """What a checkpoint says about generating, read without its weights: shape, tokenizer, stop ids."""

    path: Path
    """The Hugging Face layout directory actually read."""
    config: ModelConfig
    tokenizer: HFTokenizer
    stop_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (generation_config.json, config.json, the tokenizer's EOS)."""

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's default chat template (None: it has none, so chats cannot be rendered)."""
        return self.tokenizer.chat_templates.get("default")

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], template: str | None = None,
                    **variables: Any) -> list[int]:
        """Token ids of a conversation rendered by the chat template (`template` names another of the
        tokenizer's), ending where the assistant's reply begins (add_generation_prompt), as transformers'
        `apply_chat_template(..., tokenize=True, **variables)` (`enable_thinking=False` for Qwen3)."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, template=template, **variables)

    def load(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             allow_pickle: bool = False, quant: str | None = None) -> Loaded:
        """Read the weights: the model (eval mode) on `device` in `dtype`, its linear weights quantized to
        `quant` ("int8", "int4", "nf4"; None or "": as stored)."""
        try:
            if quant:
                from temper.model.quant import check_quant, quantize_for_inference

                check_quant(quant, device, dtype)  # before reading gigabytes
            model, _ = load_hf(self.path, device=device, dtype=dtype, allow_pickle=allow_pickle)
            if quant:
                quantize_for_inference(model, quant)
                _unmap(model)
        except (OSError, ValueError) as e:
            raise _named(e, self.path) from None
        return Loaded(self.path, self.config, self.tokenizer, self.stop_ids, model=model)


@dataclass(kw_only=True)
class Loaded(Checkpoint):
    """A checkpoint ready to generate: its model (eval mode) too."""

    model: Transformer


def _unmap(model: torch.nn.Module) -> None:
    """Copy out the weights that are still copy-on-write views of the checkpoint file (`load_hf` maps
    weights stored in the dtype asked for), once the others are quantized: while one view lives the
    whole file stays mapped, and the pages quantizing read would count as resident memory for good."""
    copies: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if type(p) is torch.nn.Parameter and not p.untyped_storage().resizable():  # a map of the file
                if id(p) not in copies:  # a tied weight: one copy, still shared
                    copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                setattr(module, name, copies[id(p)])


def checkpoint_dir(path: str | Path) -> Path:
    """The Hugging Face layout directory of `path` (a run directory means its final/)."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        return p / "final"
    return p


def _eos_ids(root: Path, name: str) -> list[int]:
    """The eos_token_id of JSON file `name` (an id or a list of ids; absent: none)."""
    path = checkpoint_file(root, name)
    eos = read_json_object(path, CheckpointError).get("eos_token_id") if path.is_file() else None
    ids = [] if eos is None else [eos] if type(eos) is int else eos
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return ids


def _named(e: Exception, root: Path) -> CheckpointError:
    """The error as a CheckpointError, its message starting with "checkpoint DIR:" once."""
    message = str(e).removeprefix(f"{root}: ")
    if not message.startswith(f"checkpoint {root}:"):
        message = f"checkpoint {root}: {message}"
    return CheckpointError(message)


def open_checkpoint(checkpoint: str | Path, *, trust_remote_code: bool = False,
                    revision: str | None = None) -> Checkpoint:
    """Steps 1-3 and 5 of the module docstring: everything but the weights, so that a caller can check
    its other input (tasks, documents) against the tokenizer before reading gigabytes. No code of the
    checkpoint runs; a true `trust_remote_code` is refused without a pinned `revision`."""
    root = checkpoint_dir(checkpoint)
    try:
        check_remote_code(trust_remote_code, revision)
    except InputError as e:
        raise _named(e, root) from None
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root}: not a directory (expected a Hugging Face layout directory with "
                              f"config.json, model.safetensors and tokenizer.json, e.g. runs/<name>/final)")
    try:
        cfg = read_hf_config(root)
        tokenizer = load_hf_tokenizer(root)
        vocab = tokenizer.tokenizer.get_vocab_size()
        if vocab > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} tokens but the model only {cfg.vocab_size} embeddings")
        stop = {*_eos_ids(root, "generation_config.json"), *_eos_ids(root, "config.json")}
    except (OSError, ValueError) as e:
        raise _named(e, root) from None
    if tokenizer.eos_id is not None:
        stop.add(tokenizer.eos_id)
    bad = sorted(i for i in stop if not 0 <= i < cfg.vocab_size)
    if bad:
        raise CheckpointError(f"checkpoint {root}: stop ids {bad} are outside the vocabulary of {cfg.vocab_size}")
    return Checkpoint(path=root, config=cfg, tokenizer=tokenizer, stop_ids=sorted(stop))


def load_for_inference(
    checkpoint: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False, trust_remote_code: bool = False, revision: str | None = None,
    quant: str | None = None,
) -> Loaded:
    """Load `checkpoint` (see the module docstring): its model on `device` in `dtype` (its linear weights
    in `quant`: "int8", "int4", "nf4"), tokenizer, chat template and stop ids.
    `open_checkpoint(checkpoint, ...).load(device, dtype, allow_pickle, quant)`."""
    return open_checkpoint(checkpoint, trust_remote_code=trust_remote_code, revision=revision).load(
        device, dtype, allow_pickle, quant)
