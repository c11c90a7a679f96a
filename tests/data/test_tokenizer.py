"""Tokenizers: nanoGPT's character vocabulary, exact byte-level BPE round trips, load/save, eot, and
Hugging Face tokenizer directories that encode, decode and save exactly as transformers.AutoTokenizer."""

import gzip
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from temper.data.tokenizer import (
    EOT,
    MAX_VOCAB_SIZE,
    UNK,
    HFTokenizer,
    TokenizerError,
    TokenizerNotFound,
    UnknownCounter,
    decode,
    encode_batch,
    eot_id,
    load_hf_tokenizer,
    load_tokenizer,
    plain_text_encoder,
    save_hf_tokenizer,
    save_tokenizer,
    train_tokenizer,
    vocab_size,
)
from temper.errors import InputError
from temper.files import UnsafePath
from tests.conftest import SHARED_DATA

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\r\n\ttabs  and  spaces   ",
    "Unicode: héllo wörld, 日本語, emoji \U0001f600, combining e\u0301, \ufffd",
    "for i in range(10):\n    print(i ** 2)\n" * 5,
]


def test_char_tokenizer_on_tinyshakespeare_is_nanogpts(shared_data):
    text = (shared_data / "tinyshakespeare/input.txt").read_text()
    tok = train_tokenizer([text], "char", special_tokens=[], unknown="error")  # no unknown token: nanoGPT's 65
    assert vocab_size(tok) == 65
    chars = sorted(set(text))  # nanoGPT: stoi = {ch: i for i, ch in enumerate(chars)}
    head = text[:2000]
    assert tok.encode(head).ids == [chars.index(c) for c in head]
    assert decode(tok, tok.encode(text).ids) == text
    with_eot = train_tokenizer([text], "char")  # the characters keep their ids; EOT, then UNK, follow them
    assert vocab_size(with_eot) == 67 and eot_id(with_eot) == 65 and with_eot.token_to_id(UNK) == 66
    assert with_eot.encode(head).ids == [chars.index(c) for c in head]


PROMPT = "日本語 ☃ 𝄞"  # no character but the spaces is in a corpus of ASCII text


def test_char_tokenizer_encodes_unknown_characters_as_a_counted_unk_token():
    tok = train_tokenizer(["hello world"], "char")
    unk, space = tok.token_to_id(UNK), tok.token_to_id(" ")
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    assert ids == [unk, unk, unk, space, unk, space, unk]  # one per character, none dropped
    counter = UnknownCounter(tok)
    assert counter.active and not counter.drops and counter.count(PROMPT, ids) == 5
    assert counter.describe(PROMPT, 5) == "5 characters ('☃', '日', '本', '語', '𝄞') not in the tokenizer's vocabulary"
    assert counter.count("hello", tok.encode("hello").ids) == 0
    # the literal text of UNK in a document is characters, not the token (it is not an added token)
    literal = train_tokenizer([f"hello {UNK}"], "char")
    assert plain_text_encoder(literal).encode_ids(UNK) == [literal.token_to_id(c) for c in UNK]


def test_unknown_characters_that_a_tokenizer_drops_are_counted():
    """A tokenizer without an unknown token (unknown="error", or one saved by an older temper) drops
    them in `tokenizers`: the counter finds each one, special-token text aside when it is matched as the token."""
    tok = train_tokenizer(["hello world"], "char", unknown="error")
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    assert len(ids) == 2  # the two spaces: what `generate` conditioned on
    counter = UnknownCounter(tok)
    assert counter.drops and counter.count(PROMPT, ids) == 5 and counter.missing(PROMPT)[0] == "☃"
    text = f"{EOT}hello"
    assert counter.count(text, tok.encode(text).ids) == 0  # <|endoftext|> is the token here
    plain = UnknownCounter(tok, added_are_tokens=False)  # as prepare encodes it: '<', '|', ... are characters
    assert plain.count(text, plain_text_encoder(tok).encode_ids(text)) == 9  # < | n f t x t | >
    byte_level = train_tokenizer(CORPUS, "bpe", vocab_size=280)
    assert not UnknownCounter(byte_level).active  # every byte is in its alphabet


