"""Every shipped YAML under configs/ is a valid override file for its recipe's config."""

from pathlib import Path

import pytest

from temper import config
from temper.recipes.prepare import PrepareConfig
from temper.recipes.pretrain import PretrainConfig, build_model_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_parses(path):
    cls = PrepareConfig if path.stem.endswith("-prepare") else PretrainConfig
    cfg = config.parse(cls, ["--config", str(path)])
    if cls is PretrainConfig:
        model = build_model_config(cfg, data_vocab=65)
        assert model.max_seq_len >= (cfg.train.seq_len or model.max_seq_len)
