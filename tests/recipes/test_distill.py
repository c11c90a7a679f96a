"""`temper distill` end to end on real text: a teacher briefly pretrained on Shakespeare (char tokenizer) and
a smaller student from scratch; on SFT rows (Alpaca) with a ChatML tokenizer. The loss falls and final/
loads; a top-k cache of the whole vocabulary gives the on-the-fly run exactly (pretraining windows, and
packed SFT rows across an epoch boundary), and is reused on resume, which continues exactly; tokenizers
that differ are refused in one line; DDP on 2 ranks equals one process."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from temper.__main__ import main as temper_main
from temper.align.distill import DistillLoss
from temper.data.tokenizer import HFTokenizer, save_hf_tokenizer, train_tokenizer
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import load_hf, save_hf
from temper.model.transformer import Transformer
from temper.recipes import distill, prepare, pretrain
from temper.train import checkpoint as ckpt
from temper.train.losses import IGNORE_INDEX
from tests.ranks import temper_on_ranks
from tests.templates import CHATML

ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca" / "stanford_alpaca_first100.json"
STUDENT = "--student.model={dim: 32, n_layers: 1, n_heads: 2, max_seq_len: 32}"


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    from tests.conftest import SHARED_DATA

    src = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not src.exists():
        pytest.skip("shared data missing")
    root = tmp_path_factory.mktemp("char")
    (root / "shakespeare.txt").write_text(src.read_text()[:60_000])
    out = root / "data"
    assert prepare.main([f"--input={root / 'shakespeare.txt'}", f"--out={out}", "--tokenizer.kind=char",
                         "--txt_docs=paragraph", "--val_fraction=0.1", "--workers=1", "--progress=false"]) == 0
    return out


@pytest.fixture(scope="module")
def teacher(char_data, tmp_path_factory) -> Path:
    """A 2-layer model pretrained for 60 steps: a teacher that knows more than a fresh student."""
    root = tmp_path_factory.mktemp("teacher")
    assert pretrain.main([f"--data.dir={char_data}", f"--run.dir={root}", "--run.name=t", "--preset=debug",
                          "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.max_seq_len=32",
                          "--train.micro_batch_size=8", "--train.steps=60", "--eval.every=0", "--checkpoint.every=0",
                          "--schedule.warmup_steps=5", "--optim.lr=3e-3", "--log.progress=false",
                          "--log.plots=false", "--run.device=cpu"]) == 0
    return root / "t"


def loop(tmp: Path, name: str) -> list[str]:
    """The run, batch, schedule and evaluation flags, which `temper pretrain` shares."""
    return [f"--run.dir={tmp}", f"--run.name={name}", "--train.micro_batch_size=4", "--train.steps=6", "--eval.every=0",
            "--eval.batches=2", "--checkpoint.every=0", "--schedule.warmup_steps=2", "--optim.lr=3e-3",
            "--log.progress=false", "--log.plots=false", "--run.device=cpu"]


def args(teacher: Path, data: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"--teacher.path={teacher}", f"--data.dir={data}", STUDENT, *loop(tmp, name), *extra]


def rows(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind", "train") == kind]


def vocab(teacher: Path) -> int:
    return json.loads((teacher / "final" / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize(("kind", "metric"), [("forward_kl", "kl"), ("reverse_kl", "kl"), ("jsd", "jsd")])
def test_loss_falls_and_final_loads(char_data, teacher, tmp_path, kind, metric):
    assert distill.main(args(teacher, char_data, tmp_path, kind, f"--loss.kind={kind}", "--train.steps=10")) == 0
    train = rows(tmp_path / kind)
    assert train[-1]["loss"] < train[0]["loss"] and train[-1][metric] < train[0][metric]
    assert "ce" in train[-1]
    val = rows(tmp_path / kind, "val")
    assert [r["step"] for r in val] == [0, 10] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert f"val_{metric}" in val[-1]
    model, cfg = load_hf(tmp_path / kind / "final")
    assert (cfg.dim, cfg.vocab_size) == (32, vocab(teacher))
    assert (tmp_path / kind / "final" / "tokenizer.json").is_file()


def test_cache_of_the_whole_vocabulary_equals_on_the_fly_and_resumes_exactly(char_data, teacher, tmp_path, capsys):
    """k = V in float32: the cached run is the on-the-fly run. A crash after step 2 and a restart reuse the
    cache (built once) and end with the same weights and losses as the straight run."""
    cache = ("--teacher.cache=true", f"--teacher.top_k={vocab(teacher)}", "--teacher.cache_dtype=float32",
             "--checkpoint.every=2")
    assert distill.main(args(teacher, char_data, tmp_path, "live")) == 0
    assert distill.main(args(teacher, char_data, tmp_path, "straight", *cache)) == 0
    live, straight = rows(tmp_path / "live"), rows(tmp_path / "straight")
    torch.testing.assert_close([r["loss"] for r in straight], [r["loss"] for r in live], rtol=1e-5, atol=1e-6)
    os.environ["TEMPER_FAULT"] = "crash:step=2"
    try:
        with pytest.raises(SystemExit, match="crash at step 2"):
            distill.main(args(teacher, char_data, tmp_path, "resumed", *cache))
    finally:
        del os.environ["TEMPER_FAULT"]
    capsys.readouterr()
    assert distill.main(args(teacher, char_data, tmp_path, "resumed", *cache)) == 0
    assert "reusing the teacher's top-" in capsys.readouterr().err
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "resumed")] == [r["loss"] for r in straight]


def test_alpha_zero_is_pretraining_the_same_student(char_data, teacher, tmp_path):
    """The baseline of "distilled vs not at equal tokens": with alpha 0 the run is `temper pretrain` of the same
    shape, init, data order and schedule, loss for loss."""
    assert distill.main(args(teacher, char_data, tmp_path, "a0", "--loss.alpha=0")) == 0
    shape = ("--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--model.max_seq_len=32")
    assert pretrain.main([f"--data.dir={char_data}", *loop(tmp_path, "pre"), "--preset=debug", *shape,
                          "--data.order=sequential"]) == 0
    a0, pre = rows(tmp_path / "a0"), rows(tmp_path / "pre")
    torch.testing.assert_close([r["loss"] for r in a0], [r["loss"] for r in pre], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows(tmp_path / "a0", "val")[-1]["val_loss"], rows(tmp_path / "pre", "val")[-1]["val_loss"],
                               rtol=1e-5, atol=1e-6)


def test_top_k_cache_trains_from_a_small_k(char_data, teacher, tmp_path):
    assert distill.main(args(teacher, char_data, tmp_path, "k8", "--teacher.cache=true", "--teacher.top_k=8",
                             "--train.steps=10", "--loss.alpha=1")) == 0
    train = rows(tmp_path / "k8")
    assert train[-1]["kl"] < train[0]["kl"]
    manifest = json.loads((tmp_path / "k8" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["k"] == 8 and manifest["bytes_per_position"] == 8 * 6


def test_tokenizers_that_differ_are_refused_in_one_line(char_data, teacher, tmp_path, capsys):
    other = tmp_path / "other"
    tok = train_tokenizer(["a completely different alphabet: xyz 0123"], "char", 0, ["<|endoftext|>"])
    cfg = replace(PRESETS["debug"], vocab_size=vocab(teacher), max_seq_len=32)
    save_hf(Transformer(cfg), cfg, other)
    save_hf_tokenizer(HFTokenizer(tok, {"eos_token": "<|endoftext|>"}), other)
    code = temper_main(["distill", f"--teacher.path={teacher}", f"--data.dir={char_data}", f"--student.from={other}",
                        *loop(tmp_path, "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "student.from" in err and "tokenizer is not the teacher's" in err
    # The data's tokenizer too: the teacher distils over the ids the shards hold.
    code = temper_main(["distill", f"--teacher.path={other}", f"--data.dir={char_data}", f"--run.dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "data.dir" in err and "tokenizer is not the teacher's" in err
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory) -> Path:
    """A tiny Llama-layout model with a ChatML tokenizer trained on the Alpaca rows (random weights suffice
    to check the SFT path's bookkeeping)."""
    if not ALPACA.exists():
        pytest.skip("shared data missing")
    root = tmp_path_factory.mktemp("chat")
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in json.loads(ALPACA.read_text())]
    tok = train_tokenizer(texts, "bpe", 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"default": CHATML})
    cfg = replace(PRESETS["debug-llama"], vocab_size=tok.get_vocab_size(), max_seq_len=128)
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, root)
    save_hf_tokenizer(hf_tok, root)
    return root


