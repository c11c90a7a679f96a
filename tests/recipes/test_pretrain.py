"""End-to-end pretraining on real text with the RELIABILITY harness's tiny model.

Rows 1, 2, 4 (exact resume: plain, with dropout, with accumulation), 6 (kill -9 mid-checkpoint),
10 (torchrun DDP == one process), 14 (skip / rollback), 15 (SIGTERM), 31 (resume mismatch),
the Hugging Face export of `final/`, and training on a weighted mixture of two datasets.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from temper.config import ConfigError
from temper.recipes import prepare, pretrain
from temper.train import checkpoint as ckpt
from temper.train.run import EXIT_PREEMPTED
from tests.ranks import run_ranks

TINY = [
    "--preset=debug", "--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--model.max_seq_len=32",
    "--train.micro_batch_size=2", "--train.steps=8", "--checkpoint.every=2", "--checkpoint.keep_last_n=0",
    "--eval.every=4", "--eval.batches=2", "--log.progress=false", "--log.plots=false",
    "--schedule.warmup_steps=2", "--optim.lr=3e-3", "--run.device=cpu",
]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory, request) -> Path:
    from tests.conftest import SHARED_DATA

    src = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not src.exists():
        pytest.skip("shared data missing")
    root = tmp_path_factory.mktemp("char")
    (root / "shakespeare.txt").write_text(src.read_text()[:60_000])
    out = root / "data"
    assert prepare.main([f"--input={root / 'shakespeare.txt'}", f"--out={out}", "--tokenizer.kind=char",
                         "--txt_docs=paragraph", "--val_fraction=0.1", "--workers=1"]) == 0
    return out


@pytest.fixture(scope="module")
def more_data(char_data, tmp_path_factory) -> Path:
    """A second dataset: later Shakespeare text, encoded with char_data's tokenizer."""
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("more")
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()[200_000:230_000]
    (root / "more.txt").write_text(text)
    out = root / "more"
    assert prepare.main([f"--input={root / 'more.txt'}", f"--out={out}", "--tokenizer.kind=file",
                         f"--tokenizer.path={char_data / 'tokenizer.json'}", "--txt_docs=paragraph",
                         "--val_fraction=0.1", "--workers=1", "--progress=false"]) == 0
    return out


def train(char_data, run_dir, name, *extra, env=None):
    """char_data: one prepared directory, or a list of them (a mixture, given as repeated flags)."""
    data = [f"--data.dir={d}" for d in (char_data if isinstance(char_data, list) else [char_data])]
    argv = [*TINY, *data, f"--run.dir={run_dir}", f"--run.name={name}", *extra]
    old = os.environ.pop("TEMPER_FAULT", None)
    if env:
        os.environ["TEMPER_FAULT"] = env
    try:
        return pretrain.main(argv)
    finally:
        os.environ.pop("TEMPER_FAULT", None)
        if old is not None:
            os.environ["TEMPER_FAULT"] = old


def ranks_train(char_data, run_dir, name, ranks: int, *extra: str, fault: str = "") -> str:
    """`temper pretrain` with TINY on `ranks` gloo processes forked from this one (the layout tests' runs, as
    torchrun's workers run it: tests/ranks.py); returns their output, and fails the test on a non-zero exit."""
    argv = [*TINY, f"--data.dir={char_data}", f"--run.dir={run_dir}", f"--run.name={name}", *extra]
    return run_ranks(pretrain.main, argv, ranks, Path(run_dir) / f"{name}-logs", env={"TEMPER_FAULT": fault})


def metrics(run: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_run(a: Path, b: Path, steps=range(5, 9)):
    ma, mb = metrics(a), metrics(b)
    assert [ma[s]["loss"] for s in steps] == [mb[s]["loss"] for s in steps]  # bit for bit
    assert [ma[s]["lr"] for s in steps] == [mb[s]["lr"] for s in steps]  # row 5: the cosine lr after a resume
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


GLM_BALANCED = ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.pos=rope", "--model.bias=false",
                "--model.ffn_dim=48", "--model.n_experts=4", "--model.router_scores=sigmoid",
                "--model.expert_choice_bias=true", "--model.shared_expert_ffn_dim=48", "--model.dense_layers=1",
                "--train.expert_bias_rate=0.01"]
