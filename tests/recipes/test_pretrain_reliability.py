"""RELIABILITY rows 3, 4, 5, 13, 14, 15, 16 and 31 for `temper pretrain`, end to end (test_pretrain.py has
the single-process basics these complete).

In one process: every sample once per epoch across resumes (3), a SIGTERM in the middle of a gradient
accumulation saves at the step boundary (4), the learning rate after a resume equals an uninterrupted
run's through warmup, stable and decay (5; cosine is checked by test_pretrain's `assert_same_run`), and
resume-config mismatches (31). On two gloo ranks: skip / fail / rollback with a NaN on rank 1 (14),
SIGTERM in the first step, in eval and mid-run (15), a torchrun elastic restart (16) and resumes across
1 <-> 2 ranks (13). The two-rank runs share start-ups: one pair of processes runs all of rows 14 and 15,
one torchrun job covers rows 16 and 13.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from temper import __main__ as cli
from temper import config
from temper.config import ConfigError
from temper.data.loader import TokenWindows
from temper.data.shards import ShardWriter, read_manifest, write_manifest
from temper.model.config import ModelConfig
from temper.model.transformer import Transformer
from temper.train.checkpoint import load_checkpoint
from temper.train.parallel import ELASTIC_STORE_FIX
from temper.train.run import EXIT_PREEMPTED
from temper.train.step import eval_loss
from tests.recipes import test_pretrain
from tests.recipes.test_pretrain import TINY, final_weights, metrics, train

char_data = test_pretrain.char_data  # the same prepared text (a module fixture: prepared once here too)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TEMPER_FAULT": ""}


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())


def loss_at(ckpt: Path, data: Path, start: int, count: int) -> float:
    """Mean loss of a checkpoint's weights on global training samples [start, start + count): what the
    step that follows it logs when it trains on exactly those samples."""
    cfg = json.loads((ckpt / "state.json").read_text())["config"]
    model = Transformer(config.from_dict(ModelConfig, cfg["model"]))
    load_checkpoint(ckpt, model=model, optimizer=None)
    windows = TokenWindows(data, "train", cfg["train"]["seq_len"], seed=cfg["run"]["seed"], order=cfg["data"]["order"])
    return eval_loss(model, [windows.batch(start, count)])


# ---- row 3: every sample exactly once per epoch across resumes ---------------------------------------------


def forty_windows(source: Path, out: Path, seq_len: int) -> Path:
    """A train split of exactly 40 windows of `seq_len` whose first token is the window's id (0..39), with
    the tokenizer of `source`."""
    manifest = read_manifest(source)
    vocab = manifest["vocab_size"]
    tokens = (np.arange(40 * seq_len + 1) * 7 + 41) % (vocab - 40) + 40  # filler ids never equal an id
    tokens[: 40 * seq_len : seq_len] = np.arange(40)
    writer = ShardWriter(out, "train", vocab_size=vocab, eot_id=None)
    writer.add(tokens)
    write_manifest(out, vocab_size=vocab, eot_id=manifest["eot_id"], splits={"train": writer.close()}, stats={})
    shutil.copy(source / manifest["tokenizer"], out / manifest["tokenizer"])
    return out


def test_every_sample_once_per_epoch_across_resumes(char_data, tmp_path, monkeypatch):
    """Row 3: 40 samples, 3 epochs of 8 steps x 5, interrupted so that the run resumes mid-epoch (step 2),
    at the epoch boundary (step 8) and twice within the third epoch (steps 18 and 22). What the loop
    actually trains on is recorded, each attempt cut at the checkpoint the next one resumed from."""
    data = forty_windows(char_data, tmp_path / "data", seq_len=8)
    seen: list[list[int]] = []
    batch = TokenWindows.batch

    def recording(self, start, count, device="cpu"):
        x, y = batch(self, start, count, device)
        seen[-1].append(x[:, 0].tolist())  # the ids of this step's samples
        return x, y

    monkeypatch.setattr(TokenWindows, "batch", recording)
    flags = ["--train.steps=24", "--train.micro_batch_size=5", "--train.seq_len=8", "--data.order=sequential"]
    run, resumed_at, trained = tmp_path / "r", [0], []
    for crash in (3, 9, 19, 23, None):
        seen.append([])
        if crash is None:
            assert train(data, tmp_path, "r", *flags) == 0
            trained += seen[-1]
            break
        with pytest.raises(SystemExit):
            train(data, tmp_path, "r", *flags, env=f"crash:step={crash}")
        assert len(seen[-1]) == crash - resumed_at[-1]  # the steps this attempt trained
        resumed_at.append(int(checkpoints(run)[-1].split("-")[1]))
        trained += seen[-1][: resumed_at[-1] - resumed_at[-2]]  # what the next attempt builds on
    assert resumed_at == [0, 2, 8, 18, 22]
    assert seen[1][0] == seen[0][2]  # the lost step 2 is replayed with the same samples
    ids = [i for step in trained for i in step]
    assert len(ids) == 120
    for epoch in range(3):
        assert sorted(ids[40 * epoch : 40 * (epoch + 1)]) == list(range(40)), f"epoch {epoch}"
    assert ids[:40] != ids[40:80]  # and each epoch is shuffled anew


# ---- row 4: a SIGTERM in the middle of an accumulation is deferred to the step boundary ----------------


def test_sigterm_mid_accumulation_saves_at_the_step_boundary(char_data, tmp_path):
    """Row 4: accumulation 4 (global batch 256 tokens = 2 x 32 x 4). SIGTERM arrives during the second
    micro-batch's forward of step 5: the checkpoint is step 5's, whole (samples = 5 steps x 8), the saves
    count optimizer steps (every 2), and the resumed run equals the uninterrupted one bit for bit."""
    accum = ["--train.global_batch_tokens=256"]
    assert train(char_data, tmp_path, "ref", *accum) == 0
    forwards = []

    def signal_in_step_5(module, args):
        if type(module) is Transformer and module.training:
            forwards.append(1)
            if len(forwards) == 4 * 4 + 2:  # step index 4, micro-batch 2 of 4
                os.kill(os.getpid(), signal.SIGTERM)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(signal_in_step_5)
    try:
        assert train(char_data, tmp_path, "term", *accum) == EXIT_PREEMPTED
    finally:
        hook.remove()
    assert len(forwards) == 5 * 4  # the step in progress finished all four micro-batches
    assert checkpoints(tmp_path / "term") == ["step-0000002", "step-0000004", "step-0000005"]
    assert state(tmp_path / "term", 5)["samples"] == 5 * 8
    assert train(char_data, tmp_path, "term", *accum) == 0
    ref, term = metrics(tmp_path / "ref"), metrics(tmp_path / "term")
    assert [ref[s]["loss"] for s in range(1, 9)] == [term[s]["loss"] for s in range(1, 9)]
    wa, wb = final_weights(tmp_path / "ref"), final_weights(tmp_path / "term")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- row 5: the learning rate after a resume is the uninterrupted run's ----------------------------------


def test_lr_after_resume_equals_the_uninterrupted_run_warmup_and_wsd(char_data, tmp_path):
    """Row 5, against a run: WSD with 3 warmup steps and half the run decaying, resumed once inside the
    warmup (from step 2) and once inside the decay (from step 6). The logged lr of every step equals the
    uninterrupted run's. (Cosine: test_pretrain's resumes compare lr too.)"""
    wsd = ["--schedule.kind=wsd", "--schedule.warmup_steps=3", "--schedule.decay_fraction=0.5"]
    assert train(char_data, tmp_path, "ref", *wsd) == 0
    for crash in (3, 7):
        with pytest.raises(SystemExit):
            train(char_data, tmp_path, "resumed", *wsd, env=f"crash:step={crash}")
    assert train(char_data, tmp_path, "resumed", *wsd) == 0
    ref, resumed = metrics(tmp_path / "ref"), metrics(tmp_path / "resumed")
    lrs = [ref[s]["lr"] for s in range(1, 9)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(3e-3) == lrs[3] == lrs[4]  # warmup, then stable
    assert lrs[4] > lrs[5] > lrs[6] > lrs[7] == pytest.approx(3e-4)  # decay to min_lr_ratio 0.1
    assert [resumed[s]["lr"] for s in range(1, 9)] == lrs
    assert [resumed[s]["loss"] for s in range(1, 9)] == [ref[s]["loss"] for s in range(1, 9)]


# ---- row 31: a resume with other settings fails unless overridden ----------------------------------------


def test_resume_mismatch_of_batch_or_schedule_fails_unless_overridden(char_data, tmp_path, capsys):
    """Row 31 (seq_len is in test_pretrain): the global batch, the schedule and the peak lr are checked
    against the checkpoint before any weight is read; the CLI says so in one line with exit code 2;
    --run.override_checkpoint_config=true resumes anyway. Unknown keys, also in a YAML file, say 'did you mean'."""
    with pytest.raises(SystemExit):
        train(char_data, tmp_path, "r", env="crash:step=3")
    for flag, key in [("--train.global_batch_tokens=128", "train.global_batch_tokens"),
                      ("--schedule.kind=wsd", "schedule"), ("--schedule.warmup_steps=3", "schedule"),
                      ("--optim.lr=1e-3", "optim.lr"), ("--train.steps=9", "train.steps")]:
        with pytest.raises(ConfigError, match=f"resume config mismatch \\({key}: checkpoint"):
            train(char_data, tmp_path, "r", flag)
    argv = ["pretrain", *TINY, f"--data.dir={char_data}", f"--run.dir={tmp_path}", "--run.name=r", "--schedule.kind=wsd"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume config mismatch (schedule: checkpoint" in err[0] and "override" in err[0]
    assert train(char_data, tmp_path, "r", "--train.global_batch_tokens=128", "--schedule.kind=wsd",
                 "--run.override_checkpoint_config=true") == 0
    assert metrics(tmp_path / "r")[3]["tokens"] == 2 * 64 + 128  # resumed at step 2 with the new batch
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("schedule:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'schedule.warmup' \\(did you mean 'schedule.warmup_steps'"):
        train(char_data, tmp_path, "y", "--config", str(yaml_file))


# ---- rows 14 and 15 on two gloo ranks: one pair of processes runs every scenario --------------------------

_RANKS_SCRIPT = textwrap.dedent(
    """
    import datetime, faulthandler, json, os, sys
    import torch.distributed as dist
    from temper.recipes import pretrain
    from temper.train.step import NonFiniteLoss

    faulthandler.dump_traceback_later(240, exit=True)  # a lost peer fails the test instead of hanging it
    data, run_dir, flags = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    rank, calls = int(os.environ["RANK"]), iter(range(100))

    def go(name, *extra, fault=""):
        os.environ["TEMPER_FAULT"] = fault
        # A fresh file rendezvous per run (pretrain joins the group that exists and leaves it at the end):
        # re-joining through one TCP store would meet the previous group's keys.
        dist.init_process_group("gloo", init_method=f"file://{run_dir}/pg-{next(calls)}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=120))
        argv = [*flags, f"--data.dir={data}", f"--run.dir={run_dir}", f"--run.name={name}", *extra]
        try:
            return pretrain.main(argv)
        except NonFiniteLoss as e:
            return str(e)

    results = {
        "ref": go("ref"),
        "term": [go("term", fault="sigterm:step=0:rank=1"), go("term", fault="sigterm_in_eval:step=4:rank=1"),
                 go("term", fault="sigterm:step=5:rank=0"), go("term")],
        "skip": go("skip", "--train.on_nonfinite=skip", "--checkpoint.every=1", fault="nan_loss:step=3:rank=1"),
        "fail": go("fail", "--checkpoint.every=1", fault="nan_loss:step=3:rank=1"),
        "rollback": go("rollback", "--train.on_nonfinite=rollback", "--train.rollback_skip_steps=2",
                       fault=f"nan_loss:step=5:rank=1:once={run_dir}/fired"),
    }
    with open(f"{run_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def two_ranks(char_data, tmp_path_factory) -> Path:
    """Two plain processes (RANK 0 and 1, what torchrun starts) each running, in turn: an uninterrupted
    run, a run stopped by three SIGTERMs then finished, and the skip, fail and rollback runs."""
    run = tmp_path_factory.mktemp("ranks")
    script = run / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(char_data), str(run), json.dumps(TINY)],
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=280)[0] for p in procs]
    finally:
        for p in procs:  # a rank that died must not leave the other blocked
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return run


