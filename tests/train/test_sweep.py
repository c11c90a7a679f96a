"""The sweep's search space and trial flags: parsing with errors naming the key and file, grid points, and values
written as flags that temper's config parser reads back unchanged. (End to end: tests/recipes/test_sweep.py.)"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from temper import config
from temper.config import ConfigError
from temper.train.sweep import SweepSection, check_args, flag, grid_points, load_space, parse_space, without


def test_space_parses_the_three_kinds_and_the_list_shorthand():
    space = parse_space({
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "schedule.warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 10},
        "preset": {"type": "categorical", "choices": ["debug", "debug-llama"]},
        "model.dropout": [0.0, 0.1],
    })
    assert space["optim.lr"].log and space["optim.lr"].low == 1e-4
    assert space["schedule.warmup_steps"].step == 10
    assert space["preset"].choices == ("debug", "debug-llama")
    assert space["model.dropout"].type == "categorical"
    # YAML 1.1 reads `1e-4` (no dot) as a string: a float range takes it as the number it means.
    assert parse_space(yaml.safe_load("optim.lr: {type: float, low: 1e-4, high: 1e-2}"))["optim.lr"].low == 1e-4


@pytest.mark.parametrize("spec, message", [
    ({"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "optim.lr: low (0.01) must be below high"),
    ({"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "optim.lr: a log range needs low > 0"),
    ({"optim.lr": {"type": "float", "low": 1e-4}}, "optim.lr: a float range needs low and high"),
    ({"optim.lr": {"type": "floot", "low": 1, "high": 2}}, "optim.lr: type must be float, int or categorical"),
    ({"optim.lr": {"type": "float", "low": 1e-4, "high": 1, "lgo": True}}, "optim.lr: unknown field 'lgo'"),
    ({"train.steps": {"type": "int", "low": 1.5, "high": 4}}, "train.steps: low must be an integer"),
    ({"train.steps": {"type": "int", "low": 1, "high": 4, "step": 0}}, "train.steps: step must be > 0"),
    ({"preset": {"type": "categorical", "choices": []}}, "preset: choices must be a non-empty list"),
    ({"preset": {"type": "categorical", "choices": [{"a": 1}]}}, "preset: choices must be numbers"),
    ({"run.name": ["a", "b"]}, "run.name: set by the sweep"),
    ({"optim lr": [1, 2]}, "'optim lr' is not a config key"),
    ({}, "non-empty mapping"),
])
def test_bad_space_names_the_key_and_the_file(spec, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_space(spec, "space.yaml")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}" if spec else f"{path}")):
        load_space(path)


def test_missing_space_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="space: name a YAML file"):
        load_space("")


def test_grid_points_enumerate_every_combination_in_order():
    space = parse_space({"a": {"type": "int", "low": 0, "high": 4, "step": 2},
                         "b": {"type": "float", "low": 0.1, "high": 0.3, "step": 0.1}, "c": ["x", "y"]})
    points = grid_points(space)
    assert len(points) == 3 * 3 * 2
    assert points[0] == {"a": 0, "b": 0.1, "c": "x"} and points[-1] == {"a": 4, "b": 0.3, "c": "y"}
    with pytest.raises(ConfigError, match="lr: the grid sampler needs a step"):
        grid_points(parse_space({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))


@pytest.mark.parametrize("value", [1e-5, 3e-4, 0.5, 1e20, 7, True, False, None, "debug-llama", "1e-3", [1, 2]])
def test_flag_values_read_back_unchanged(value):
    """A trial's value goes through `--key=value` and temper's YAML flag parser: a float like 1e-05 (which YAML 1.1
    would read as a string) must come back a float, a string like "1e-3" a string for a str field."""
    @dataclass
    class Cfg:
        x: Any = None
        s: str = ""
        items: list = field(default_factory=list)

    key = "s" if isinstance(value, str) else "items" if isinstance(value, list) else "x"
    _, tree = config.overrides_from_argv(Cfg, [flag(key, value)])
    assert tree[key] == value and type(tree[key]) is type(value)


def test_trial_values_replace_fixed_args_and_the_run_dir_is_the_sweeps():
    args = ["--preset=debug", "--optim.lr=3e-4", "--train.steps", "20", "--data.dir", "a", "--log.every=5"]
    assert without(args, {"optim.lr", "train.steps"}) == ["--preset=debug", "--data.dir", "a", "--log.every=5"]
    check_args(args)
    for bad in (["--run.name=x"], ["--run.dir", "runs"], ["--run.resume=never"]):
        with pytest.raises(ConfigError, match="set by the sweep"):
            check_args(bad)


def test_sweep_section_refuses_impossible_values():
    for bad in ({"trials": 0}, {"workers": 0}, {"reduction_factor": 1}, {"max_failures": -1}, {"metric": ""}):
        with pytest.raises(ConfigError):
            config.from_dict(SweepSection, bad)