def test_bpe_has_the_asked_vocab_and_round_trips_any_text():
    tok = train_tokenizer(CORPUS, "bpe", vocab_size=300)
    assert vocab_size(tok) == 300
    assert eot_id(tok) == 0 and tok.id_to_token(0) == EOT
    unseen = "never seen: Ωμέγα ∑ \x01\x7f \U0001f680 \u200b end"  # bytes outside the corpus too
    for text in CORPUS + [unseen]:
        assert decode(tok, tok.encode(text, add_special_tokens=False).ids) == text


def test_special_token_text_in_a_document_is_encoded_as_plain_text():
    tok = train_tokenizer(CORPUS, "bpe", vocab_size=300)
    text = f"a document quoting {EOT} in its text"
    assert eot_id(tok) in tok.encode(text).ids  # what the plain tokenizer would do
    [ids] = encode_batch(plain_text_encoder(tok), [text], np.uint16)
    assert ids.dtype == np.uint16 and eot_id(tok) not in ids.tolist()
    assert decode(tok, ids) == text
    # in a batch, only that text takes the slow safe path; every text keeps its place and ids
    safe = Tokenizer.from_str(tok.to_str())
    safe.encode_special_tokens = True
    batch = CORPUS + [text] + CORPUS[:2] + [f"{EOT}{EOT}"]
    got = encode_batch(plain_text_encoder(tok), batch, np.uint32)
    assert [g.tolist() for g in got] == [e.ids for e in safe.encode_batch(batch, add_special_tokens=False)]
    assert plain_text_encoder(tok).encode_ids(text) == ids.tolist()


