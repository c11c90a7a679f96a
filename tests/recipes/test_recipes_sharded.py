"""Every fine-tuning and alignment recipe under FSDP2 (`--train.parallel.dp_shard=2`, 2 gloo ranks) against one
process with the same global batch (which 2 DDP ranks equal, as each recipe's own test shows):

    sft      full; QLoRA (an NF4 base, torchao's tensor subclass, sharded too); LoRA (its adapter exported in
             PEFT's format) with a benchmark task every 2 steps, which every rank runs on the sharded model
    reward   LoRA on a `RewardModel` (the head and adapters train; the model exported merged)
    dpo      full: the reference a frozen copy made before the layout
    distill  a student from scratch, the teacher frozen and replicated, half its steps on the student's own
             samples (generation with the sharded model)
    grpo     LoRA, a KL term (the reference: the policy with its adapters off), rollouts on the engine
    ppo      full: a frozen reference copy, a shared value head, a replicated reward model; the policy samples
             through its `ActorCritic` (`align.rl.Actor`)

Every sharded run crashes at the start of step 3 (steps count from 1 in the logs), after its DCP checkpoint of
step 2, and resumes from it. Its training and held-out losses then equal the reference's (rtol 1e-5: the
reductions run in another order), and its final/ export, read back with `load_hf` / `load_reward_model`, holds
the reference's weights (rtol 1e-4, atol 1e-5: Adam turns reduction-order noise into ~1e-6 on small weights).
Held-out sets deal unevenly over the ranks (13 pairs, 5 SFT rows, 3 prompts), so the void micro-batches and the
engine's lockstep (`infer.engine._Lockstep`) run too.

The sharded runs share one torchrun launch, this file run as a module (`drive`): each recipe joins and leaves
the process group in turn, since a launch costs more than a run of these tiny models.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._C._distributed_c10d import _get_work_registry_size

from temper.model.heads import load_reward_model
from temper.model.hf.checkpoint import load_hf
from temper.recipes import distill, dpo, grpo, ppo, reward, sft
from tests.ranks import free_port
from tests.recipes import test_sft

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ALPACA = DATA / "alpaca" / "stanford_alpaca_first100.json"
ARC = DATA / "arc-easy" / "validation.jsonl"

# The fixture: 8 runs in one process, then 8 sharded ones, each crashed and resumed, in one launch.
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not (ALPACA.exists() and ARC.exists()), reason=f"shared data not found at {DATA}")]

base = test_sft.base
"""A model whose widths NF4's blocks divide, with a tokenizer trained on the Alpaca rows."""
RECIPES = {"sft": sft, "reward": reward, "dpo": dpo, "distill": distill, "grpo": grpo, "ppo": ppo}
COMMON = ["--train.steps=4", "--checkpoint.every=2", "--eval.every=2", "--log.progress=false",
          "--log.plots=false", "--run.device=cpu"]
"""4 steps, a checkpoint every 2 (the crash comes after the second), validation at 0, 2 and 4."""
NO_DROPOUT = "--lora.dropout=0"
"""Its masks differ by rank (the models themselves have none)."""


def cases(hh_base, arith, wide) -> dict[str, tuple[str, list[str], int]]:
    """name: (recipe, flags of both runs, micro-batch of one process, halved on each of the 2 sharded ranks)."""
    model, pairs = hh_base
    policy, rm, prompts = arith
    pair_data = [f"--model={model}", f"--data.files=[{pairs}]", "--data.max_length=128", "--eval.val_fraction=0.2",
                 NO_DROPOUT]
    sft_data = [f"--data.files=[{ALPACA}]", "--data.max_length=96", "--eval.val_fraction=0.05", NO_DROPOUT]
    online = [f"--model={policy}", f"--data.prompts=[{prompts}]", "--rollout.max_new_tokens=6",
              "--train.prompts_per_step=4", "--eval.val_fraction=0.1", "--eval.max_prompts=3", NO_DROPOUT]
    return {
        "sft_full": ("sft", [f"--model={model}", *sft_data, "--method=full", "--optim.lr=2e-3"], 4),
        "sft_qlora": ("sft", [f"--model={wide}", *sft_data, "--method=qlora", "--optim.lr=2e-3"], 4),
        "sft_lora": ("sft", [f"--model={model}", *sft_data, "--method=lora", "--optim.lr=2e-3",
                             f"--eval.tasks.names=[arc_easy={ARC}]", "--eval.tasks.every=2",
                             "--eval.tasks.limit=4"], 4),
        "reward": ("reward", [*pair_data, "--method=lora", "--optim.lr=3e-3"], 4),
        "dpo": ("dpo", [*pair_data, "--method=full", "--optim.lr=5e-3"], 4),
        "distill": ("distill", [f"--teacher.path={model}", f"--data.files=[{ALPACA}]", "--data.max_length=64",
                                "--eval.val_fraction=0.05", "--student.model={dim: 32, n_layers: 2, n_heads: 2, "
                                "max_seq_len: 64}", "--on_policy.lmbda=0.5", "--on_policy.max_new_tokens=4",
                                "--optim.lr=3e-3"], 4),
        "grpo": ("grpo", [*online, f"--rewards=[{{model: {rm}}}, {{rule: final_number}}]", "--rollout.n=4",
                          "--method=lora", "--loss.beta=0.05", "--optim.lr=1e-3"], 8),
        "ppo": ("ppo", [*online, f"--rewards=[{{model: {rm}}}]", "--rollout.n=2", "--method=full", "--ppo.epochs=2",
                        "--ppo.minibatches=2", "--optim.lr=1e-3"], 4),
    }


