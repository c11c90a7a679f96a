"""Text <-> token ids: train, load, save and run tokenizers, all of them HF `tokenizers` objects.

Two kinds can be trained here: a byte-level BPE (GPT-2's scheme: every byte is in the base
alphabet, so any text encodes without unknown tokens) and a character-level tokenizer (a BPE
model with no merges whose vocabulary is the corpus' characters, sorted, as nanoGPT's
shakespeare_char builds it, then the special tokens, then by default an unknown token `UNK`).
Any Hugging Face `tokenizer.json` can be loaded instead. The tokenizer is saved as
`tokenizer.json`, the file every HF library reads.

A character outside a tokenizer's vocabulary is never lost silently: `UnknownCounter` counts the
characters that became the unknown token, or that a tokenizer without one (a BPE without
`unk_token`, such as a character tokenizer of `unknown="error"`) would drop, so that callers
count them or stop.

A whole Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json,
chat_template.jinja, additional_chat_templates/) loads into an `HFTokenizer`: the pipeline plus
its special tokens and chat templates, encoding exactly as `transformers.AutoTokenizer` does
(see `HFTokenizer` for the one case where temper follows tokenizer.json and transformers 5 does
not), and writes back so that AutoTokenizer reloads it identically.

It does not read files of documents (sources.py), write shards (shards.py), render chat
templates (chat.py) or build training examples from chats (sft.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from temper.data.chat import Message, render_chat_template, select_chat_template
from temper.errors import InputError
from temper.files import atomic_write_json, atomic_write_text, safe_name

EOT = "<|endoftext|>"
UNK = "<|unk|>"
KINDS = ("bpe", "char")
# What happens to a character the tokenizer has no token for: it becomes UNK and is counted, or it
# is an error naming where it is.
UNKNOWN_MODES = ("unk", "error")
# Far above any real vocabulary (the largest, Gemma's, is 262,144) and small enough that the BPE
# trainer's tables fit in memory: 10**9 makes it allocate about 70 GB and abort the process, and
# tokenizers 0.23 already touches 27 GB at 2**22 (but 45 MB at 2**21).
MAX_VOCAB_SIZE = 1 << 21
# End-of-text tokens of common families, tried in order when none is named: GPT-2 and Qwen,
# Llama 3, Llama 2 and Mistral, Gemma.
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")


class TokenizerError(InputError):
    """A tokenizer file that cannot be used, or a token it lacks."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """No tokenizer.json where one is expected."""


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = (EOT,),
    show_progress: bool = False,
    unknown: str = "unk",
) -> Tokenizer:
    """Train a "bpe" (byte-level, `vocab_size` including special tokens) or "char" tokenizer.

    For "char", `vocab_size` is ignored: the vocabulary is every character of `texts` (sorted,
    ids 0..n-1, as nanoGPT), then the special tokens, then with `unknown="unk"` the token UNK,
    which every character not seen in training encodes to. With `unknown="error"` there is no
    UNK (nanoGPT's exact vocabulary) and such a character is dropped by encode: `UnknownCounter`
    finds it, so that the caller can stop. A byte-level BPE has no unknown characters.
    """
    if unknown not in UNKNOWN_MODES:
        raise TokenizerError(f"unknown must be one of {UNKNOWN_MODES}, got {unknown!r}")
    if kind == "bpe":
        return _train_bpe(texts, vocab_size, list(special_tokens), show_progress)
    if kind == "char":
        return _train_char(texts, list(special_tokens), unk=UNK if unknown == "unk" else None)
    raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")


def _train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str],
               show_progress: bool) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size > MAX_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size} is above the maximum of {MAX_VOCAB_SIZE:,}")
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the 256 byte symbols plus "
                         f"{len(special_tokens)} special tokens")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps encode(text) -> decode exact for every text (GPT-2 style).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,  # all 256 bytes, even those the sample lacks
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _train_char(texts: Iterable[str], special_tokens: list[str], unk: str | None) -> Tokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise TokenizerError("cannot build a character tokenizer from no text")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    # The special tokens and UNK join the model's vocabulary so that their ids follow the
    # characters' in this order (setdefault: a special token that is also a character keeps its id).
    for token in [*special_tokens, *([unk] if unk else [])]:
        vocab.setdefault(token, len(vocab))
    # No pre-tokenizer and no merges: the BPE model then maps each character to its id, and a
    # character outside the vocabulary to UNK (one each: fuse_unk is off, so they can be counted).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.decoder = decoders.Fuse()  # join tokens with "" (the default joins with spaces)
    tok.add_special_tokens(special_tokens)  # matched in text before the model (UNK is not: it is never typed)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json`, or the one inside directory `path`."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerNotFound(f"no tokenizer at {path}: expected a Hugging Face tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from e


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tok` as a tokenizer.json, atomically."""
    atomic_write_text(path, tok.to_str(pretty=True))


def eot_id(tok: Tokenizer, token: str | None = None) -> int:
    """Id of the end-of-text token: `token` if named, else the first of EOT_CANDIDATES present."""
    candidates = (token,) if token else EOT_CANDIDATES
    for name in candidates:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise TokenizerError(
        f"tokenizer has no end-of-text token (looked for {', '.join(candidates)}); "
        f"add one to its special tokens or name it"
    )


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can produce, special tokens included."""
    return tok.get_vocab_size(with_added_tokens=True)


class UnknownCounter:
    """Counts the characters of a text that a tokenizer has no token for.

    `tokenizers` maps them to the model's unknown token when it has one, and otherwise a BPE
    without byte fallback or a byte-level pre-tokenizer (an old temper character tokenizer, or
    one of `unknown="error"`) drops them without a trace. The first are counted in the ids; the
    second are found as the characters missing from the tokenizer's single-character tokens, which
    is exact for a character tokenizer (its base alphabet). Other tokenizers (byte-level BPE,
    byte fallback) represent every character: `active` is False and nothing is counted.
    `added_are_tokens`: the encoder matches added-token text (`<|endoftext|>`) as the token, so
    its characters need not be in the alphabet; PlainTextEncoder encodes it as plain text.
    """

    def __init__(self, tok: Tokenizer, added_are_tokens: bool = True) -> None:
        spec = json.loads(tok.to_str())
        model = spec.get("model") or {}
        unk = model.get("unk_token")
        self.unk_id = tok.token_to_id(unk) if unk else None
        self.unk_token = unk if self.unk_id is not None else None
        byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
        self.alphabet: frozenset[str] | None = None
        if model.get("type") == "BPE" and not byte_level and not model.get("byte_fallback"):
            self.alphabet = frozenset(t for t in model.get("vocab", {}) if len(t) == 1)
        self.drops = self.alphabet is not None and self.unk_id is None
        self.active = self.unk_id is not None or self.drops
        self.normalizer = tok.normalizer
        self.added = [t.content for t in tok.get_added_tokens_decoder().values()] if added_are_tokens else []

    def missing(self, text: str) -> list[str]:
        """The distinct characters of `text` outside the alphabet, sorted (empty when it is not known)."""
        if self.alphabet is None:
            return []
        for token in self.added:
            text = text.replace(token, "")
        if self.normalizer is not None:
            text = self.normalizer.normalize_str(text)
        return sorted(set(text) - self.alphabet)

    def count(self, text: str, ids: Sequence[int] | np.ndarray) -> int:
        """How many characters of `text` became the unknown token or were dropped in `ids`."""
        if self.unk_id is not None:
            return int(np.count_nonzero(np.asarray(ids) == self.unk_id))
        if not self.drops:
            return 0
        missing = self.missing(text)
        return sum(text.count(c) for c in missing) if missing else 0

    def describe(self, text: str, n: int) -> str:
        """'3 characters ('日', '本', ...) are not in the tokenizer's vocabulary': for messages."""
        shown = ", ".join(repr(c) for c in self.missing(text)[:5])
        return f"{n} character{'s' if n != 1 else ''}{f' ({shown})' if shown else ''} not in the tokenizer's vocabulary"


def check_unknown(counter: UnknownCounter, text: str, ids: Sequence[int] | np.ndarray, where: str,
                  unknown: str = "unk") -> int:
    """How many characters of `text` are the unknown token in `ids` (to be reported); a TokenizerError
    naming `where` (file:line, a flag) when `unknown="error"`, or when the tokenizer has no unknown
    token and dropped them (nothing else would show they are gone)."""
    n = counter.count(text, ids) if counter.active else 0
    if n and counter.drops:
        raise TokenizerError(f"{where}: {counter.describe(text, n)}, which has no unknown token and would drop "
                             f"them: use a tokenizer that covers the text, or one with an unknown token")
    if n and unknown == "error":
        raise TokenizerError(f"{where}: {counter.describe(text, n)} (tokenizer.unknown=error; unk encodes them as "
                             f"{counter.unk_token} and counts them)")
    return n


class PlainTextEncoder:
    """Encodes corpus text with special-token strings taken as ordinary text.

    A document that contains the literal text "<|endoftext|>" must not be cut in two by it (nor
    let the data inject control tokens). `tokenizers` does that with `encode_special_tokens=True`,
    which costs ~20% on every text; here only the rare texts that contain an added token's string
    take that path, and the others the ordinary one, which gives them the same ids (added tokens
    only act where their string occurs). When an added token is matched on normalised text, a raw
    substring test could miss it, so every text takes the safe path.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.plain = Tokenizer.from_str(tok.to_str())
        self.safe = Tokenizer.from_str(tok.to_str())
        self.safe.encode_special_tokens = True
        added = list(tok.get_added_tokens_decoder().values())
        self.markers = [t.content for t in added] if not any(t.normalized for t in added) else None

    def _risky(self, text: str) -> bool:
        return self.markers is None or any(m in text for m in self.markers)

    def encode_ids(self, text: str) -> list[int]:
        tok = self.safe if self._risky(text) else self.plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> list[np.ndarray]:
        risky = [i for i, t in enumerate(texts) if self._risky(t)]
        if not risky:
            return _encode(self.plain, texts, dtype)
        out = [None] * len(texts)
        for i, ids in zip(risky, _encode(self.safe, [texts[i] for i in risky], dtype), strict=True):
            out[i] = ids
        rest = [i for i, x in enumerate(out) if x is None]
        for i, ids in zip(rest, _encode(self.plain, [texts[i] for i in rest], dtype), strict=True):
            out[i] = ids
        return out


def plain_text_encoder(tok: Tokenizer) -> PlainTextEncoder:
    """The encoder for corpus text: special-token strings in it are ordinary text."""
    return PlainTextEncoder(tok)


def encode_batch(tok: Tokenizer | PlainTextEncoder, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added), as arrays of `dtype`."""
    if isinstance(tok, PlainTextEncoder):
        return tok.encode_batch(texts, dtype)
    return _encode(tok, texts, dtype)


def _encode(tok: Tokenizer, texts: Sequence[str], dtype: np.dtype | type) -> list[np.ndarray]:
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which ids do not need: 15% faster.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [np.asarray(e.ids, dtype=dtype) for e in encode(list(texts), add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens included (the inverse of encoding plus the eot marker)."""
    ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
    return tok.decode(ids, skip_special_tokens=False)


# ---- Hugging Face tokenizer directories -----------------------------------------------------

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens of transformers (`SPECIAL_TOKENS_ATTRIBUTES`), in its order.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Written as tokenizer_class: every transformers version then runs tokenizer.json as written
# (a model-specific class such as LlamaTokenizer may rebuild the pipeline, see HFTokenizer).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Files that, next to tokenizer.json, mean a tokenizer in another format.
OTHER_FORMATS = {"tokenizer.model": "a SentencePiece model", "tekken.json": "a Mistral tekken vocabulary",
                 "vocab.json": "a GPT-2 style vocab.json + merges.txt", "vocab.txt": "a WordPiece vocab.txt"}


@dataclass(eq=False)
class HFTokenizer:
    """A Hugging Face tokenizer directory in memory: the `tokenizers` pipeline and its settings.

    Encoding is tokenizer.json's pipeline, as transformers' `TokenizersBackend` runs it, and BOS/EOS
    are added only by its post-processor: transformers 5 drops tokenizer_config.json's
    `add_bos_token`/`add_eos_token` whenever tokenizer.json exists, so they are ignored here too
    (`add_bos`/`add_eos` report what the post-processor does). A named special token that is in
    the vocabulary but not an added token becomes one (transformers does the same), so its text
    in the input encodes as the token. Deliberate differences from transformers 5.23:
    - a special token missing from the vocabulary is an error (transformers appends a new id,
      which the model has no embedding for);
    - `tokenizer_class` LlamaTokenizer(Fast) is not used to rebuild the pipeline: transformers
      replaces a non-byte-level tokenizer.json's normalizer/pre-tokenizer by its own Metaspace,
      which changes Llama-2's ids for " Hello" and after special tokens ("<s>Hello"); the file
      matches SentencePiece, which the model was trained with. `save_hf_tokenizer` writes a
      class that makes every transformers version run the file as written.
    `split_special_tokens` is applied to `tokenizer` (the object is owned by this one).
    """

    tokenizer: Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)
    """Named special tokens: "bos_token", "eos_token", "pad_token", ... and model-specific ones
    ("image_token"); templates see them under these names."""
    chat_templates: dict[str, str] = field(default_factory=dict)
    """Jinja chat templates by name; "default" is the one used unless another is asked for."""
    model_max_length: int | None = None
    """Longest input the model takes, when the directory says (transformers: 10**30 when absent)."""
    clean_up_tokenization_spaces: bool = False
    """Remove spaces before punctuation on decode; transformers ignores it for BPE models, as here."""
    split_special_tokens: bool = False
    """Encode special-token text in the input as plain text instead of as the token."""

    def __post_init__(self) -> None:
        bad = [k for k in self.special_tokens if not k.endswith("_token")]
        if bad:
            raise TokenizerError(f"special token names end in '_token' (bos_token, ...), got {bad}")
        missing = [f"{k}={v!r}" for k, v in self.special_tokens.items() if self.tokenizer.token_to_id(v) is None]
        if missing:
            raise TokenizerError(f"special tokens not in the tokenizer's vocabulary: {', '.join(missing)}")
        make_special(self.tokenizer, self.special_tokens.values())
        self.tokenizer.encode_special_tokens = self.split_special_tokens

    def token_id(self, key: str) -> int | None:
        """Id of the named special token `key` ("bos_token", ...), None when the tokenizer has none."""
        content = self.special_tokens.get(key)
        return None if content is None else self.tokenizer.token_to_id(content)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def bos_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def add_bos(self) -> bool:
        """Whether `encode(text)` starts with the BOS token (decided by tokenizer.json's post-processor)."""
        prefix, _ = self._added_by_post_processor()
        return self.bos_id is not None and self.bos_id in prefix

    @property
    def add_eos(self) -> bool:
        """Whether `encode(text)` ends with the EOS token."""
        _, suffix = self._added_by_post_processor()
        return self.eos_id is not None and self.eos_id in suffix

    def _added_by_post_processor(self) -> tuple[list[int], list[int]]:
        # Probing beats reading the post-processor's JSON: Sequence, TemplateProcessing and
        # RobertaProcessing all nest differently, and only their behaviour matters.
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start], full[start + len(plain):]
        return full, []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as `AutoTokenizer(...).encode(text, add_special_tokens=...)`."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as `AutoTokenizer(...).decode`."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers skips this cleanup for BPE models: it deletes real spaces before punctuation
        if self.clean_up_tokenization_spaces and type(self.tokenizer.model).__name__ != "BPE":
            text = clean_up_tokenization(text)
        return text

    def render_chat(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        template: str | None = None,
        **variables: Any,
    ) -> str:
        """The chat as text, as `apply_chat_template(messages, tokenize=False, ...)`.

        `template` names one of `chat_templates` or is a template's text; by default "tool_use"
        when tools are given and it exists, else "default". The special tokens are passed to the
        template (`bos_token`, ...) unless `variables` override them.
        """
        text = select_chat_template(self.chat_templates, template, has_tools=tools is not None)
        return render_chat_template(text, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    documents=documents, **{**self.special_tokens, **variables})

    def encode_chat(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        template: str | None = None,
        **variables: Any,
    ) -> list[int]:
        """Token ids of the rendered chat, as `apply_chat_template(messages, tokenize=True, ...)`.

        The text is encoded without adding special tokens: templates write their own BOS
        (`{{ bos_token }}`), and the post-processor would add a second one.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                documents=documents, template=template, **variables)
        return self.encode(text, add_special_tokens=False)


def make_special(tok: Tokenizer, tokens: Iterable[str]) -> None:
    """Make vocabulary tokens that a config calls special into added special tokens, as transformers does.

    An added token is matched in the input text before the model splits it, so "<s>" in the text
    then encodes as the token instead of as characters.
    """
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    new = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens) if t not in added]
    if new:
        tok.add_special_tokens(new)


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces that word-level detokenization leaves before punctuation (transformers' rule)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """Load a Hugging Face tokenizer directory (or the directory of a tokenizer.json path).

    Reads tokenizer.json (required), tokenizer_config.json (special tokens as strings or
    AddedToken objects, chat templates, model_max_length), special_tokens_map.json where
    transformers does, chat_template.jinja and additional_chat_templates/*.jinja. Raises
    TokenizerError naming the file and the problem for anything it cannot use.
    """
    directory = Path(path)
    if directory.is_file() and directory.name == TOKENIZER_JSON:
        directory = directory.parent
    if not directory.is_dir():
        raise TokenizerError(f"{directory} is not a directory: expected a Hugging Face tokenizer directory")
    if not (directory / TOKENIZER_JSON).is_file():
        raise TokenizerError(_missing_tokenizer_json(directory))
    tok = load_tokenizer(directory / TOKENIZER_JSON)
    config_path = directory / TOKENIZER_CONFIG
    config = _read_json_object(config_path) if config_path.is_file() else {}
    special = _special_tokens(config, config_path)
    extra = _extra_special_tokens(config, config_path)
    if "added_tokens_decoder" in config:
        _apply_added_tokens(tok, config["added_tokens_decoder"], config_path)
    elif (directory / SPECIAL_TOKENS_MAP).is_file():
        # transformers reads this legacy file only when the config has no added_tokens_decoder,
        # and then lets it override the config's tokens
        special.update(_special_tokens(_read_json_object(directory / SPECIAL_TOKENS_MAP), directory / SPECIAL_TOKENS_MAP))
    missing = [f"{k}={v!r}" for k, v in [*special.items(), *(("extra", t) for t in extra)] if tok.token_to_id(v) is None]
    if missing:
        raise TokenizerError(f"{config_path}: special tokens not in the vocabulary of {directory / TOKENIZER_JSON}: "
                             f"{', '.join(missing)} (transformers would append them at new ids, which the model "
                             f"has no embeddings for)")
    make_special(tok, extra)
    return HFTokenizer(
        tokenizer=tok,
        special_tokens=special,
        chat_templates=_chat_templates(config, config_path, directory),
        model_max_length=_optional_int(config, "model_max_length", config_path),
        clean_up_tokenization_spaces=_flag(config, "clean_up_tokenization_spaces", config_path),
        split_special_tokens=_flag(config, "split_special_tokens", config_path),
    )


def save_hf_tokenizer(tok: HFTokenizer, path: str | os.PathLike) -> None:
    """Write `tok` as a Hugging Face tokenizer directory that AutoTokenizer reloads identically.

    The layout is transformers 5's `save_pretrained`: tokenizer.json, tokenizer_config.json, the
    default chat template in chat_template.jinja and the others in additional_chat_templates/.
    The templates are also written, identical, to tokenizer_config.json's `chat_template` (a string,
    or a list of {"name", "template"} when there are several), which readers other than
    transformers 5 (transformers 4.4x, vLLM, llama.cpp's converter, TGI) take them from.
    Each file is written atomically. Template files of an earlier save that `tok` lacks are
    removed, because transformers would load them. The config also records `added_tokens_decoder`
    (so that a stale special_tokens_map.json is not read) and `add_bos_token`/`add_eos_token` as
    the post-processor behaves, for readers such as llama.cpp's converter; transformers 5
    ignores both.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / TOKENIZER_JSON, tok.tokenizer.to_str(pretty=True))
    templates = dict(tok.chat_templates)
    default = templates.pop("default", None)
    for name in templates:
        safe_name(name, what="chat template name")  # becomes a file name
    _remove_stale_templates(directory, keep_default=default is not None, keep=set(templates))
    if default is not None:
        atomic_write_text(directory / CHAT_TEMPLATE_FILE, default)
    for name, text in templates.items():
        atomic_write_text(directory / CHAT_TEMPLATE_DIR / f"{name}.jinja", text)
    config: dict[str, Any] = {
        "tokenizer_class": PORTABLE_TOKENIZER_CLASS,
        **tok.special_tokens,
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "clean_up_tokenization_spaces": tok.clean_up_tokenization_spaces,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.tokenizer.get_added_tokens_decoder().items())
        },
    }
    if tok.chat_templates:
        config["chat_template"] = _config_chat_template(tok.chat_templates)
    if tok.model_max_length is not None:
        config["model_max_length"] = tok.model_max_length
    if tok.split_special_tokens:
        config["split_special_tokens"] = True
    atomic_write_json(directory / TOKENIZER_CONFIG, config)


def _config_chat_template(templates: Mapping[str, str]) -> str | list[dict[str, str]]:
    """tokenizer_config.json's `chat_template`: the text of a lone default template, else a list of them by name."""
    if list(templates) == ["default"]:
        return templates["default"]
    return [{"name": name, "template": text} for name, text in templates.items()]


def _missing_tokenizer_json(directory: Path) -> str:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    listing = ", ".join(found[:20]) + (f", ... ({len(found)} entries)" if len(found) > 20 else "") or "nothing"
    msg = f"no {TOKENIZER_JSON} in {directory} (found: {listing})"
    other = [f"{name} ({what})" for name, what in OTHER_FORMATS.items() if (directory / name).is_file()]
    if other:
        msg += (f"; {', '.join(other)} is not read here: convert it once with transformers "
                f"(AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to write {TOKENIZER_JSON}")
    return msg


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _special_tokens(config: Mapping[str, Any], where: Path) -> dict[str, str]:
    """Named special tokens of a config, as transformers 5 collects them.

    The standard names may be strings or AddedToken objects ({"content": ..., ...}); other
    `*_token` keys with a string value ("image_token") and a dict `extra_special_tokens` are
    model-specific tokens, which transformers also passes to chat templates.
    """
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        if config.get(key) is not None:
            out[key] = _token_content(config[key], key, where)
    out |= {k: v for k, v in config.items() if k.endswith("_token") and k not in out and isinstance(v, str)}
    if isinstance(config.get("extra_special_tokens"), dict):
        out |= {k: _token_content(v, f"extra_special_tokens.{k}", where) for k, v in config["extra_special_tokens"].items()}
    return out


def _extra_special_tokens(config: Mapping[str, Any], where: Path) -> list[str]:
    """Unnamed special tokens: `additional_special_tokens` (transformers 4) or a list `extra_special_tokens` (5)."""
    out = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key)
        if isinstance(value, list):
            out += [_token_content(v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        elif value is not None and not (key == "extra_special_tokens" and isinstance(value, dict)):
            raise TokenizerError(f"{where}: {key} must be a list of tokens, got {type(value).__name__}")
    return out


def _token_content(value: Any, key: str, where: Path) -> str:
    if isinstance(value, dict):
        value = value.get("content")
        if not isinstance(value, str):
            raise TokenizerError(f"{where}: {key} is an object without a string 'content'")
    if not isinstance(value, str):
        raise TokenizerError(f"{where}: {key} must be a string or an AddedToken object, got {type(value).__name__}")
    return value


def _apply_added_tokens(tok: Tokenizer, added: Any, where: Path) -> None:
    """Check the config's added tokens against tokenizer.json's, and add those it only has as vocabulary.

    transformers appends a missing one at a new id; a mismatch means the two files come from
    different tokenizers, and a model would see ids it was not trained with, so it is an error.
    """
    if not isinstance(added, dict):
        raise TokenizerError(f"{where}: added_tokens_decoder must be an object of id -> token")
    new = []
    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    for key, spec in added.items():
        content = spec.get("content") if isinstance(spec, dict) else None
        if not isinstance(content, str) or not str(key).isdigit():
            raise TokenizerError(f"{where}: added_tokens_decoder entry {key!r} is not an id with a token object")
        actual = tok.token_to_id(content)
        if actual != int(key):
            found = "is not in tokenizer.json" if actual is None else f"has id {actual} in tokenizer.json"
            raise TokenizerError(f"{where}: added token {content!r} has id {key} here but {found}")
        if content not in known:
            special = bool(spec.get("special", False))
            new.append(AddedToken(content, single_word=bool(spec.get("single_word", False)),
                                  lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                                  normalized=bool(spec.get("normalized", not special)), special=special))
    if new:
        tok.add_tokens(new)


def _template_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: chat template is not UTF-8 (byte {e.start})") from None


def _chat_templates(config: Mapping[str, Any], where: Path, directory: Path) -> dict[str, str]:
    files = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = _template_file(directory / CHAT_TEMPLATE_FILE)
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for p in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[p.name.removesuffix(".jinja")] = _template_file(p)
    if files:  # transformers: template files take priority over the config's entries, which it drops
        return files
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{where}: chat_template must be a string or a list of {{\"name\", \"template\"}} "
                         f"objects, got {type(value).__name__}")


def _remove_stale_templates(directory: Path, keep_default: bool, keep: set[str]) -> None:
    if not keep_default:
        (directory / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for p in (directory / CHAT_TEMPLATE_DIR).glob("*.jinja"):
            if p.name.removesuffix(".jinja") not in keep:
                p.unlink()


def _optional_int(config: Mapping[str, Any], key: str, where: Path) -> int | None:
    value = config.get(key)
    if isinstance(value, float) and value.is_integer():  # some configs write 1e30 or 2048.0
        value = int(value)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TokenizerError(f"{where}: {key} must be an integer, got {value!r}")
    return value


def _flag(config: Mapping[str, Any], key: str, where: Path) -> bool:
    value = config.get(key)  # null counts as unset, as in transformers
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{where}: {key} must be true or false, got {value!r}")
    return bool(value)