def test_save_and_load_give_the_same_tokenizer(tmp_path):
    tok = train_tokenizer(CORPUS, "bpe", vocab_size=280)
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    for where in (tmp_path / "tokenizer.json", tmp_path):
        loaded = load_tokenizer(where)
        assert [e.ids for e in loaded.encode_batch(CORPUS)] == [e.ids for e in tok.encode_batch(CORPUS)]
    with pytest.raises(TokenizerNotFound, match="no tokenizer at") as missing:
        load_tokenizer(tmp_path / "missing")
    assert isinstance(missing.value, InputError) and isinstance(missing.value, FileNotFoundError)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_eot_of_a_foreign_tokenizer_json(tmp_path):
    """Any HF tokenizer.json loads; its end-of-text token is found by the usual names."""
    foreign = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "</s>": 2}, unk_token="<unk>"))
    foreign.add_special_tokens(["</s>"])
    (tmp_path / "tokenizer.json").write_text(foreign.to_str())
    tok = load_tokenizer(tmp_path)
    assert eot_id(tok) == 2 and eot_id(tok, "hello") == 1
    assert json.loads(tok.to_str())["model"]["type"] == "WordLevel"
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        eot_id(train_tokenizer(["abc"], "char", special_tokens=[]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer(CORPUS, "wordpiece")
    with pytest.raises(ValueError, match="smaller than the 256 byte symbols"):
        train_tokenizer(CORPUS, "bpe", vocab_size=200)
    # the Rust trainer would allocate about 70 GB and abort the process
    with pytest.raises(TokenizerError, match=f"vocab_size 1000000000 is above the maximum of {MAX_VOCAB_SIZE:,}"):
        train_tokenizer(CORPUS, "bpe", vocab_size=10**9)
    with pytest.raises(TokenizerError, match="unknown must be one of"):
        train_tokenizer(CORPUS, "char", unknown="drop")


# ---- Hugging Face tokenizer directories: parity with transformers.AutoTokenizer --------------
#
# Tiny tokenizers of three families are trained on WikiText-2 plus a little code and
# multilingual text, with the pipelines their real tokenizer.json files use, and written as HF
# directories with tokenizer_config.json files shaped like the real ones.

# Pre-tokenizer regexes from Meta-Llama-3's and Qwen2's tokenizer.json (Qwen splits digits singly).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>"]
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EXTRA_TEXT = [
    "def mean(xs: list[float]) -> float:\n    \"\"\"Average.\"\"\"\n    return sum(xs) / len(xs)  # ok\n\n"
    "class Point:\n\tdef __init__(self, x=0):\n\t\tself.x = {'a': [1, 2, 3]}\n",
    "Grüße aus München! Die Straße ist schön, die Bäume sind grün.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "emoji 😀🚀👍🏽 and a family 👨‍👩‍👧 ✓",
]
# Texts whose ids must equal AutoTokenizer's: English, code, multilingual, whitespace runs, and
# special-token text of every family (whole, glued to words, doubled, truncated).
MIXED = [
    *EXTRA_TEXT,
    "  two leading spaces", "trailing spaces   ", "\n\n\nthree newlines\t\ttwo tabs", "   ", " ", "",
    "x = 1;\r\ny = 2\r\n", "a  b   c    d",
    "<s>Hello", "Hello</s>world", "a <s> b </s> c", "<unk> and <|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<|eot_id|><|eot_id|>",
    "<|im_", "<s", "</s", "<start_of_turn>model\n<end_of_turn>",
]


def wikitext(shared: Path, split: str, chars: int) -> str:
    with gzip.open(shared / f"wikitext-2/{split}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read(chars)


def training_corpus(shared: Path) -> list[str]:
    text = wikitext(shared, "train", 300_000)
    return [text[i:i + 2000] for i in range(0, len(text), 2000)] + EXTRA_TEXT * 5


def parity_texts(shared: Path) -> list[str]:
    valid = wikitext(shared, "valid", 6000)  # English the tokenizers were not trained on
    return [valid[:3000], valid[3000:]] + MIXED


def byte_level_bpe(corpus: list[str], split: str, special: list[str], nfc: bool = False,
                   ignore_merges: bool = False) -> Tokenizer:
    """GPT-2/Llama-3/Qwen2 scheme: regex split, then bytes mapped to printable characters."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(special)
    return tok


def llama3_style(corpus: list[str]) -> Tokenizer:
    """Meta-Llama-3: byte-level BPE with ignore_merges, BOS added by a TemplateProcessing post-processor."""
    tok = byte_level_bpe(corpus, LLAMA3_SPLIT, LLAMA3_SPECIAL, ignore_merges=True)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    return tok


def qwen2_style(corpus: list[str]) -> Tokenizer:
    """Qwen2: NFC, byte-level BPE, ChatML special tokens, no BOS."""
    return byte_level_bpe(corpus, QWEN2_SPLIT, QWEN2_SPECIAL, nfc=True)


def llama2_style(corpus: list[str], legacy_normalizer: bool = False) -> Tokenizer:
    """Llama-2/Mistral: SentencePiece-style BPE ("▁" for spaces) with byte fallback, BOS "<s>".

    The vocabulary is <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then merges. Newer
    tokenizer.json files use a Metaspace pre-tokenizer; Llama-2-7b-hf's original one uses a
    Prepend("▁") + Replace(" ", "▁") normalizer instead (`legacy_normalizer`).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  limit_alphabet=300, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = spec["added_tokens"][:3]  # byte tokens are plain vocabulary, as in Llama-2
    if legacy_normalizer:
        spec["pre_tokenizer"] = None
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    else:
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok


def write_hf_dir(directory: Path, tok: Tokenizer, config: dict | None, files: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tok.to_str())
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def added_token_object(content: str) -> dict:
    """A special token as transformers 4 wrote it into tokenizer_config.json."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


# tokenizer_config.json of each family, shaped like the real files (Meta-Llama-3-8B-Instruct,
# Llama-2-7b-chat-hf, Mistral-7B-Instruct, Qwen2.5-7B-Instruct).
FAMILY_CONFIGS = {
    "llama3": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "model_max_length": 131072, "clean_up_tokenization_spaces": True},
    "llama2": {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
               "clean_up_tokenization_spaces": False, "model_max_length": 4096},
    "mistral": {"tokenizer_class": "LlamaTokenizer", "bos_token": added_token_object("<s>"),
                "eos_token": added_token_object("</s>"), "unk_token": added_token_object("<unk>"),
                "add_bos_token": True, "add_eos_token": False},
    "qwen2": {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_prefix_space": False,
              "errors": "replace", "split_special_tokens": False, "model_max_length": 131072,
              "clean_up_tokenization_spaces": False},
}
FAMILY_STYLES = {"llama3": llama3_style, "llama2": llama2_style, "mistral": llama2_style, "qwen2": qwen2_style}
# What AutoTokenizer 5.23 makes of each (found by experiment): a model-specific class rebuilds
# the pipeline from vocab + merges; LlamaTokenizer keeps the post-processor (hence BOS) only.
FAMILY_HF_CLASS = {"llama3": "TokenizersBackend", "llama2": "LlamaTokenizer", "mistral": "LlamaTokenizer",
                   "qwen2": "Qwen2Tokenizer"}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return training_corpus(SHARED_DATA)


@pytest.fixture(scope="module")
def family_dirs(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    trained = {style: style(corpus) for style in set(FAMILY_STYLES.values())}
    return {name: write_hf_dir(root / name, trained[FAMILY_STYLES[name]], FAMILY_CONFIGS[name])
            for name in FAMILY_CONFIGS}


def auto_tokenizer(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def assert_same_encoding(ours: HFTokenizer, theirs, texts: Sequence[str]) -> None:
    for text in texts:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_hf_directory_encodes_as_auto_tokenizer(family, family_dirs):
    ours, theirs = load_hf_tokenizer(family_dirs[family]), auto_tokenizer(family_dirs[family])
    assert type(theirs).__name__ == FAMILY_HF_CLASS[family]
    assert_same_encoding(ours, theirs, parity_texts(SHARED_DATA))
    for name in ("bos", "eos", "pad", "unk"):
        assert (getattr(ours, f"{name}_token"), ours.token_id(f"{name}_token")) == (
            getattr(theirs, f"{name}_token"), getattr(theirs, f"{name}_token_id")), name
    assert ours.add_bos == (family != "qwen2") and not ours.add_eos
    if ours.model_max_length is not None:
        assert ours.model_max_length == theirs.model_max_length


def test_add_bos_token_in_the_config_is_ignored_like_transformers(corpus, tmp_path):
    """transformers 5 drops add_bos_token/add_eos_token when tokenizer.json exists: only its post-processor counts."""
    tok = llama3_style(corpus)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS
    config = {**FAMILY_CONFIGS["llama3"], "add_bos_token": True, "add_eos_token": True}
    for directory, expect_bos in ((write_hf_dir(tmp_path / "no_bos", tok, config), False),
                                  (write_hf_dir(tmp_path / "bos", llama2_style(corpus), {
                                      **FAMILY_CONFIGS["llama2"], "add_eos_token": True}), True)):
        ours, theirs = load_hf_tokenizer(directory), auto_tokenizer(directory)
        ids = ours.encode("hi")
        assert ids == theirs.encode("hi") and (ours.bos_id in ids) == expect_bos and ours.eos_id not in ids
        assert (ours.add_bos, ours.add_eos) == (expect_bos, False)


@pytest.mark.parametrize("form", ["eos_token", "image_token", "additional_special_tokens", "extra_list", "extra_dict",
                                  "added_tokens_decoder"])
def test_vocabulary_token_that_the_config_calls_special_becomes_special(form, corpus, tmp_path):
    """transformers matches such a token in the input text; every way a config can name one counts."""
    tok = qwen2_style(corpus)
    word = "Ġthe"  # an ordinary merged token
    assert tok.token_to_id(word) is not None and word not in [t.content for t in tok.get_added_tokens_decoder().values()]
    extra = {"eos_token": {"eos_token": word}, "image_token": {"image_token": word},
             "additional_special_tokens": {"additional_special_tokens": [word]},
             "extra_list": {"extra_special_tokens": [word]}, "extra_dict": {"extra_special_tokens": {"image_token": word}},
             "added_tokens_decoder": {"added_tokens_decoder": {str(tok.token_to_id(word)): {"content": word, "special": True}}},
             }[form]
    directory = write_hf_dir(tmp_path, tok, {**FAMILY_CONFIGS["qwen2"], **extra})
    ours, theirs = load_hf_tokenizer(directory), auto_tokenizer(directory)
    text = f"in{word}end and the rest"
    assert ours.encode(text) == theirs.encode(text) != tok.encode(text).ids
    assert tok.token_to_id(word) in ours.encode(text)
    template = "{{ image_token }}|{{ eos_token }}"
    assert ours.render_chat([{"role": "user", "content": ""}], template=template) == theirs.apply_chat_template(
        [{"role": "user", "content": ""}], chat_template=template, tokenize=False)


def test_split_special_tokens_encodes_them_as_text(family_dirs, tmp_path):
    directory = tmp_path / "split"
    shutil.copytree(family_dirs["qwen2"], directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({**FAMILY_CONFIGS["qwen2"], "split_special_tokens": True}))
    ours, theirs = load_hf_tokenizer(directory), auto_tokenizer(directory)
    assert_same_encoding(ours, theirs, MIXED)
    assert ours.eos_id not in ours.encode("<|im_end|>")


def test_llama_tokenizer_class_does_not_rebuild_the_pipeline(corpus, tmp_path):
    """The one place temper follows tokenizer.json and AutoTokenizer 5.23 does not (see HFTokenizer).

    Llama-2-7b-hf's tokenizer.json normalizes with Prepend("▁") + Replace, as SentencePiece does;
    for tokenizer_class LlamaTokenizer transformers 5 swaps that for its own Metaspace pipeline,
    which drops a "▁" before a leading space and after a special token. temper keeps the file's
    ids, and after save_hf_tokenizer AutoTokenizer agrees with them.
    """
    tok = llama2_style(corpus, legacy_normalizer=True)
    directory = write_hf_dir(tmp_path / "llama2", tok, FAMILY_CONFIGS["llama2"])
    ours, theirs = load_hf_tokenizer(directory), auto_tokenizer(directory)
    texts = parity_texts(SHARED_DATA)
    assert all(ours.encode(t) == tok.encode(t).ids for t in texts)
    for text, piece in ((" Hello", ["▁", "▁H"]), ("<s>Hello", ["<s>", "▁H"])):
        assert [tok.id_to_token(i) for i in ours.encode(text, add_special_tokens=False)][:2] == piece
        assert theirs.encode(text, add_special_tokens=False) != ours.encode(text, add_special_tokens=False)
    save_hf_tokenizer(ours, tmp_path / "saved")
    assert_same_encoding(ours, auto_tokenizer(tmp_path / "saved"), texts)


def test_chat_templates_load_from_where_transformers_reads_them(family_dirs, tmp_path):
    tok = Tokenizer.from_file(str(family_dirs["qwen2"] / "tokenizer.json"))
    base = FAMILY_CONFIGS["qwen2"]
    named = [{"name": "default", "template": "D{{ messages[0].content }}"}, {"name": "tool_use", "template": "T{{ tools|length }}"}]
    cases = {
        "string": ({**base, "chat_template": "S"}, {}, {"default": "S"}),
        "list": ({**base, "chat_template": named}, {}, {"default": "D{{ messages[0].content }}", "tool_use": "T{{ tools|length }}"}),
        # a template file wins over the config, and any file makes transformers drop the config's templates
        "jinja": ({**base, "chat_template": "S"}, {"chat_template.jinja": "F"}, {"default": "F"}),
        "extra": ({**base, "chat_template": "S"}, {"chat_template.jinja": "F", "additional_chat_templates/rag.jinja": "R"},
                  {"default": "F", "rag": "R"}),
        "extra_only": ({**base, "chat_template": "S"}, {"additional_chat_templates/rag.jinja": "R"}, {"rag": "R"}),
    }
    chat = [{"role": "user", "content": "hi"}]
    for name, (config, files, expected) in cases.items():
        directory = write_hf_dir(tmp_path / name, tok, config, files)
        ours, theirs = load_hf_tokenizer(directory), auto_tokenizer(directory)
        assert ours.chat_templates == expected, name
        assert theirs.chat_template == (expected["default"] if list(expected) == ["default"] else expected), name
    ours, theirs = load_hf_tokenizer(tmp_path / "list"), auto_tokenizer(tmp_path / "list")
    for tools in (None, [{"type": "function", "function": {"name": "f"}}]):
        assert ours.render_chat(chat, tools=tools) == theirs.apply_chat_template(chat, tools=tools, tokenize=False)
    assert ours.render_chat(chat, template="tool_use", tools=[]) == "T0"


def test_save_writes_what_auto_tokenizer_reloads_identically(family_dirs, tmp_path):
    for family, source in family_dirs.items():
        ours = load_hf_tokenizer(source)
        ours.chat_templates = {"default": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                               "tool_use": "{{ tools | tojson }}"}
        out = tmp_path / family
        save_hf_tokenizer(ours, out)
        assert sorted(p.name for p in out.iterdir()) == ["additional_chat_templates", "chat_template.jinja",
                                                         "tokenizer.json", "tokenizer_config.json"]
        again, theirs = load_hf_tokenizer(out), auto_tokenizer(out)
        assert (again.special_tokens, again.chat_templates, again.model_max_length) == (
            ours.special_tokens, ours.chat_templates, ours.model_max_length)
        assert again.tokenizer.to_str() == ours.tokenizer.to_str()
        assert theirs.chat_template == ours.chat_templates
        assert {k: v for k, v in theirs.special_tokens_map.items() if isinstance(v, str)} == ours.special_tokens
        assert_same_encoding(again, theirs, MIXED)
        assert [(i, t.content, t.special, t.rstrip) for i, t in sorted(theirs.added_tokens_decoder.items())] == [
            (i, t.content, t.special, t.rstrip) for i, t in sorted(ours.tokenizer.get_added_tokens_decoder().items())]


def test_chat_template_is_saved_both_as_jinja_and_in_tokenizer_config(tmp_path):
    """RELIABILITY row 30: chat_template.jinja and tokenizer_config.json's chat_template, identical;
    readers that know only one of them (transformers 4.4x, vLLM, TGI) find the template."""
    tok = train_tokenizer(["hello world: user assistant"], "char")
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": EOT}, {"default": template}), tmp_path / "one")
    config = json.loads((tmp_path / "one/tokenizer_config.json").read_text())
    assert config["chat_template"] == (tmp_path / "one/chat_template.jinja").read_text() == template
    several = {"default": template, "rag": "R{{ documents | length }}"}
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": EOT}, several), tmp_path / "two")
    config = json.loads((tmp_path / "two/tokenizer_config.json").read_text())
    assert config["chat_template"] == [{"name": "default", "template": template},
                                       {"name": "rag", "template": "R{{ documents | length }}"}]
    assert (tmp_path / "two/additional_chat_templates/rag.jinja").read_text() == several["rag"]
    (tmp_path / "one/chat_template.jinja").unlink()  # the config alone still gives the template
    assert load_hf_tokenizer(tmp_path / "one").chat_templates == {"default": template}
    chat = [{"role": "user", "content": "hello"}]
    assert auto_tokenizer(tmp_path / "one").apply_chat_template(chat, tokenize=False) == "user: hello\n"
    assert auto_tokenizer(tmp_path / "two").chat_template == several


def test_save_removes_stale_templates_and_survives_a_stale_special_tokens_map(family_dirs, tmp_path):
    ours = load_hf_tokenizer(family_dirs["llama3"])
    ours.chat_templates = {"default": "A", "rag": "R"}
    save_hf_tokenizer(ours, tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    ours.chat_templates = {}
    save_hf_tokenizer(ours, tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert not list((tmp_path / "additional_chat_templates").iterdir())
    again, theirs = load_hf_tokenizer(tmp_path), auto_tokenizer(tmp_path)
    assert again.chat_templates == {} and theirs.chat_template is None
    assert again.eos_token == theirs.eos_token == "<|eot_id|>"  # added_tokens_decoder keeps the map unread


def test_loads_what_transformers_saves(family_dirs, tmp_path):
    for family in ("llama2", "qwen2"):
        theirs = auto_tokenizer(family_dirs[family])
        theirs.chat_template = "{{ bos_token }}{{ messages[0]['content'] }}"
        theirs.save_pretrained(str(tmp_path / family))
        ours = load_hf_tokenizer(tmp_path / family)
        assert ours.chat_templates == {"default": theirs.chat_template}
        assert_same_encoding(ours, theirs, parity_texts(SHARED_DATA))


def test_legacy_special_tokens_map_overrides_like_transformers(family_dirs, tmp_path):
    tok = Tokenizer.from_file(str(family_dirs["qwen2"] / "tokenizer.json"))
    directory = write_hf_dir(tmp_path, tok, FAMILY_CONFIGS["qwen2"],
                             {"special_tokens_map.json": json.dumps({"eos_token": added_token_object("<|endoftext|>")})})
    ours, theirs = load_hf_tokenizer(directory), auto_tokenizer(directory)
    assert ours.eos_token == theirs.eos_token == "<|endoftext|>"


def test_no_config_at_all(family_dirs, tmp_path):
    shutil.copy(family_dirs["llama3"] / "tokenizer.json", tmp_path)
    ours, theirs = load_hf_tokenizer(tmp_path / "tokenizer.json"), auto_tokenizer(tmp_path)
    assert ours.special_tokens == {} and ours.chat_templates == {} and ours.model_max_length is None
    assert_same_encoding(ours, theirs, MIXED[:8])


def test_bad_hf_directories_give_clear_errors(family_dirs, tmp_path):
    tok_json = (family_dirs["qwen2"] / "tokenizer.json").read_text()
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\x00")
    (tmp_path / "spm" / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"no tokenizer.json in .*spm \(found: config.json, tokenizer.model\).*"
                                             r"SentencePiece"):
        load_hf_tokenizer(tmp_path / "spm")
    with pytest.raises(TokenizerError, match="is not a directory"):
        load_hf_tokenizer(tmp_path / "nowhere")

    def broken(name: str, config_text: str, files: dict[str, str] | None = None) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "tokenizer.json").write_text(tok_json)
        (directory / "tokenizer_config.json").write_text(config_text)
        for rel, text in (files or {}).items():
            (directory / rel).write_text(text)
        return directory

    with pytest.raises(TokenizerError, match=r"malformed.tokenizer_config.json: invalid JSON at line 3, column 1"):
        load_hf_tokenizer(broken("malformed", '{\n  "eos_token": "<|im_end|>",\n}'))
    with pytest.raises(TokenizerError, match=r"not in the vocabulary.*pad_token='<pad>', extra='<new>'.*new ids"):
        load_hf_tokenizer(broken("missing", json.dumps({"eos_token": "<|im_end|>", "pad_token": "<pad>",
                                                        "additional_special_tokens": ["<|im_start|>", "<new>"]})))
    with pytest.raises(TokenizerError, match=r"bos_token is an object without a string 'content'"):
        load_hf_tokenizer(broken("object", json.dumps({"bos_token": {"text": "<s>"}})))
    with pytest.raises(TokenizerError, match=r"added token '<\|im_end\|>' has id 5 here but has id 100"):
        load_hf_tokenizer(broken("ids", json.dumps({"added_tokens_decoder": {"5": {"content": "<|im_end|>"}}})))
    with pytest.raises(TokenizerError, match="chat_template must be a string or a list"):
        load_hf_tokenizer(broken("template", json.dumps({"chat_template": {"default": "x"}})))
    with pytest.raises(TokenizerError, match="model_max_length must be an integer"):
        load_hf_tokenizer(broken("length", json.dumps({"model_max_length": "long"})))
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_hf_tokenizer(broken("tokjson", "{}", {"tokenizer.json": "{"}))
    ours = load_hf_tokenizer(family_dirs["qwen2"])
    ours.chat_templates = {"../escape": "x"}
    with pytest.raises(UnsafePath):
        save_hf_tokenizer(ours, tmp_path / "out")
    with pytest.raises(TokenizerError, match="not in the tokenizer's vocabulary"):
        HFTokenizer(ours.tokenizer, {"eos_token": "<nope>"})