def _results(run: Path) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_on_one_of_two_ranks_checkpoints_all_and_resumes_exactly(two_ranks):
    """Row 15 on 2 ranks: a SIGTERM to one rank in (c) the first step, (b) eval and (a) a later step. Each
    time both ranks save at the next step boundary (each its RNG file), both return 143, and the run
    resumed three times equals the uninterrupted one bit for bit."""
    for r in _results(two_ranks):
        assert r["ref"] == 0 and r["term"] == [EXIT_PREEMPTED] * 3 + [0]
    term = two_ranks / "term"
    assert checkpoints(term) == ["step-0000001", "step-0000002", "step-0000004", "step-0000006", "step-0000008"]
    for step in (1, 4, 6):  # the three SIGTERM saves: written by both ranks
        manifest = json.loads((term / "checkpoints" / f"step-{step:07d}" / "manifest.json").read_text())
        assert manifest["world_size"] == 2 and {"rng-rank0.pt", "rng-rank1.pt"} <= manifest["files"].keys()
    ref, got = metrics(two_ranks / "ref"), metrics(term)
    assert [got[s]["loss"] for s in range(1, 9)] == [ref[s]["loss"] for s in range(1, 9)]
    val_ref, val = metrics(two_ranks / "ref", "val"), metrics(term, "val")
    assert [val[s]["val_loss"] for s in (4, 8)] == [val_ref[s]["val_loss"] for s in (4, 8)]
    wa, wb = final_weights(two_ranks / "ref"), final_weights(term)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.distributed
