"""`temper reward` end to end on a tiny Llama-layout checkpoint and real hh-rlhf pairs: the loss falls
and the training pairs' accuracy rises, held-out accuracy is logged, final/ loads in transformers as a
sequence classifier with temper's scores, resume is exact, and 2 DDP ranks equal one process."""

import json
from pathlib import Path

import pytest
import torch

from temper.data.prefs import PrefDataConfig, collate_pairs, load_pref_examples
from temper.data.tokenizer import load_hf_tokenizer
from temper.model.heads import load_reward_model
from temper.recipes import reward
from tests.ranks import temper_on_ranks
from tests.recipes.conftest import HH

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HH.exists(), reason=f"shared data not found at {HH}")


def args(base, tmp: Path, name: str, *extra: str) -> list[str]:
    model, data = base
    return [f"--model={model}", f"--data.files=[{data}]", "--data.max_length=128", f"--run.dir={tmp}",
            f"--run.name={name}", "--train.micro_batch_size=4", "--log.progress=false", "--log.plots=false",
            "--log.every=1", "--eval.every=0",
            "--eval.val_fraction=0.2", "--optim.lr=3e-3", "--lora.dropout=0", *extra]


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind", "train") == kind]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reward_model_learns_and_exports_a_sequence_classifier(hh_base, tmp_path, method):
    """Two epochs of the 51 training pairs (13 steps each): the second epoch's mean loss is lower."""
    lr = "1e-3" if method == "full" else "3e-3"
    assert reward.main(args(hh_base, tmp_path, method, f"--method={method}", "--train.steps=26", "--eval.every=26",
                            "--loss.center_coef=0.01", f"--optim.lr={lr}")) == 0
    train = rows(tmp_path / method, "train")
    assert len(train) == 26 and "accuracy" in train[-1] and "margin" in train[-1]
    first, second = (sum(r["loss"] for r in train[i:i + 13]) / 13 for i in (0, 13))
    assert second < 0.9 * first
    val = rows(tmp_path / method, "val")
    assert [r["step"] for r in val] == [0, 26] and 0.0 <= val[-1]["val_accuracy"] <= 1.0
    # final/ scores pairs in transformers exactly as temper does
    final = tmp_path / method / "final"
    tok = load_hf_tokenizer(final)
    pairs = load_pref_examples(PrefDataConfig(files=[str(hh_base[1])], max_length=128), tok)[:3]
    b = collate_pairs(pairs, pad_id=tok.pad_id)
    ours = load_reward_model(final)(b.inputs, last=b.lengths - 1)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        theirs = hf(input_ids=b.inputs, attention_mask=(torch.arange(b.inputs.shape[1]) < b.lengths[:, None]).long())
    torch.testing.assert_close(ours.detach(), theirs.logits[:, 0], rtol=1e-4, atol=1e-4)


def test_resume_continues_exactly(hh_base, tmp_path, monkeypatch):
    common = ("--train.steps=4", "--checkpoint.every=2", "--method=lora")
    assert reward.main(args(hh_base, tmp_path, "straight", *common)) == 0
    monkeypatch.setenv("TEMPER_FAULT", "crash:step=2")
    with pytest.raises(SystemExit, match="crash at step 2"):
        reward.main(args(hh_base, tmp_path, "resumed", *common))
    monkeypatch.delenv("TEMPER_FAULT")
    assert reward.main(args(hh_base, tmp_path, "resumed", *common)) == 0
    assert [r["loss"] for r in rows(tmp_path / "straight", "train")] == [r["loss"] for r in rows(tmp_path / "resumed", "train")]


def test_tracked_in_mlflow(hh_base, tmp_path):
    """--log.mlflow in a recipe other than pretrain (the scaffold's, which every training recipe shares)."""
    pytest.importorskip("mlflow")
    from temper.train.log import default_mlflow_uri
    from tests.train.test_mlflow import PLOTTED, assert_tracked

    assert reward.main(args(hh_base, tmp_path, "m", "--method=lora", "--train.steps=2", "--eval.every=2",
                            *PLOTTED)) == 0
    _, run = assert_tracked(default_mlflow_uri(tmp_path / "m"), tmp_path / "m")
    assert run.data.params["method"] == "lora" and "val/val_accuracy" in run.data.metrics


@pytest.mark.distributed
def test_ddp_two_ranks_equal_one_process(hh_base, tmp_path):
    common = ("--train.steps=3", "--run.device=cpu")
    assert reward.main(args(hh_base, tmp_path, "single", *common)) == 0
    argv = args(hh_base, tmp_path, "ddp", *common, "--train.micro_batch_size=2")
    temper_on_ranks(["reward", *argv], 2, tmp_path / "ddp-logs")
    single, ddp = rows(tmp_path / "single", "train"), rows(tmp_path / "ddp", "train")
    torch.testing.assert_close([r["loss"] for r in ddp], [r["loss"] for r in single], rtol=1e-5, atol=0)