def test_sft_rows_cache_equals_on_the_fly_across_epochs(chat_teacher, tmp_path):
    """Packed SFT rows (prompts masked): the whole-vocabulary cache, indexed by example, gives the on-the-fly
    losses over 2 epochs of freshly packed rows."""
    common = [f"--teacher.path={chat_teacher}", f"--data.files=[{ALPACA}]", "--data.max_length=128",
              "--student.preset=debug-llama", "--student.model={dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1}",
              f"--run.dir={tmp_path}", "--train.micro_batch_size=8", "--train.epochs=2", "--eval.every=0",
              "--eval.val_fraction=0.1", "--schedule.warmup_steps=2", "--optim.lr=3e-3", "--log.progress=false",
              "--log.plots=false", "--run.device=cpu", "--checkpoint.every=0"]
    assert distill.main([*common, "--run.name=live"]) == 0
    k = json.loads((chat_teacher / "config.json").read_text())["vocab_size"]
    assert distill.main([*common, "--run.name=cached", "--teacher.cache=true", f"--teacher.top_k={k}",
                         "--teacher.cache_dtype=float32"]) == 0
    live, cached = rows(tmp_path / "live"), rows(tmp_path / "cached")
    assert live[-1]["epoch"] >= 1  # the second epoch re-packs the rows and still finds its examples' entries
    torch.testing.assert_close([r["loss"] for r in cached], [r["loss"] for r in live], rtol=1e-5, atol=1e-6)
    assert live[-1]["loss"] < live[0]["loss"]
    assert rows(tmp_path / "live", "val")[-1]["val_loss"] < rows(tmp_path / "live", "val")[0]["val_loss"]