@pytest.mark.slow
def test_nonfinite_on_rank_1_skip_fail_rollback(two_ranks, char_data):
    """Row 14 on 2 ranks, NaN on rank 1 only. skip: no update on either rank (weights and optimizer state of
    step 4 are step 3's; the next loss is step 3's weights on the next samples, averaged over both ranks),
    the schedule does not advance, skipped_steps counts it. fail: both ranks raise at step 3, nothing saved
    after step 3. rollback (K=2): reload step 4 and continue from the batch K after the bad one."""
    skip, ref = metrics(two_ranks / "skip"), metrics(two_ranks / "ref")
    assert [skip[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert skip[4]["loss"] is None and [skip[s]["loss"] for s in (1, 2, 3)] == [ref[s]["loss"] for s in (1, 2, 3)]
    assert [skip[s]["lr"] for s in range(5, 9)] == [ref[s]["lr"] for s in range(4, 8)]  # scheduler held still
    ckpt = two_ranks / "skip" / "checkpoints"
    w3, w4 = load_file(ckpt / "step-0000003" / "model.safetensors"), load_file(ckpt / "step-0000004" / "model.safetensors")
    assert all(torch.equal(w3[k], w4[k]) for k in w3)
    o3, o4 = (torch.load(ckpt / f"step-000000{s}" / "optim.pt", weights_only=True)["state"] for s in (3, 4))
    assert all(torch.equal(o3[p][k], o4[p][k]) for p in o3 for k in o3[p])
    assert state(two_ranks / "skip", 4)["skipped_steps"] == 1 and state(two_ranks / "skip", 4)["samples"] == 16
    assert skip[5]["loss"] == pytest.approx(loss_at(ckpt / "step-0000003", char_data, 16, 4), rel=1e-6)

    for r in _results(two_ranks):
        assert r["fail"].startswith("non-finite loss or gradient at step 3")
    assert checkpoints(two_ranks / "fail") == ["step-0000001", "step-0000002", "step-0000003"]

    rb = metrics(two_ranks / "rollback")
    assert (two_ranks / "fired").exists() and sorted(rb) == list(range(1, 9))
    assert [rb[s]["loss"] for s in range(1, 5)] == [ref[s]["loss"] for s in range(1, 5)]
    # The NaN came at samples [20, 24): back to step 4, then on from sample 20 + 2 steps x 4 = 28.
    assert rb[5]["tokens"] == (28 + 4) * 32
    assert rb[5]["loss"] == pytest.approx(loss_at(two_ranks / "rollback" / "checkpoints" / "step-0000004",
                                                  char_data, 28, 4), rel=1e-6)
    assert state(two_ranks / "rollback", 8)["samples"] == (28 + 4 * 4)


# ---- rows 16 and 13: a torchrun elastic restart, and resumes across 1 <-> 2 ranks ------------------------


@pytest.fixture(scope="module")
def elastic(char_data, tmp_path_factory) -> tuple[Path, str]:
    """One process (micro-batch 4) runs 8 steps: the reference. A torchrun job of 2 ranks (micro-batch 2,
    the same global batch) with --max-restarts=1 starts from the reference's step-2 checkpoint (1 -> 2
    ranks); rank 1 crashes once at step 5, torchrun restarts both and they resume from step 4. Launched as
    the README says (with ELASTIC_STORE_FIX), so temper does not warn about restarts."""
    root = tmp_path_factory.mktemp("elastic")
    torch.set_num_threads(1)
    assert train(char_data, root, "ref", "--train.micro_batch_size=4") == 0
    (root / "elastic" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "ref" / "checkpoints" / "step-0000002", root / "elastic" / "checkpoints" / "step-0000002")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "temper", "pretrain", *TINY, f"--data.dir={char_data}", f"--run.dir={root}", "--run.name=elastic"]
    # A new TCP store for each attempt: with torchrun's shared one a restart often cannot connect (pytorch#135712).
    key, value = ELASTIC_STORE_FIX.split("=")
    env = {**ENV, "TEMPER_FAULT": f"crash:step=5:rank=1:once={root / 'crashed'}", key: value}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return root, out.stdout + out.stderr


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # As row 10: DDP's all-reduce sums in another order; Adam turns 1e-7 into ~1e-6 on near-zero biases.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_and_matches(elastic):
    """Row 16: rank 1 dies once at step 5; torchrun restarts the job, which resumes from the newest
    checkpoint (step 4, written by both ranks) and finishes with the reference's losses and weights."""
    root, out = elastic
    assert (root / "crashed").exists() and "TEMPER_FAULT crash at step 5 on rank 1" in out
    assert out.count("temper pretrain: ") == 2  # the first start and the restart
    assert "temper: warning: torchrun --max-restarts" not in out
    ref, got = metrics(root / "ref"), metrics(root / "elastic")
    assert sorted(got) == list(range(3, 9))  # each step once: the crashed attempt's step 5 was rewound
    torch.testing.assert_close([got[s]["loss"] for s in range(3, 9)], [ref[s]["loss"] for s in range(3, 9)],
                               rtol=1e-6, atol=1e-7)
    _close(final_weights(root / "ref"), final_weights(root / "elastic"))


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_across_one_and_two_ranks(elastic, char_data):
    """Row 13 both ways. 1 -> 2: the job above started from a 1-rank checkpoint; rank 1, which has no RNG
    file there, is reseeded with a warning, and the steps match the 1-rank reference. 2 -> 1: its step-6
    checkpoint (2 ranks) resumed by one process with micro-batch 4 finishes like the reference. The data
    position is the global sample count, whatever the ranks; model and optimizer load on either side."""
    root, out = elastic
    assert "has no rng-rank1.pt; reseeding rank 1" in out
    six = root / "elastic" / "checkpoints" / "step-0000006"
    assert json.loads((six / "manifest.json").read_text())["world_size"] == 2
    assert state(root / "elastic", 6)["samples"] == state(root / "ref", 6)["samples"] == 6 * 4
    back = root / "back"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copytree(six, back / "checkpoints" / six.name)
    assert train(char_data, root, "back", "--train.micro_batch_size=4") == 0
    ref, got = metrics(root / "ref"), metrics(back)
    torch.testing.assert_close([got[s]["loss"] for s in (7, 8)], [ref[s]["loss"] for s in (7, 8)],
                               rtol=1e-6, atol=1e-7)
    _close(final_weights(root / "ref"), final_weights(back))
    opt_ref, opt_back = (torch.load(r / "checkpoints" / "step-0000008" / "optim.pt", weights_only=True)["state"]
                         for r in (root / "ref", back))
    for p in opt_ref:
        _close(opt_ref[p], opt_back[p])
