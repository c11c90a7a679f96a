"""One loader for generate, evaluate and lm-eval: a run directory means its final/, the stop ids are
generation_config's, config.json's and the tokenizer's EOS, the chat template comes with the tokenizer,
and every failure names the checkpoint before any weights are read."""

import json
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer
from temper.infer.load import load_for_inference, open_checkpoint
from temper.model.config import PRESETS
from temper.model.convert import save_hf
from temper.model.transformer import Transformer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran to the cat"] * 10, trainer)
    return tok


@pytest.fixture
def run_dir(tmp_path):
    tok = _tokenizer()
    final = tmp_path / "runs" / "x" / "final"
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": "<|im_end|>"}, chat_templates={"default": CHATML}), final)
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_hf(model, cfg, final, generation_config={"eos_token_id": [0, 1]})
    return tmp_path / "runs" / "x", model, tok


def test_loads_model_tokenizer_template_and_stop_ids(run_dir):
    path, model, tok = run_dir
    loaded = load_for_inference(path, dtype=torch.bfloat16)
    assert loaded.path == path / "final"
    assert loaded.stop_ids == [0, 1, tok.token_to_id("<|im_end|>")]
    assert loaded.chat_template == CHATML and not loaded.model.training
    assert loaded.model.tok_emb.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.model.tok_emb.weight.float(), model.tok_emb.weight.bfloat16().float())
    ids = loaded.encode_chat([{"role": "user", "content": "the cat"}])
    assert loaded.tokenizer.decode(ids) == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert open_checkpoint(path).stop_ids == loaded.stop_ids  # everything but the weights, the same way


def test_failures_name_the_checkpoint(run_dir, tmp_path):
    path, _, tok = run_dir
    final = path / "final"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'nowhere'}: not a directory"):
        load_for_inference(tmp_path / "nowhere")
    (final / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match=rf"checkpoint {final}: stop ids \[1000000\] are outside the vocabulary"):
        open_checkpoint(path)
    (final / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match=f"checkpoint {final}: .*eos_token_id must be an id or a list"):
        open_checkpoint(path)
    config = json.loads((final / "config.json").read_text())
    (final / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    with pytest.raises(ValueError, match=f"the tokenizer has {tok.get_vocab_size()} tokens but the model only 100 embeddings"):
        open_checkpoint(path)
    (final / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=f"checkpoint {final}: no tokenizer.json in {final}"):
        open_checkpoint(path)