def drive(spec: str) -> None:
    """Under torchrun: each run of the spec's "runs" ([recipe, argv]) crashes at step 2 and resumes.

    Each call joins the process group anew, through a store of its own on a port that rank 0 picks just
    before the call and hands rank 1 in a file beside the spec: a second group on torchrun's store would find
    the first one's keys under the same names and can wait on them forever, and ports picked minutes ahead
    can meanwhile be taken (gloo's own connections bind free ports too)."""
    content = json.loads(Path(spec).read_text())
    rank, calls = int(os.environ["RANK"]), itertools.count()

    def call(recipe: str, argv: list[str]) -> int:
        port_file = Path(spec).with_name(f"port-{next(calls)}")
        if rank == 0:
            port_file.with_suffix(".tmp").write_text(str(free_port()))
            port_file.with_suffix(".tmp").rename(port_file)  # whole, or not there yet
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert time.monotonic() < deadline, f"rank 0 never wrote {port_file}"
            time.sleep(0.05)
        os.environ |= {"MASTER_PORT": port_file.read_text(), "TORCHELASTIC_USE_AGENT_STORE": "False"}
        return RECIPES[recipe].main(argv)

    def left(recipe: str) -> None:
        """The run's groups are gone with it (`parallel.release_dtensor_caches`), and their threads too; the
        count of works left in torch's registry (`parallel.full_state_dict`) says what would still hold one."""
        gc.collect()
        # A destroyed store's thread exits on its own event loop, a moment later on a loaded machine (CI saw
        # pt_tcpstore_uv still up once): a leak is a thread still there after seconds, not at once.
        deadline = time.monotonic() + 10
        while gloo_threads() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not gloo_threads(), (f"{recipe}: gloo threads outlive the run: {gloo_threads()}; "
                                    f"{_get_work_registry_size()} works in torch's registry")

    for recipe, argv in content["runs"]:
        os.environ["TEMPER_FAULT"] = "crash:step=2"
        try:
            call(recipe, argv)
            raise AssertionError(f"{recipe}: the crash at step 2 did not happen")
        except SystemExit as e:
            assert "crash at step 2" in str(e), e
        left(recipe)  # after the `except`: the crash's traceback no longer holds the run's frames
        os.environ["TEMPER_FAULT"] = ""
        assert call(recipe, argv) == 0, recipe
        left(recipe)


