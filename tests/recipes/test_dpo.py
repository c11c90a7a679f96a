"""`temper dpo` end to end on a tiny Llama-layout checkpoint and real hh-rlhf pairs: the checker, LoRA
and full runs whose held-out reward accuracy is logged and whose loss falls, the precomputed
reference equal to the live one, exact resume, and DDP on 2 ranks equal to one process."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from temper.__main__ import main as temper_main
from temper.config import ConfigError
from temper.data.prefs import read_pref_records
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import read_hf_config, save_hf
from temper.model.transformer import Transformer
from temper.recipes import dpo, reward
from tests.ranks import temper_on_ranks
from tests.recipes.conftest import HH

pytestmark = pytest.mark.skipif(not HH.exists(), reason=f"shared data not found at {HH}")


def args(base, tmp: Path, name: str, *extra: str) -> list[str]:
    model, data = base
    return [f"--model={model}", f"--data.files=[{data}]", "--data.max_length=128", f"--run.dir={tmp}",
            f"--run.name={name}", "--train.micro_batch_size=4", "--log.progress=false", "--log.plots=false",
            "--eval.every=0",
            "--eval.val_fraction=0.2", "--optim.lr=5e-3", "--lora.dropout=0", *extra]


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind", "train") == kind]


def test_check_prints_both_sides(hh_base, tmp_path, capsys):
    assert dpo.main(args(hh_base, tmp_path, "check", "--check")) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "chosen" in out.lower() and "rejected" in out.lower()


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo", "orpo", "apo_zero"])
def test_lora_learns_the_preferences(hh_base, tmp_path, kind):
    """On the training pairs the margin grows and the loss falls; TRL's metrics are logged."""
    assert dpo.main(args(hh_base, tmp_path, kind, f"--loss.kind={kind}", "--train.steps=8", "--eval.every=8")) == 0
    train = rows(tmp_path / kind, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in train[-1]
    val = rows(tmp_path / kind, "val")
    assert [r["step"] for r in val] == [0, 8] and "val_rewards/accuracies" in val[-1]
    assert (tmp_path / kind / "final" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kind", ["sigmoid", "kto"])
def test_a_linear_attention_model_learns_with_a_row_per_sequence(hh_base, tmp_path, kind):
    """Qwen3.5's Gated DeltaNet layers keep one state per row, so its responses cannot branch off a shared prompt:
    each sequence takes a row of its own (DPO's pairs; KTO's examples and mismatched rows), and the run learns."""
    model_dir, data = hh_base
    cfg = replace(PRESETS["debug-qwen3.5"], vocab_size=read_hf_config(model_dir).vocab_size, max_seq_len=256,
                  tie_embeddings=False)
    torch.manual_seed(0)
    hybrid = save_hf(Transformer(cfg), cfg, tmp_path / "hybrid")
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, hybrid / f.name)
    targets = "--lora.targets=[q_proj,v_proj,in_proj_qkv,in_proj_z,out_proj]"
    assert dpo.main(args((hybrid, data), tmp_path, kind, f"--loss.kind={kind}", "--train.steps=8", targets)) == 0
    train = rows(tmp_path / kind, "train")
    assert train[-1]["loss"] < train[0]["loss"]


def test_kto_learns_from_the_pairs_unpaired(hh_base, tmp_path):
    """KTO: each pair's chosen response desirable, its rejected one not; the desirable rewards rise
    above the undesirable ones, and the KL reference point is logged."""
    assert dpo.main(args(hh_base, tmp_path, "kto", "--loss.kind=kto", "--train.steps=8", "--eval.every=8")) == 0
    train = rows(tmp_path / "kto", "train")
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["kl"] >= 0
    assert train[-1]["rewards/desirable"] - train[-1]["rewards/undesirable"] > train[0]["rewards/desirable"] - train[0][
        "rewards/undesirable"]
    assert "val_rewards/accuracies" in rows(tmp_path / "kto", "val")[-1]
    with pytest.raises(ValueError, match="reference=precomputed does not apply to kto"):
        dpo.main(args(hh_base, tmp_path, "kto2", "--loss.kind=kto", "--loss.reference=precomputed"))
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        dpo.main(args(hh_base, tmp_path, "exo", "--loss.kind=exo_pair"))


def unpaired_file(hh_base, path: Path, n_desirable: int, n_undesirable: int) -> Path:
    """TRL's unpaired KTO records in its conversational form: the first pairs' chosen responses as
    desirable examples, then the first pairs' rejected ones as undesirable examples."""
    pairs = read_pref_records(str(hh_base[1]))
    rows = [{"prompt": r.prompt, "completion": [{"role": "assistant", "content": r.chosen}], "label": True}
            for r in pairs[:n_desirable]]
    rows += [{"prompt": r.prompt, "completion": [{"role": "assistant", "content": r.rejected}], "label": False}
             for r in pairs[:n_undesirable]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_trains_on_unpaired_examples_each_once_with_its_label(hh_base, tmp_path, capsys):
    """12 desirable and 4 undesirable examples, one epoch in 2 steps of 8: each example is seen once with its
    own label (the logged counts sum to the data's), the imbalance is reported, KTO's metrics are written."""
    data = unpaired_file(hh_base, tmp_path / "kto.jsonl", 12, 4)
    assert dpo.main(args((hh_base[0], data), tmp_path, "kto", "--loss.kind=kto", "--train.steps=2",
                         "--train.micro_batch_size=8", "--eval.val_fraction=0")) == 0
    out = capsys.readouterr()
    assert "kto on unpaired examples: 12 desirable, 4 undesirable in training" in out.out
    assert "16 train / 0 val examples, 2 steps of 8 examples" in out.out
    assert "warning: desirable_weight x 12 desirable / (undesirable_weight x 4 undesirable) = 3" in out.err
    assert "loss.desirable_weight in [0.333, 0.444]" in out.err
    train = rows(tmp_path / "kto", "train")
    assert [r["step"] for r in train] == [1, 2]
    assert sum(r["count/desirable"] for r in train) == 12 and sum(r["count/undesirable"] for r in train) == 4
    for r in train:
        assert math.isfinite(r["loss"]) and r["kl"] >= 0
        assert {"rewards/desirable", "rewards/undesirable", "rewards/accuracies"} <= set(r)
    assert (tmp_path / "kto" / "final" / "adapter" / "adapter_model.safetensors").exists()

    assert dpo.main(args((hh_base[0], data), tmp_path, "check", "--loss.kind=kto", "--check")) == 0
    out = capsys.readouterr().out
    assert "16 unpaired examples, 12 desirable and 4 undesirable" in out and "undesirable); learnt text" not in out
    assert "completion: [[" in out and out.rstrip().endswith("OK")


def test_unpaired_data_with_another_loss_fails_before_anything_loads(hh_base, tmp_path, capsys):
    data = unpaired_file(hh_base, tmp_path / "kto.jsonl", 3, 3)
    nowhere = (tmp_path / "no-model", data)  # the error comes before the model's directory is read
    with pytest.raises(ConfigError, match=r"^loss\.kind=sigmoid: the data is unpaired examples"):
        dpo.main(args(nowhere, tmp_path, "dpo"))
    assert temper_main(["dpo", *args(nowhere, tmp_path, "orpo", "--loss.kind=orpo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("temper dpo: config error: loss.kind=orpo: the data is unpaired") and err.count("\n") == 1
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size=1: kto on unpaired examples needs at least 2"):
        dpo.main(args(nowhere, tmp_path, "kto", "--loss.kind=kto", "--train.micro_batch_size=1"))
    with pytest.raises(ConfigError, match=r"^data\.files: the data is unpaired examples .* needs pairs"):
        reward.main([f"--model={nowhere[0]}", f"--data.files=[{data}]", f"--run.dir={tmp_path}"])


def test_kto_balance_warning_follows_the_papers_range():
    assert dpo.kto_balance_warning(10, 10, 1.0, 1.0) == ""
    assert dpo.kto_balance_warning(12, 10, 1.0, 1.0) == ""  # 1.2 is in [1, 4/3]
    assert dpo.kto_balance_warning(10, 30, 3.0, 1.0) == ""  # weighted: 30 / 30
    assert "= 0.5, outside" in dpo.kto_balance_warning(10, 20, 1.0, 1.0)
    assert "all 5 training examples are desirable" in dpo.kto_balance_warning(5, 0, 1.0, 1.0)


def test_full_and_precomputed_reference_give_the_same_run(hh_base, tmp_path):
    """A frozen copy computing the reference every step, or its log-probs computed once: one run."""
    common = ("--method=full", "--train.steps=3", "--optim.lr=1e-3")
    assert dpo.main(args(hh_base, tmp_path, "live", *common)) == 0
    assert dpo.main(args(hh_base, tmp_path, "pre", *common, "--loss.reference=precomputed")) == 0
    live, pre = rows(tmp_path / "live", "train"), rows(tmp_path / "pre", "train")
    torch.testing.assert_close([r["loss"] for r in pre], [r["loss"] for r in live], rtol=1e-5, atol=1e-6)
    assert live[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference


def test_resume_continues_exactly(hh_base, tmp_path, monkeypatch):
    common = ("--train.steps=4", "--checkpoint.every=2")
    assert dpo.main(args(hh_base, tmp_path, "straight", *common)) == 0
    monkeypatch.setenv("TEMPER_FAULT", "crash:step=2")
    with pytest.raises(SystemExit, match="crash at step 2"):
        dpo.main(args(hh_base, tmp_path, "resumed", *common))
    monkeypatch.delenv("TEMPER_FAULT")
    assert dpo.main(args(hh_base, tmp_path, "resumed", *common)) == 0
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "straight", "train")] == [r["loss"] for r in rows(tmp_path / "resumed", "train")]


@pytest.mark.distributed
def test_ddp_two_ranks_equal_one_process(hh_base, tmp_path):
    common = ("--train.steps=3", "--eval.every=3", "--run.device=cpu")
    assert dpo.main(args(hh_base, tmp_path, "single", *common)) == 0
    argv = args(hh_base, tmp_path, "ddp", *common, "--train.micro_batch_size=2")
    temper_on_ranks(["dpo", *argv], 2, tmp_path / "ddp-logs")
    single, ddp = rows(tmp_path / "single", "train"), rows(tmp_path / "ddp", "train")
    torch.testing.assert_close([r["loss"] for r in ddp], [r["loss"] for r in single], rtol=1e-5, atol=0)
    # margins are beta x differences of ~300-nat log-prob sums: float32 leaves ~1e-5 of them to reduction order
    torch.testing.assert_close([r["rewards/margins"] for r in ddp], [r["rewards/margins"] for r in single],
                               rtol=1e-4, atol=1e-5)