"""GLM-4.5's routing, its choice biases moved after each step (buffers the checkpoint carries)."""
QWEN3_5 = ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.pos=rope", "--model.bias=false",
           "--model.norm_unit_offset=true", "--model.qk_norm=true", "--model.rope_dim=8", "--model.attn_output_gate=true",
           "--model.full_attention_every=2", "--model.linear_value_heads=4"]
"""Qwen3.5's layers: a Gated DeltaNet layer, then a gated attention one."""
LFM2 = ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.pos=rope", "--model.bias=false", "--model.qk_norm=true",
        "--model.attention_layers=[1]", "--model.linear_layer=short_conv", "--model.linear_conv_size=3"]
"""LFM2's layers: a short convolution, then an attention layer."""
FALCON_MAMBA = ["--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.pos=rope", "--model.bias=false",
                "--model.attention_layers=[]", "--model.no_mlp_layers=[0,1]",
                "--model.linear_layer=mamba", "--model.linear_key_heads=1", "--model.linear_value_heads=64",
                "--model.linear_key_size=8", "--model.linear_value_size=1", "--model.linear_bcdt_eps=1e-6"]
"""FalconMamba's layers: Mamba mixers alone, their steps, B and C normalised (the scan recomputed in the backward)."""


@pytest.mark.parametrize("extra", [[], ["--model.dropout=0.1"], ["--train.global_batch_tokens=256"], GLM_BALANCED,
                                   QWEN3_5, LFM2, FALCON_MAMBA],
                         ids=["plain", "dropout", "accum4", "choice-bias", "linear-attention", "short-conv", "mamba"])
