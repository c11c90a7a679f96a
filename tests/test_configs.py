"""Every shipped YAML under configs/ is a valid override file for its recipe's config."""

from pathlib import Path

import pytest

from temper import config
from temper.recipes.prepare import PrepareConfig
from temper.recipes.pretrain import PretrainConfig, build_model_config
from temper.recipes.sweep import SweepConfig
from temper.train.sweep import flag, load_space

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_parses(path):
    if path.stem.startswith("sweep-"):  # a sweep of pretrain: its trial args at both ends of every range parse
        cfg = config.parse(SweepConfig, ["--config", str(path)])
        assert cfg.recipe == "pretrain"
        space = load_space(cfg.space)
        for end in (0, -1):
            values = {k: p.choices[end] if p.type == "categorical" else (p.low, p.high)[end] for k, p in space.items()}
            trial = config.parse(PretrainConfig, [*cfg.args, *(flag(k, v) for k, v in values.items())])
            build_model_config(trial, data_vocab=65)
        return
    cls = PrepareConfig if path.stem.endswith("-prepare") else PretrainConfig
    cfg = config.parse(cls, ["--config", str(path)])
    if cls is PretrainConfig:
        model = build_model_config(cfg, data_vocab=65)
        assert model.max_seq_len >= (cfg.train.seq_len or model.max_seq_len)
