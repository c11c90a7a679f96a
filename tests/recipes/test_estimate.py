"""`temper estimate` end to end: a preset, a saved checkpoint (HF layout, temper checkpoint, run dir), bad input."""

import dataclasses
import json

import torch
import yaml

from temper.__main__ import main as temper_main
from temper.model.config import PRESETS
from temper.model.hf.checkpoint import save_hf
from temper.model.transformer import Transformer
from temper.recipes.estimate import main
from temper.train.memory import RunShape, estimate, human_bytes
from temper.train.parallel import ParallelConfig

RUN = ["--run.micro_batch_size=4", "--run.seq_len=64", "--run.precision=fp32"]


def _peak_line(out: str) -> str:
    return next(line for line in out.splitlines() if "training peak" in line)


def test_preset_prints_every_component_and_the_estimated_peak(capsys):
    assert main(["--model.preset=debug-llama", *RUN]) == 0
    out = capsys.readouterr().out
    expected = estimate(PRESETS["debug-llama"], RunShape(micro_batch_size=4, seq_len=64, precision="fp32"))
    for c in expected.components:
        assert f"| {c.name} | {human_bytes(c.bytes)} | {c.formula} |" in out
    assert f"**{human_bytes(expected.peak)}**" in _peak_line(out)
    assert "rules of thumb" in out and "16 B per trained param" in out


def test_a_saved_checkpoint_gives_the_same_estimate_as_its_preset(tmp_path, capsys):
    cfg = PRESETS["debug"]
    save_hf(Transformer(cfg), cfg, tmp_path / "hf")
    (tmp_path / "ckpt").mkdir()  # a temper checkpoint's state.json stores the resolved run config
    (tmp_path / "ckpt" / "state.json").write_text(json.dumps({"step": 4, "config": {"model": dataclasses.asdict(cfg)}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.resolved.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}))
    assert main(["--model.preset=debug", *RUN]) == 0
    reference = _peak_line(capsys.readouterr().out)
    for path in ("hf", "hf/config.json", "ckpt", "run"):
        assert main([f"--model.path={tmp_path / path}", *RUN]) == 0
        assert _peak_line(capsys.readouterr().out) == reference
    # overrides apply on top of the saved shape
    assert main([f"--model.path={tmp_path / 'hf'}", "--model.overrides.vocab_size=50304", *RUN]) == 0
    assert _peak_line(capsys.readouterr().out) != reference


def test_lora_on_a_checkpoint_counts_only_the_adapters(tmp_path, capsys):
    cfg = PRESETS["debug-llama"]
    torch.manual_seed(0)
    save_hf(Transformer(cfg), cfg, tmp_path)
    assert main([f"--model.path={tmp_path}", "--run.recipe=lora", "--run.lora.rank=4",
                 "--run.lora.targets=[q_proj,v_proj]", *RUN]) == 0
    out = capsys.readouterr().out
    adapters = 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers x r x (in + out) of q and v
    assert f"{adapters:,} trainable" in out
    assert f"| gradients | {human_bytes(4 * adapters)} |" in out


def test_bad_input_fails_naming_the_key(tmp_path, capsys):
    assert temper_main(["estimate", "--model.preset=gpt5"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'gpt5'" in err and "debug, debug-llama, gpt2-124m" in err
    assert temper_main(["estimate", "--run.micro_batch_size=-1"]) == 2
    assert "micro_batch_size must be > 0, got -1" in capsys.readouterr().err
    assert temper_main(["estimate", "--run.parallel.dp_shard=0"]) == 2
    assert "run.parallel" in capsys.readouterr().err
    assert temper_main(["estimate", "--run.world_size=3", "--run.parallel.dp_shard=2"]) == 2
    assert "does not divide the world size 3" in capsys.readouterr().err
    assert temper_main(["estimate", "--model.preset=debug", f"--model.path={tmp_path}"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([f"--model.path={tmp_path / 'nowhere'}"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main([f"--model.path={tmp_path}"]) == 2  # a directory without any config
    assert "no config.json" in capsys.readouterr().err
    assert main(["--model.preset=debug", "--run.recipe=lora", "--run.lora.targets=[gate_proj]"]) == 2
    assert "match no nn.Linear" in capsys.readouterr().err


def test_a_layout_prints_per_rank_figures(capsys):
    flags = ["--run.world_size=4", "--run.parallel.dp_shard=2", "--run.parallel.tp=2", "--run.parallel.sequence_parallel=true"]
    assert main(["--model.preset=debug-llama", *RUN, *flags]) == 0
    out = capsys.readouterr().out
    layout = ParallelConfig(dp_shard=2, tp=2, sequence_parallel=True)
    expected = estimate(PRESETS["debug-llama"], RunShape(micro_batch_size=4, seq_len=64, precision="fp32", world_size=4,
                                                       parallel=layout))
    assert "4 ranks: FSDP2 over 2 (ZeRO-3), tp 2 (sequence parallel)" in out
    for c in expected.components:
        assert f"| {c.name} | {human_bytes(c.bytes)} | {c.formula} |" in out
    assert f"**{human_bytes(expected.peak)}**" in _peak_line(out)
    one = estimate(PRESETS["debug-llama"], RunShape(micro_batch_size=4, seq_len=64, precision="fp32"))
    assert expected["parameters"].bytes < one["parameters"].bytes / 3  # a quarter, and the replicated norms