def test_exact_resume(char_data, tmp_path, extra):
    """Rows 1, 2, 4: stop after the step-4 checkpoint, resume, and match the uninterrupted run bitwise."""
    assert train(char_data, tmp_path, "ref", *extra) == 0
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "resumed", *extra, env="crash:step=5")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")) == [
        "step-0000002", "step-0000004"]
    assert train(char_data, tmp_path, "resumed", *extra) == 0
    assert_same_run(tmp_path / "ref", tmp_path / "resumed")
    optim_a = torch.load(tmp_path / "ref/checkpoints/step-0000008/optim.pt", weights_only=True)
    optim_b = torch.load(tmp_path / "resumed/checkpoints/step-0000008/optim.pt", weights_only=True)
    for sa, sb in zip(optim_a["state"].values(), optim_b["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps))  # row 32: no duplicated steps after resume


def test_whole_model_compile_trains_as_eager_and_resumes_exactly(char_data, tmp_path, monkeypatch):
    """train.compile_scope=model (the model and its loss as one graph; aot_eager here: dynamo and autograd tracing
    without code generation, quick on a CPU): the eager run's losses and weights, under the same names, and an
    exact resume from the step-4 checkpoint."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    compiled = ["--train.compile=true", "--train.compile_scope=model"]
    try:
        assert train(char_data, tmp_path, "eager") == 0
        assert train(char_data, tmp_path, "ref", *compiled) == 0
        with pytest.raises(SystemExit):
            train(char_data, tmp_path, "resumed", *compiled, env="crash:step=5")
        assert train(char_data, tmp_path, "resumed", *compiled) == 0
    finally:
        torch._dynamo.reset()
    assert_same_run(tmp_path / "ref", tmp_path / "resumed")
    eager, ref = metrics(tmp_path / "eager"), metrics(tmp_path / "ref")
    assert eager.keys() == ref.keys() == set(range(1, 9))
    for s in eager:
        assert ref[s]["loss"] == pytest.approx(eager[s]["loss"], rel=1e-5)
    we, wc = final_weights(tmp_path / "eager"), final_weights(tmp_path / "ref")
    assert we.keys() == wc.keys()  # no `_orig_mod.` prefix: checkpoints do not depend on the scope
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-5, atol=1e-5, msg=k)
    ckpt_e, ckpt_c = (load_file(r / "checkpoints/step-0000004/model.safetensors") for r in (tmp_path / "eager", tmp_path / "ref"))
    assert ckpt_e.keys() == ckpt_c.keys()


def _cli(char_data, run_dir, name, *extra, env=None):
    cmd = [sys.executable, "-m", "temper", "pretrain", *TINY, f"--data.dir={char_data}", f"--run.dir={run_dir}",
           f"--run.name={name}", *extra]
    env = {**os.environ, "TEMPER_FAULT": env or "", "OMP_NUM_THREADS": "1"}  # as the in-process runs
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_kill_9_during_checkpoint_then_resume(char_data, tmp_path):
    """Row 6: SIGKILL while writing step 6; the restart resumes from step 4 and matches the reference."""
    assert train(char_data, tmp_path, "ref") == 0
    proc = _cli(char_data, tmp_path, "killed", env="kill_during_save:step=6")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "step-0000006.tmp").exists() and not (ckpts / "step-0000006").exists()
    assert train(char_data, tmp_path, "killed") == 0
    assert not (ckpts / "step-0000006.tmp").exists()
    assert_same_run(tmp_path / "ref", tmp_path / "killed")


def test_sigterm_writes_a_checkpoint_and_resume_matches(char_data, tmp_path):
    """Row 15: SIGTERM mid-run -> checkpoint at the next step boundary, exit 143, exact resume."""
    long = ["--train.steps=400", "--checkpoint.every=0", "--eval.every=0"]
    stop = "crash:step=60"  # both runs stop here so the comparison stays short
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "ref", *long, env=stop)
    proc = _cli(char_data, tmp_path, "term", *long)
    metrics_file = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out
    saved = sorted((tmp_path / "term" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    k = int(saved[0].name.split("-")[1])
    assert 3 <= k < 60
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "term", *long, env=stop)
    ref, term = metrics(tmp_path / "ref"), metrics(tmp_path / "term")
    assert [ref[s]["loss"] for s in range(k + 1, 61)] == [term[s]["loss"] for s in range(k + 1, 61)]


def _wait_for_lines(path: Path, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < n):
        time.sleep(0.05)


def test_ctrl_c_writes_a_checkpoint_and_exits_like_sigterm(char_data, tmp_path):
    """Issue 13: the first Ctrl-C is a SIGTERM (checkpoint at the step boundary, exit 143), no traceback."""
    proc = _cli(char_data, tmp_path, "int", "--train.steps=400", "--checkpoint.every=0", "--eval.every=0")
    _wait_for_lines(tmp_path / "int" / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out
    assert "Traceback" not in out and "Ctrl-C again to exit at once" in out
    saved = sorted((tmp_path / "int" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and f"SIGINT: checkpoint at step {int(saved[0].name[5:])} written" in out
    ckpt.verify_checkpoint(saved[0])


def test_resume_when_every_checkpoint_is_corrupt_refuses_unless_asked(char_data, tmp_path, capsys):
    """Issue 13: resume=auto with only corrupt checkpoints names each and refuses (it used to start from step 0
    and truncate metrics.jsonl); checkpoint.fresh_if_corrupt starts again and keeps the old run's files."""
    assert train(char_data, tmp_path, "c", "--train.steps=4") == 0
    run = tmp_path / "c"
    for step in (2, 4):
        path = run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-1] + b"x")
    history = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train(char_data, tmp_path, "c", "--train.steps=4") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "every checkpoint in" in err and "--checkpoint.fresh_if_corrupt=true" in err
    assert "step-0000002/model.safetensors sha256 mismatch" in err and "step-0000004/model.safetensors sha256" in err
    assert (run / "metrics.jsonl").read_text() == history  # nothing touched
    assert train(char_data, tmp_path, "c", "--train.steps=4", "--checkpoint.fresh_if_corrupt=true") == 0
    assert "starting again from step 0" in capsys.readouterr().err
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-0000002", "step-0000002.corrupt", "step-0000004", "step-0000004.corrupt"]
    [old] = run.glob("metrics.*.jsonl")
    assert old.read_text() == history
    assert sorted(metrics(run)) == [1, 2, 3, 4]