@pytest.mark.distributed
def test_ddp_two_ranks_equal_one_process(char_data, teacher, tmp_path):
    """With the top-k cache built by both ranks (each its share of the windows), the teacher on the fly, and
    on-policy steps (each rank samples its rows, seeded by their global index)."""
    for name, extra in (("fly", ()), ("cache", ("--teacher.cache=true", "--teacher.top_k=8")),
                        ("gkd", ("--on_policy.lmbda=1", "--on_policy.max_new_tokens=6"))):
        common = ("--train.steps=3", "--eval.every=3", *extra)
        assert distill.main(args(teacher, char_data, tmp_path, f"single-{name}", *common)) == 0
        temper_on_ranks(["distill", *args(teacher, char_data, tmp_path, f"ddp-{name}", *common,
                                          "--train.micro_batch_size=2")], 2, tmp_path / f"ddp-{name}-logs")
        single, ddp = rows(tmp_path / f"single-{name}"), rows(tmp_path / f"ddp-{name}")
        torch.testing.assert_close([r["loss"] for r in ddp], [r["loss"] for r in single], rtol=1e-5, atol=0)
        torch.testing.assert_close([r["kl"] for r in ddp], [r["kl"] for r in single], rtol=1e-4, atol=1e-6)
        sv, dv = rows(tmp_path / f"single-{name}", "val"), rows(tmp_path / f"ddp-{name}", "val")
        torch.testing.assert_close(dv[-1]["val_loss"], sv[-1]["val_loss"], rtol=1e-5, atol=0)


def test_student_from_a_temper_checkpoint_or_a_run_without_final(char_data, teacher, tmp_path, capsys):
    """student.from takes a run's checkpoints/step-N (its shape from the stored config, its tokenizer the run's
    data's) and a run directory without final/ (its newest checkpoint): both start from the weights the teacher's
    final/ export holds, loss for loss. A path that is none of these is refused in one line naming it."""
    step = ckpt.list_checkpoints(teacher)[-1]
    no_final = tmp_path / "no_final"
    shutil.copytree(teacher / "checkpoints", no_final / "checkpoints")
    losses = {}
    for name, src in (("hf", teacher / "final"), ("step", step), ("run", no_final)):
        assert distill.main([f"--teacher.path={teacher}", f"--data.dir={char_data}", f"--student.from={src}",
                             *loop(tmp_path, name), "--train.steps=2"]) == 0
        losses[name] = [r["loss"] for r in rows(tmp_path / name)]
    assert losses["step"] == losses["hf"] and losses["run"] == losses["hf"]
    assert load_hf(tmp_path / "step" / "final")[1].dim == 64  # the teacher's shape, from the checkpoint's config
    capsys.readouterr()
    for bad in (tmp_path / "absent", tmp_path / "no_final" / "checkpoints"):
        code = temper_main(["distill", f"--teacher.path={teacher}", f"--data.dir={char_data}", f"--student.from={bad}",
                            *loop(tmp_path, "bad")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "student.from" in err and str(bad) in err, err
    assert not (tmp_path / "bad").exists()


def test_sft_prompt_is_the_example_before_its_last_learnt_span():
    ids = np.arange(10)
    assert distill.sft_prompt(ids, np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], bool)) == [0, 1, 2, 3, 4, 5, 6]
    assert distill.sft_prompt(ids, np.ones(10, bool)) == [0]  # all learnt: the first token prompts
    assert distill.sft_prompt(ids, np.zeros(10, bool)) == list(range(10))  # nothing learnt: nothing to sample


