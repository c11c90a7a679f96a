"""One loader for generate, evaluate and lm-eval: a run directory means its final/, the stop ids are
generation_config's, config.json's and the tokenizer's EOS, the chat template comes with the tokenizer,
and every failure names the checkpoint before any weights are read."""

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from temper.__main__ import main as temper_main
from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer
from temper.infer.load import load_for_inference, open_checkpoint
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.hf.files import CheckpointError
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
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nowhere'}: not a directory"):
        load_for_inference(tmp_path / "nowhere")
    (final / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(CheckpointError, match=rf"checkpoint {final}: stop ids \[1000000\] are outside the vocabulary"):
        open_checkpoint(path)
    (final / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(CheckpointError, match=f"checkpoint {final}: .*eos_token_id must be an id or a list"):
        open_checkpoint(path)
    for text, why in (("{broken", "invalid JSON"), ("[1, 2]", "must be a JSON object, got list"),
                      (b"\xff\xfe{}", "not UTF-8")):
        gen = final / "generation_config.json"
        gen.write_bytes(text) if isinstance(text, bytes) else gen.write_text(text)
        with pytest.raises(CheckpointError, match=f"{gen}: {why}"):
            open_checkpoint(path)
    (final / "generation_config.json").unlink()
    config = json.loads((final / "config.json").read_text())
    (final / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    with pytest.raises(ValueError, match=f"the tokenizer has {tok.get_vocab_size()} tokens but the model only 100 embeddings"):
        open_checkpoint(path)
    (final / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=f"checkpoint {final}: no tokenizer.json in {final}"):
        open_checkpoint(path)


def _hub_snapshot(final: Path, cache: Path) -> Path:
    """`final` laid out as `temper download` without --out leaves it (huggingface_hub's cache):
    models--o--n/snapshots/<commit>/<file> -> ../../blobs/<sha256>."""
    repo = cache / "models--o--n"
    blobs, snap = repo / "blobs", repo / "snapshots" / ("0123456789abcdef" * 2 + "01234567")
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(final.iterdir()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob.name}")
    return snap


def test_a_hub_snapshot_reads_through_every_entry_point(run_dir, tmp_path, capsys):
    """One rule for symlinked checkpoint files (temper.files.checkpoint_file): generate and estimate
    read a hub snapshot as evaluate and sft do."""
    path, model, _ = run_dir
    snap = _hub_snapshot(path / "final", tmp_path / "hub")
    assert all((snap / n).is_symlink() for n in ("config.json", "model.safetensors", "tokenizer.json"))
    assert temper_main(["generate", f"--checkpoint={snap}", "--prompt=the cat", "--max_new_tokens=2",
                        "--temperature=0", "--device=cpu"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert temper_main(["estimate", f"--model.path={snap}"]) == 0
    assert f"temper estimate: {snap}" in capsys.readouterr().out
    loaded = load_for_inference(snap)
    torch.testing.assert_close(loaded.model.tok_emb.weight, model.tok_emb.weight, rtol=0, atol=0)
    # what the rule refuses: a link to something that is not a regular file, or to nothing
    (snap / "generation_config.json").unlink()
    (snap / "generation_config.json").symlink_to("../../blobs/gone")
    assert temper_main(["generate", f"--checkpoint={snap}", "--prompt=the cat", "--device=cpu"]) == 2
    assert "generation_config.json: a broken symlink (to ../../blobs/gone)" in capsys.readouterr().err
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to("/dev/null")
    assert temper_main(["estimate", f"--model.path={snap}"]) == 2
    assert "config.json: not a regular file" in capsys.readouterr().err


def test_trust_remote_code_is_threaded_and_needs_a_pinned_commit(run_dir):
    path, _, _ = run_dir
    for load in (open_checkpoint, load_for_inference):
        with pytest.raises(CheckpointError, match="trust_remote_code needs revision=<a 40-hex commit"):
            load(path, trust_remote_code=True, revision="main")
    assert open_checkpoint(path, trust_remote_code=True, revision="a" * 40).path == path / "final"