def gloo_threads() -> list[str]:
    """This process's threads that gloo process groups run (by their Linux thread names)."""
    names = [(Path("/proc/self/task") / t / "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n or "tcpstore" in n]


@pytest.fixture(scope="module")
def runs(hh_base, arith, base, tmp_path_factory) -> Path:
    """Each case in one process (run `<name>-one`), then all of them sharded in one launch (`<name>-fsdp`)."""
    root = tmp_path_factory.mktemp("sharded")
    spec = []
    for name, (recipe, flags, micro) in cases(hh_base, arith, base).items():
        argv = [*flags, *COMMON, f"--run.dir={root}"]
        assert RECIPES[recipe].main([*argv, f"--run.name={name}-one", f"--train.micro_batch_size={micro}"]) == 0
        spec.append([recipe, [*argv, f"--run.name={name}-fsdp", f"--train.micro_batch_size={micro // 2}",
                              "--train.parallel.dp_shard=2"]])
    (root / "spec.json").write_text(json.dumps({"runs": spec}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--module",
           "tests.recipes.test_recipes_sharded", str(root / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEMPER_FAULT": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, failure_report(out.stdout + out.stderr)
    return root


def failure_report(log: str) -> str:
    """The lines that name a cause, from anywhere in the log (a rank that aborts prints one line, which the
    other rank's long traceback would push out of a plain tail), then the tail."""
    causes = [line for line in log.splitlines() if any(k in line for k in CAUSES)]
    return "\n".join(["causes:", *causes[:40], "tail:", log[-4000:]])


CAUSES = ("terminate called", "what():", "Fatal Python error", "Error:", "Exception:", "Segmentation fault")


def metrics(run: Path, kind: str) -> dict[int, dict]:
    """step -> the last record of `kind` logged at that step (a resumed run logs steps after the checkpoint again)."""
    out = {}
    for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        if r.get("kind", "train") == kind:
            out[r["step"]] = r
    return out


UNTIMED = ("tokens_per_s", "mfu", "step_time_s", "time", "step", "seconds", "lr")


def assert_same_numbers(ref: dict[int, dict], got: dict[int, dict], rtol: float) -> None:
    """Every logged number but timings and the learning rate: losses to `rtol` (and 1e-6 absolute), other metrics
    also to 1e-5 absolute (some are small differences of large sums, e.g. DPO's margins of log-probs ~ -300)."""
    assert sorted(got) == sorted(ref)
    for step in ref:
        keys = [k for k, v in ref[step].items() if isinstance(v, float) and not any(u in k for u in UNTIMED)]
        assert keys and set(keys) <= set(got[step]), (step, keys)
        for k in keys:
            torch.testing.assert_close(got[step][k], ref[step][k], rtol=rtol, atol=1e-6 if "loss" in k else 1e-5,
                                       msg=lambda m, s=step, k=k: f"step {s} {k}: {m}")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], stored: torch.dtype | None = None,
                        ) -> None:
    """Weights stored (`stored`, else each tensor's own dtype) in float32 to 1e-4 relative (1e-5 absolute); in
    bf16/fp16, to one unit in their last place: QLoRA's export rounds base + B @ A to bf16, and float32 products
    that differ in their last bits (another BLAS kernel, a sharded sum) can land on either side of a rounding
    boundary. A weight near zero, where base and B @ A nearly cancel, keeps the float32 error of its terms, not of
    itself: a few of its own last places, so 1/256 of the tensor's largest weight's last place is allowed besides
    (4.7e-10 on a weight of 5.5e-8, measured on one CPU's kernels)."""
    assert a.keys() == b.keys()
    for k in a:
        dtype = stored or a[k].dtype
        eps = torch.finfo(dtype).eps
        rtol, atol = ((eps, eps * a[k].abs().max().item() / 256) if dtype in (torch.bfloat16, torch.float16)
                      else (1e-4, 1e-5))
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def stored_dtype(final: Path) -> torch.dtype:
    """The dtype an export's weights are stored in (its config.json's torch_dtype)."""
    return getattr(torch, json.loads((final / "config.json").read_text()).get("torch_dtype", "float32"))


@pytest.mark.parametrize("name", ["sft_full", "sft_qlora", "sft_lora", "reward", "dpo", "distill", "grpo", "ppo"])
def test_fsdp2_equals_one_process_resumes_and_exports(runs, name):
    one, fsdp = runs / f"{name}-one", runs / f"{name}-fsdp"
    rtol = 1e-4 if name == "ppo" else 1e-5  # PPO's whitening divides by a std over few tokens
    assert_same_numbers(metrics(one, "train"), metrics(fsdp, "train"), rtol)
    assert sorted(metrics(one, "train")) == [1, 2, 3, 4]
    assert_same_numbers(metrics(one, "val"), metrics(fsdp, "val"), rtol)
    if name == "sft_lora":
        assert sorted(metrics(fsdp, "tasks")) == [0, 2, 4]
        assert_same_numbers(metrics(one, "tasks"), metrics(fsdp, "tasks"), rtol)
    assert (fsdp / "checkpoints" / "step-0000002" / "dcp").is_dir()  # what the run resumed from
    if name == "reward":
        a, b = load_reward_model(one / "final"), load_reward_model(fsdp / "final")
    else:
        a, b = load_hf(one / "final")[0], load_hf(fsdp / "final")[0]
    assert_same_weights(a.state_dict(), b.state_dict(), stored_dtype(one / "final"))
    if name in ("sft_qlora", "sft_lora", "grpo"):
        from safetensors.torch import load_file

        adapter = "adapter/adapter_model.safetensors"
        assert_same_weights(load_file(one / "final" / adapter), load_file(fsdp / "final" / adapter))
        assert json.loads((fsdp / "final" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


if __name__ == "__main__":
    torch.set_num_threads(1)
    drive(sys.argv[1])
