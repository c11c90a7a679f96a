"""`temper generate` end to end on a tiny checkpoint: streamed text equals the engine's, stop strings cut,
and generation goes on past the model's context."""

from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from temper.infer.engine import generate
from temper.infer.text import cut_at_stop, safe_to_print
from temper.model.config import PRESETS
from temper.model.convert import save_hf
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
    assert "no tokenizer.json" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    assert main(["--checkpoint", str(tmp_path / "half"), "--prompt", "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
