"""`temper generate` end to end on a tiny checkpoint: streamed text equals the engine's, stop strings cut,
generation goes on past the model's context, and chats go through the tokenizer's chat template."""

import json
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer
from temper.infer.engine import generate
from temper.infer.text import cut_at_stop, safe_to_print
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from temper.recipes.generate import main


@pytest.fixture
def checkpoint(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran to the cat"] * 10, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_hf(model, cfg, tmp_path / "final", tokenizer_json=tmp_path / "tokenizer.json")
    return tmp_path / "final", model, tok


def test_greedy_stream_matches_engine_and_stop_cuts(checkpoint, capsys):
    path, model, tok = checkpoint
    args = ["--checkpoint", str(path), "--prompt", "the cat", "--max_new_tokens=12", "--temperature=0", "--device=cpu"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    ids = tok.encode("the cat").ids
    expected = "the cat" + tok.decode(ids + generate(model.eval(), [ids], max_new_tokens=12, temperature=0)[0])[7:]
    assert streamed == expected + "\n"
    stop = expected[9:11]  # a piece of the completion
    assert main(args + ["--stop", stop]) == 0
    assert capsys.readouterr().out == expected[: expected.index(stop, 7)] + "\n"
    assert main(args + ["--prompt", "a dog"]) == 0  # a batch of two prompts
    assert capsys.readouterr().out.count("--- [") == 2


def test_generates_past_the_context_and_crops_long_prompts(checkpoint, capsys):
    path, model, tok = checkpoint
    for prompt, too_long in [("the cat", False), ("a dog ran to the cat " * 8, True)]:  # the context is 32 tokens
        ids = tok.encode(prompt).ids
        assert (len(ids) > 32) == too_long
        args = ["--checkpoint", str(path), "--prompt", prompt, "--max_new_tokens=100", "--temperature=0", "--device=cpu"]
        assert main(args) == 0
        out, err = capsys.readouterr()
        new = generate(model.eval(), [ids], max_new_tokens=100, temperature=0)[0]
        assert len(new) == 100  # three times the context
        assert out == prompt + tok.decode(ids + new)[len(prompt) :] + "\n"
        assert ("only its last 32" in err) == too_long


def test_stop_helpers():
    assert cut_at_stop("hello world", ["wor", "lo"]) == ("hel", True)
    assert safe_to_print("hello wo", ["world"]) == 6  # "wo" may still become "world"
    assert safe_to_print("abc\ufffd", []) == 3


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    assert main(["--checkpoint", str(tmp_path / "half"), "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A Qwen2.5-style checkpoint: its family tokenizer (ChatML tokens) with Qwen2.5's real chat template,
    <|im_end|> and <|endoftext|> as generation_config's eos ids, a random model."""
    from tests.conftest import SHARED_DATA
    from tests.data.test_chat import QWEN25
    from tests.data.test_tokenizer import qwen2_style, training_corpus

    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("chat") / "final"
    tok = qwen2_style(training_corpus(SHARED_DATA))
    hf = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, chat_templates={"default": QWEN25})
    save_hf_tokenizer(hf, root)
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(cfg)
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    save_hf(model, cfg, root, generation_config={"eos_token_id": eos})
    return root, model.eval(), hf, eos


def test_chat_goes_through_the_chat_template(chat_checkpoint, capsys):
    """--chat messages (and --system + --prompt) are rendered by the tokenizer's template up to the
    assistant's turn; the reply is what the engine generates from those ids, stopping on the eos ids."""
    path, model, tok, eos = chat_checkpoint
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital?"}]
    ids = tok.encode_chat(chat, add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    new = generate(model, [ids], max_new_tokens=10, temperature=0, stop_token_ids=eos)[0]
    assert len(new) == 10  # random weights: no eos within 10 tokens, so the whole reply is compared
    reply = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    base = ["--checkpoint", str(path), "--max_new_tokens=10", "--temperature=0", "--device=cpu"]
    assert main(base + ["--chat", json.dumps(chat)]) == 0
    assert capsys.readouterr().out == reply + "\n"
    assert main(base + ["--system", "Answer briefly.", "--prompt", "What is the capital?"]) == 0
    assert capsys.readouterr().out == reply + "\n"
    assert main(base + ["--system", "Answer briefly.", "--prompt", "What is the capital?", "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out.startswith(f"--- [0]\n{reply}\n--- [1]\n")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == ids


def test_chat_template_kwargs_reach_the_template(chat_checkpoint, capsys):
    """Qwen3's template with --chat_template_kwargs '{enable_thinking: false}': the prompt closes an empty <think>
    block, as transformers' apply_chat_template(..., enable_thinking=False) renders it."""
    from tests.data.test_chat import QWEN3

    path, model, tok, eos = chat_checkpoint
    chat = [{"role": "user", "content": "What is the capital?"}]
    ids = tok.encode_chat(chat, add_generation_prompt=True, template=QWEN3, enable_thinking=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    new = generate(model, [ids], max_new_tokens=10, temperature=0, stop_token_ids=eos)[0]
    reply = tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    base = ["--checkpoint", str(path), "--max_new_tokens=10", "--temperature=0", "--device=cpu", "--chat", json.dumps(chat)]
    assert main(base + [f"--chat_template={QWEN3}", "--chat_template_kwargs={enable_thinking: false}"]) == 0
    assert capsys.readouterr().out == reply + "\n"
    with pytest.raises(ValueError, match="chat template variable 'add_generation_prompt'"):
        main(base + ["--chat_template_kwargs={add_generation_prompt: false}"])
    with pytest.raises(ValueError, match="apply to chats"):  # a plain --prompt renders no template
        main(["--checkpoint", str(path), "--prompt", "hi", "--chat_template_kwargs={enable_thinking: false}"])


def test_chat_needs_a_template_and_one_form(checkpoint, chat_checkpoint, capsys):
    path, _, _ = checkpoint
    chat = json.dumps([{"role": "user", "content": "hi"}])
    assert main(["--checkpoint", str(path), "--chat", chat, "--device=cpu"]) == 2
    assert "no chat template" in capsys.readouterr().err
    with pytest.raises(ValueError, match="either --chat"):
        main(["--checkpoint", str(chat_checkpoint[0]), "--chat", chat, "--prompt", "x"])


@pytest.mark.parametrize("flag, message", [
    ("--top_p=1.5", "top_p must be in (0, 1], got 1.5"),
    ("--prompt=", "--prompt is empty"),
    ("--temperature=-1", "temperature must be >= 0"),
    ("--temperature=nan", "temperature must be >= 0"),
    ("--top_k=-1", "top_k must be >= 0"),
    ("--max_new_tokens=0", "max_new_tokens must be >= 1"),
    ("--repetition_penalty=0", "repetition_penalty must be > 0"),
])
def test_bad_sampling_flags_are_one_line_before_the_model_loads(tmp_path, capsys, flag, message):
    """Issue 13: each used to be a traceback from the engine, after the model had loaded. The checkpoint
    here does not exist: the flag is refused first."""
    from temper.__main__ import main as temper

    prompt = [] if flag.startswith("--prompt") else ["--prompt=hi"]
    assert temper(["generate", f"--checkpoint={tmp_path / 'nowhere'}", *prompt, flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("temper generate: ") and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("unknown", ["unk", "error"])
def test_prompt_characters_outside_a_char_vocabulary_are_never_dropped_silently(tmp_path, capsys, unknown):
    """The prompt '日本語 ☃ 𝄞' once conditioned on its two spaces: now it is the unknown token, with a
    note, or (a tokenizer without one) an error naming the prompt."""
    from temper.data.tokenizer import EOT, train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat"], "char", unknown=unknown)
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": EOT}), tmp_path / "tok")
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=32)
    save_hf(Transformer(cfg), cfg, tmp_path / "final", tokenizer_json=tmp_path / "tok" / "tokenizer.json")
    args = ["--checkpoint", str(tmp_path / "final"), "--prompt", "日本語 ☃ 𝄞", "--max_new_tokens=2", "--device=cpu"]
    said = "5 characters ('☃', '日', '本', '語', '𝄞') not in the tokenizer's vocabulary"
    if unknown == "unk":
        assert main(args) == 0
        assert f"temper generate: note: --prompt '日本語 ☃ 𝄞': {said}, encoded as <|unk|>" in capsys.readouterr().err
    else:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"temper generate: --prompt '日本語 ☃ 𝄞': {said}, which has no unknown token")
        assert err.count("\n") == 1


def test_speculative_decoding_prints_the_plain_greedy_text(checkpoint, tmp_path, capsys):
    """Issue 16 item 4: --draft (another model on the same tokenizer) and --prompt_lookup change how
    many passes the model makes, not the greedy text; the acceptance rate goes to stderr."""
    path, model, tok = checkpoint
    cfg = replace(model.cfg, n_layers=1)
    torch.manual_seed(1)
    save_hf(Transformer(cfg), cfg, tmp_path / "draft", tokenizer_json=tmp_path / "tokenizer.json")
    base = ["--checkpoint", str(path), "--prompt", "the cat", "--max_new_tokens=40", "--temperature=0", "--device=cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for extra in (["--draft", str(tmp_path / "draft")], ["--prompt_lookup=2", "--num_draft_tokens=3"]):
        assert main(base + extra) == 0
        out, err = capsys.readouterr()
        assert out == plain
        assert "temper generate: speculative decoding: accepted " in err and "drafted tokens" in err
    stop = plain[9:11]
    assert main(base + ["--prompt_lookup=2", "--stop", stop]) == 0
    assert capsys.readouterr().out == plain[: plain.index(stop, 7)] + "\n"
    assert main(base + ["--prompt", "a dog", "--prompt_lookup=2"]) == 0  # one prompt after another
    assert capsys.readouterr().out.startswith(f"--- [0]\n{plain}--- [1]\na dog")


def test_a_draft_with_another_tokenizer_is_one_clear_line(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["completely different words here"] * 10, trainer)
    tok.save(str(tmp_path / "other.json"))
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=32)
    save_hf(Transformer(cfg), cfg, tmp_path / "other", tokenizer_json=tmp_path / "other.json")
    args = ["--checkpoint", str(path), "--prompt", "the cat", "--device=cpu", "--draft", str(tmp_path / "other")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"temper generate: draft {tmp_path / 'other'}: its tokenizer is not the model's") and \
        err.count("\n") == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--prompt_lookup=2", "--draft=x"], "either --draft"),
    (["--prompt_lookup=-1"], "prompt_lookup must be >= 0"),
    (["--prompt_lookup=2", "--num_draft_tokens=0"], "num_draft_tokens >= 1"),
    (["--prompt_lookup=2", "--repetition_penalty=1.2"], "neither --repetition_penalty nor --compile"),
])
def test_bad_speculative_flags_are_one_line_before_the_model_loads(tmp_path, capsys, flags, message):
    from temper.__main__ import main as temper

    assert temper(["generate", f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("temper generate: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_structured_output_flags_shape_every_completion(chat_checkpoint, tmp_path, capsys):
    """--json_schema (inline or a file), --regex, --choice and --grammar: a random model's sampled completions
    follow each; bad values are one line naming the flag (and the file), conflicting flags fail before loading."""
    import re

    import jsonschema

    path = str(chat_checkpoint[0])
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "bad.json").write_text("{not json")
    base = ["--checkpoint", path, "--prompt", "Hello", "--max_new_tokens=40", "--temperature=1", "--device=cpu"]
    for flags, valid in [(["--json_schema", json.dumps(schema)], lambda t: jsonschema.validate(json.loads(t), schema)
                           is None),
                         (["--json_schema", str(tmp_path / "schema.json")],
                          lambda t: jsonschema.validate(json.loads(t), schema) is None),
                         (["--regex", "[a-z]{3}-[0-9]{2}"], lambda t: re.fullmatch("[a-z]{3}-[0-9]{2}", t)),
                         (["--choice", "yes", "--choice", "no"], lambda t: t in ("yes", "no")),
                         (["--grammar", 'root ::= "a" [0-9] | "b"'], lambda t: re.fullmatch("a[0-9]|b", t))]:
        for seed in (0, 1):
            assert main(base + flags + ["--seed", str(seed)]) == 0
            text = capsys.readouterr().out[len("Hello"):-1]
            assert valid(text), (flags, text)
    for flags, message in [(["--json_schema", str(tmp_path / "bad.json")], r"bad.json\) is not JSON"),
                           (["--regex", "(ab"], "--regex: .*unclosed group"),
                           (["--grammar", "start: nowhere"], "--grammar: .*nowhere")]:
        assert main(base + flags) == 2
        assert re.search(message, capsys.readouterr().err, re.S), flags
    from temper.__main__ import main as temper

    for flags, message in [(["--regex", "a", "--choice", "b"], "one of --json_schema"),
                           (["--regex", "a", "--prompt_lookup", "2"], "speculative")]:
        assert temper(["generate", f"--checkpoint={tmp_path / 'nowhere'}", *base[2:], *flags]) == 2
        assert message in capsys.readouterr().err