def test_sampled_batch_holds_the_students_samples_as_targets():
    """lmbda = 1's batch: each prompt continued by the student (seeded per prompt, whatever else is in the batch),
    the prompt unlearnt, the sampled tokens the targets, and the distillation loss on them finite."""
    V, seq = 50, 16
    cfg = replace(PRESETS["debug"], vocab_size=V, max_seq_len=seq)
    torch.manual_seed(0)
    student, teacher = Transformer(cfg), Transformer(cfg).eval()
    data = torch.randint(0, V, (3, seq), generator=torch.Generator().manual_seed(1))
    prompts = [data[0, :5].tolist(), data[1, :9].tolist(), data[2, :3].tolist()]
    kw = {"seq_len": seq, "temperature": 1.0, "max_new_tokens": 0, "stop_ids": [], "pad_id": 0, "pack": False}
    batch = distill.sampled_batch(student, prompts, [11, 12, 13], **kw)
    assert student.training  # generation ran in eval mode and restored it
    valid = batch.targets != IGNORE_INDEX
    for r, p in enumerate(prompts):
        assert torch.equal(batch.inputs[r, :len(p)], torch.tensor(p))
        assert not valid[r, :len(p) - 1].any() and valid[r, len(p) - 1:seq - 1].all()  # to the row's end
        assert torch.equal(batch.targets[r, :seq - 1][valid[r, :seq - 1]], batch.inputs[r, len(p):])
    assert not torch.equal(batch.inputs[:, 5:], data[:, 5:])  # not the data's continuation
    alone = distill.sampled_batch(student, prompts[1:2], [12], **kw)
    assert torch.equal(alone.inputs[0], batch.inputs[1])
    capped = distill.sampled_batch(student, prompts, [11, 12, 13], **kw | {"max_new_tokens": 2, "pack": True})
    assert int((capped.targets != IGNORE_INDEX).sum()) == 6 and capped.inputs.shape[0] < 3  # packed
    out = DistillLoss("jsd", alpha=1.0, teacher=teacher)(student, batch)
    assert torch.isfinite(out.loss_sum) and out.loss_sum > 0


def test_on_policy_off_is_todays_run_and_on_policy_resumes_exactly(char_data, teacher, tmp_path):
    """lmbda 0 (with every other on-policy option set) is the off-policy run, loss for loss. lmbda 0.5 draws
    on-policy steps from (seed, step): run.seed 1337 gives steps 0-3 off, off, on, off; a crash before step 2
    and a restart end with the weights and losses of the straight run."""
    steps = ("--train.steps=4", "--checkpoint.every=2")
    on = ("--on_policy.max_new_tokens=8", "--on_policy.temperature=0.9", "--on_policy.prompt_tokens=12")
    assert distill.main(args(teacher, char_data, tmp_path, "off", *steps)) == 0
    assert distill.main(args(teacher, char_data, tmp_path, "zero", *steps, *on, "--on_policy.lmbda=0")) == 0
    assert [r["loss"] for r in rows(tmp_path / "zero")] == [r["loss"] for r in rows(tmp_path / "off")]
    half = (*steps, *on, "--on_policy.lmbda=0.5")
    assert distill.main(args(teacher, char_data, tmp_path, "straight", *half)) == 0
    straight = rows(tmp_path / "straight")
    assert [r["on_policy"] for r in straight] == [0.0, 0.0, 1.0, 0.0]
    assert all(math.isfinite(r["loss"]) for r in straight)
    assert straight[2]["loss"] == straight[2]["kl"]  # on-policy: the divergence alone
    assert [r["loss"] for r in straight[:2]] == [r["loss"] for r in rows(tmp_path / "off")[:2]]  # before any sample
    os.environ["TEMPER_FAULT"] = "crash:step=2"
    try:
        with pytest.raises(SystemExit, match="crash at step 2"):
            distill.main(args(teacher, char_data, tmp_path, "resumed", *half))
    finally:
        del os.environ["TEMPER_FAULT"]
    assert distill.main(args(teacher, char_data, tmp_path, "resumed", *half)) == 0
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "resumed")] == [r["loss"] for r in straight]


def test_on_policy_sft_samples_the_responses(chat_teacher, tmp_path):
    """lmbda 1 on SFT rows: every step samples each example's response after its prompt; the loss is finite."""
    assert distill.main([f"--teacher.path={chat_teacher}", f"--data.files=[{ALPACA}]", "--data.max_length=128",
                         "--student.preset=debug-llama", "--student.model={dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1}",
                         f"--run.dir={tmp_path}", "--run.name=gkd", "--train.micro_batch_size=4", "--train.steps=2",
                         "--eval.every=0", "--eval.val_fraction=0.1", "--log.progress=false",
                         "--log.plots=false", "--run.device=cpu",
                         "--checkpoint.every=0", "--on_policy.lmbda=1", "--on_policy.max_new_tokens=8",
                         "--loss.kind=jsd"]) == 0
    train = rows(tmp_path / "gkd")
    assert [r["on_policy"] for r in train] == [1.0, 1.0]
    assert all(math.isfinite(r["loss"]) and r["loss"] == r["jsd"] for r in train)


def test_on_policy_with_a_top_k_cache_is_refused(char_data, teacher, tmp_path, capsys):
    code = temper_main(["distill", *args(teacher, char_data, tmp_path, "c"), "--teacher.cache=true",
                        "--on_policy.lmbda=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "on_policy.lmbda" in err and "teacher.cache" in err
