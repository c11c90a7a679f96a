"""`temper sft` end to end on a tiny Llama-layout checkpoint and the real Alpaca rows: the checker,
LoRA / full / QLoRA / prefix runs whose loss falls, exact resume, and final/ in Hugging Face layout."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from temper import config
from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS
from temper.model.convert import load_hf, save_hf
from temper.model.transformer import Transformer
from temper.recipes import sft

ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca" / "stanford_alpaca_first100.json"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

pytestmark = pytest.mark.skipif(not ALPACA.exists(), reason=f"shared data not found at {ALPACA}")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama-layout model with a ChatML tokenizer trained on the Alpaca outputs."""
    root = tmp_path_factory.mktemp("base")
    rows = json.loads(ALPACA.read_text())
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows]
    tok = train_tokenizer(texts, "bpe", 600, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": CHATML})
    # Untied, so LoRA can adapt the head too; widths that NF4's blocks (64 x 256 values) divide.
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=512, tie_embeddings=False,
                  dim=256, ffn_dim=512)
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, root)
    save_hf_tokenizer(hf_tok, root)
    return root


def args(base: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"--model={base}", f"--data.files=[{ALPACA}]", "--data.max_length=256", f"--run.dir={tmp}",
            f"--run.name={name}", "--train.micro_batch_size=4", "--progress=false", "--eval.every=0", *extra]


def losses(run: Path, kind: str = "train", key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r.get("kind", "train") == kind and key in r]


def test_check_prints_marked_examples_and_passes(base, tmp_path, capsys):
    assert sft.main(args(base, tmp_path, "check", "--check")) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "OK" in out


def test_lora_learns_and_exports_a_merged_model_and_a_peft_adapter(base, tmp_path):
    assert sft.main(args(base, tmp_path, "lora", "--train.steps=30", "--optim.lr=1e-2", "--eval.val_fraction=0.05",
                         "--lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,head]")) == 0
    run = tmp_path / "lora"
    loss = losses(run)
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5, loss
    # Pinned (seeded model, tokenizer, order and adapters): a change in masking, packing or the step shows here.
    assert loss[0] == pytest.approx(6.4431, abs=2e-4) and loss[-1] == pytest.approx(5.5832, abs=2e-3), loss
    final = run / "final"
    assert (final / "adapter" / "adapter_config.json").exists() and (final / "tokenizer_config.json").exists()
    merged, cfg = load_hf(final)
    assert cfg.hf_architecture == "LlamaForCausalLM" and not any("lora" in k for k in merged.state_dict())
    assert losses(run, "val", "val_loss")  # the held-out examples were scored at the end


def test_resume_continues_exactly(base, tmp_path, monkeypatch):
    common = ("--train.steps=6", "--checkpoint.every=3", "--lora.dropout=0.1")
    assert sft.main(args(base, tmp_path, "straight", *common)) == 0
    monkeypatch.setenv("TEMPER_FAULT", "crash:step=3")
    with pytest.raises(SystemExit, match="crash at step 3"):
        sft.main(args(base, tmp_path, "resumed", *common))
    monkeypatch.delenv("TEMPER_FAULT")
    assert sft.main(args(base, tmp_path, "resumed", *common)) == 0
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    with pytest.raises(config.ConfigError, match="made with other lora"):  # not the same run: refused
        sft.main(args(base, tmp_path, "resumed", "--train.steps=6", "--checkpoint.every=3", "--lora.rank=4"))


@pytest.mark.parametrize("method", ["full", "qlora", "prefix"])
def test_other_methods_learn(base, tmp_path, method):
    lr = {"full": "1e-3", "qlora": "1e-2", "prefix": "1e-2"}[method]
    assert sft.main(args(base, tmp_path, method, f"--method={method}", "--train.steps=20", f"--optim.lr={lr}",
                         "--lora.targets=[q_proj,v_proj,head]")) == 0
    loss = losses(tmp_path / method)
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4, loss
    assert (tmp_path / method / "final" / "model.safetensors").exists()


def test_bad_data_is_named(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n')
    assert sft.main(args(base, tmp_path, "bad", f"--data.files=[{bad}]")) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "role" in err