def test_a_second_process_on_a_run_directory_is_refused(char_data, tmp_path, capsys):
    """Issue 13: a run directory in use is locked; the second process is told who holds it, before loading
    anything; the lock goes with its holder, even on kill -9."""
    script = tmp_path / "hold_lock.py"
    script.write_text(LOCK_HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(tmp_path / "busy")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(char_data, tmp_path, "busy") == 2
        err = capsys.readouterr().err
        assert f"in use by another training process (pid {holder.pid} on " in err and "hold_lock.py" in err
    finally:
        holder.kill()
        holder.wait()
    assert train(char_data, tmp_path, "busy", "--train.steps=1") == 0


LOCK_HOLDER = """import sys, time
from pathlib import Path
from temper.train.run import locked_run_dir
with locked_run_dir(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("fault, saved_at", [("sigterm:step=0", 1), ("sigterm_in_eval:step=4", 4)],
                         ids=["first-step", "during-eval"])
def test_sigterm_in_the_first_step_or_in_eval(char_data, tmp_path, fault, saved_at):
    """Row 15 (b, c): the signal is handled at the next step boundary; the resumed run matches."""
    assert train(char_data, tmp_path, "ref") == 0
    assert train(char_data, tmp_path, "term", env=fault) == EXIT_PREEMPTED
    saved = sorted(p.name for p in (tmp_path / "term" / "checkpoints").glob("step-*"))
    assert saved[-1] == f"step-{saved_at:07d}"
    assert train(char_data, tmp_path, "term") == 0
    assert_same_run(tmp_path / "ref", tmp_path / "term")


def test_ddp_two_ranks_equal_one_process(char_data, tmp_path):
    """Row 10 end to end: torchrun 2 ranks x micro-batch 2 == 1 process x micro-batch 4."""
    assert train(char_data, tmp_path, "single", "--train.micro_batch_size=4") == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "temper",
           "pretrain", *TINY, f"--data.dir={char_data}", f"--run.dir={tmp_path}", "--run.name=ddp"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    single, ddp = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert sorted(ddp) == list(range(1, 9))
    torch.testing.assert_close([ddp[s]["loss"] for s in range(1, 9)], [single[s]["loss"] for s in range(1, 9)],
                               rtol=1e-6, atol=1e-7)
    vs, vd = metrics(tmp_path / "single", "val"), metrics(tmp_path / "ddp", "val")
    torch.testing.assert_close(vd[8]["val_loss"], vs[8]["val_loss"], rtol=1e-6, atol=1e-7)
    wa, wb = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for k in wa:  # Adam divides by sqrt(v): near-zero biases amplify 1e-7 reduction-order noise to ~1e-6
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)


def test_nonfinite_skip_and_rollback(char_data, tmp_path):
    """Row 14 end to end: skip counts the skipped step; rollback reloads and finishes."""
    assert train(char_data, tmp_path, "skip", "--train.on_nonfinite=skip", env="nan_loss:step=3") == 0
    m = metrics(tmp_path / "skip")
    assert m[3]["skipped_steps"] == 0 and m[4]["skipped_steps"] == 1 and m[8]["skipped_steps"] == 1
    with pytest.raises(Exception, match="non-finite"):
        train(char_data, tmp_path, "fail", env="nan_loss:step=3")
    marker = tmp_path / "fired"
    assert train(char_data, tmp_path, "rollback", "--train.on_nonfinite=rollback",
                 env=f"nan_loss:step=5:once={marker}") == 0
    assert marker.exists() and sorted(metrics(tmp_path / "rollback")) == list(range(1, 9))


def test_a_resume_takes_the_optimizer_settings_of_its_config(char_data, tmp_path):
    """The checkpoint gives the optimizer's moments, the run's config its hyperparameters: a resume with another
    beta2 and weight decay trains with them (the checkpoint's used to come back with the optimizer's state)."""
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "r", env="crash:step=5")
    assert train(char_data, tmp_path, "r", "--optim.beta2=0.5", "--optim.weight_decay=0.01") == 0
    groups = torch.load(tmp_path / "r/checkpoints/step-0000008/optim.pt", weights_only=True)["param_groups"]
    assert {g["betas"] for g in groups} == {(0.9, 0.5)} and {g["weight_decay"] for g in groups} == {0.0, 0.01}


def test_resume_with_a_different_config_fails_unless_overridden(char_data, tmp_path):
    """Row 31."""
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "r", env="crash:step=3")
    with pytest.raises(ConfigError, match="train.seq_len"):
        train(char_data, tmp_path, "r", "--train.seq_len=16")
    assert train(char_data, tmp_path, "r", "--train.seq_len=16", "--run.override_checkpoint_config=true") == 0


def test_bad_input_is_named(char_data, tmp_path, capsys):
    assert train(tmp_path / "nowhere", tmp_path, "x") == 2
    assert "temper prepare" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # a start that fails leaves no run directory behind
    assert train(char_data, tmp_path, "../escape") == 2
    assert "invalid run name '../escape'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        train(char_data, tmp_path, "x", "--train.stepz=3")
    with pytest.raises(ConfigError, match="not a multiple"):
        train(char_data, tmp_path, "x", "--train.global_batch_tokens=100")
    with pytest.raises(ConfigError, match="train.attention=flex trains on CUDA only"):
        train(char_data, tmp_path, "x", "--train.attention=flex", "--run.device=cpu")


def test_final_is_a_hugging_face_checkpoint(char_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert train(char_data, tmp_path, "hf", "--train.steps=2") == 0
    final = tmp_path / "hf" / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (final / name).exists(), name
    hf_tok = transformers.AutoTokenizer.from_pretrained(final)
    assert hf_tok.eos_token_id == json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    assert hf_tok.decode(hf_tok("To be, or not")["input_ids"]) == "To be, or not"
    assert (tmp_path / "hf" / "report.md").exists()
    from temper.model.hf.checkpoint import load_hf

    ours, _ = load_hf(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    x = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_run(char_data, tmp_path):
    assert train(char_data, tmp_path, "plain", "--train.steps=4") == 0
    assert train(char_data, tmp_path, "ckpt", "--train.steps=4", "--train.activation_checkpointing=1") == 0
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    torch.testing.assert_close([a[s]["loss"] for s in a], [b[s]["loss"] for s in b], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(char_data, tmp_path, precision):
    assert train(char_data, tmp_path, precision, f"--train.precision={precision}", "--train.steps=6") == 0
    losses = [m["loss"] for m in metrics(tmp_path / precision).values()]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]


@pytest.mark.gpu
def test_gpu_bf16_compiled_training(char_data, tmp_path):
    assert train(char_data, tmp_path, "gpu", "--run.device=cuda", "--train.precision=bf16", "--train.compile=true",
                 "--train.steps=20") == 0
    losses = [m["loss"] for m in metrics(tmp_path / "gpu").values()]
    assert losses[-1] < losses[0]


def test_mixture_of_two_datasets_trains_reports_each_and_resumes_exactly(char_data, more_data, tmp_path):
    """Two prepared dirs mixed 3:1: per-dataset val losses, their weighted mean, and a bitwise exact resume."""
    mix, weights = [char_data, more_data], "--data.weights=[3,1]"
    assert train(mix, tmp_path, "ref", weights) == 0
    with pytest.raises(SystemExit):
        train(mix, tmp_path, "resumed", weights, env="crash:step=5")
    assert train(mix, tmp_path, "resumed", weights) == 0
    assert_same_run(tmp_path / "ref", tmp_path / "resumed")
    val = metrics(tmp_path / "ref", "val")
    assert sorted(val) == [4, 8]
    for row in val.values():
        assert row["val_loss"] == pytest.approx((3 * row["val_loss/data"] + row["val_loss/more"]) / 4)
    resumed = metrics(tmp_path / "resumed", "val")[8]
    assert all(resumed[k] == val[8][k] for k in ("val_loss", "val_loss/data", "val_loss/more"))
    # The mixture is part of the data order: resuming with other weights is a config mismatch.
    with pytest.raises(ConfigError, match="data.weights"):
        train(mix, tmp_path, "resumed", "--data.weights=[1,1]", "--train.steps=9")
    # A mixture is not the first dataset alone.
    assert train(char_data, tmp_path, "single", "--train.steps=1") == 0
    assert metrics(tmp_path / "single")[1]["loss"] != metrics(tmp_path / "ref")[1]["loss"]


def test_mixture_of_different_tokenizers_is_refused(char_data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(char_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest | {"vocab_size": manifest["vocab_size"] + 1}))
    with pytest.raises(ConfigError, match=f"different tokenizers .*{char_data} has vocab_size.*{other} has vocab_size"):
        train([char_data, other], tmp_path, "x", "--data.weights=[1,1]")
    # Same size, different ids (two BPEs of one vocab_size): the vocabularies are compared too.
    (other / "manifest.json").write_text(json.dumps(manifest))
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match="different vocabularies"):
        train([char_data, other], tmp_path, "x", "--data.weights=[1,1]")
    with pytest.raises(ConfigError, match="2 data dirs need 2 weights"):
        train([char_data, char_data], tmp_path, "x")


def test_tasks_run_during_training_as_temper_evaluate_scores_final(char_data, tmp_path, shared_data):
    from temper.recipes import evaluate

    arc = f"arc_easy={shared_data / 'arc-easy' / 'validation.jsonl'}"
    assert train(char_data, tmp_path, "tasks", f"--eval.tasks.names=[{arc}]", "--eval.tasks.every=4",
                 "--eval.tasks.limit=12") == 0
    logged = metrics(tmp_path / "tasks", kind="tasks")
    assert sorted(logged) == [4, 8] and {"arc_easy/acc", "arc_easy/acc_norm", "arc_easy/ece"} <= logged[8].keys()
    out = tmp_path / "eval"
    assert evaluate.main([f"--checkpoint={tmp_path / 'tasks'}", f"--tasks=[{arc}]", "--limit=12", f"--out={out}",
                          "--progress=false"]) == 0
    final = json.loads((out / "results.json").read_text())["results"]["arc_easy"]["metrics"]
    assert final["acc"] == logged[8]["arc_easy/acc"] and final["acc_norm"] == logged[8]["arc_easy/acc_norm"]
    with pytest.raises(ConfigError, match="eval.tasks: unknown task 'arc_eazy'"):
        train(char_data, tmp_path, "bad", "--eval.tasks.names=[arc_eazy]", "--eval.tasks.every=4")


def test_continued_pretraining_starts_from_the_given_weights(char_data, tmp_path):
    """--init.from: a run directory (its final/), a Hugging Face directory or a temper checkpoint."""
    assert train(char_data, tmp_path, "base") == 0
    assert train(char_data, tmp_path, "fresh", "--run.seed=7") == 0
    first = lambda name: metrics(tmp_path / name)[1]["loss"]  # noqa: E731
    assert train(char_data, tmp_path, "from-run", f"--init.from={tmp_path / 'base'}", "--run.seed=7") == 0
    assert first("from-run") < first("fresh") - 0.3  # it starts where the base ended, not from scratch
    last = sorted((tmp_path / "base" / "checkpoints").glob("step-*"))[-1]  # the weights final/ holds
    assert train(char_data, tmp_path, "from-ckpt", f"--init.from={last}", "--run.seed=7") == 0
    assert train(char_data, tmp_path, "from-hf", f"--init.from={tmp_path / 'base' / 'final'}", "--run.seed=7") == 0
    assert first("from-ckpt") == pytest.approx(first("from-run"), rel=1e-6) == first("from-hf")
    with pytest.raises(ConfigError, match="fixes the model's shape: model.dim=64"):
        train(char_data, tmp_path, "bad", f"--init.from={last}", "--model.dim=64")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{not json")
    for src, why in [(tmp_path / "none", "no such directory"), (char_data, "no config.json"),
                     (tmp_path / "broken", "Expecting property name")]:
        with pytest.raises(ConfigError, match=f"init.from {src}: .*{why}"):  # one line, before any training
            train(char_data, tmp_path, "bad", f"--init.from={src}")
