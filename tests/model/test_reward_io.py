"""A temper reward model exported as `*ForSequenceClassification`: transformers loads it and scores
every row as temper does (at the last token that is not padding), and temper loads it back."""

from dataclasses import replace

import pytest
import torch

from temper.model.config import PRESETS
from temper.model.heads import RewardModel, last_positions, load_reward_model
from temper.model.hf.checkpoint import save_hf
from temper.model.hf.files import CheckpointError
from temper.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
PAD = 0
GEMMA3 = {"mlp": "geglu", "norm_unit_offset": True, "scale_embeddings": True, "qk_norm": True, "sandwich_norm": True,
          "sliding_window": 4, "global_every": 2, "rope_local_theta": 100.0}


@pytest.mark.parametrize("preset,tied,over", [("debug-llama", False, {}), ("debug-llama", True, {}), ("debug", True, {}),
                                              ("debug-llama", True, {"qk_norm": True}),  # Qwen3ForSequenceClassification
                                              ("debug-llama", True, GEMMA3)])  # Gemma3TextForSequenceClassification
def test_reward_model_round_trips_through_transformers(tmp_path, preset, tied, over):
    torch.manual_seed(0)
    cfg = replace(PRESETS[preset], tie_embeddings=tied, **over)
    model = RewardModel(Transformer(cfg)).eval()
    save_hf(model.backbone, cfg, tmp_path, generation_config={"pad_token_id": PAD}, score=model.head.score.weight)
    tokens = torch.randint(1, cfg.vocab_size, (3, 12))
    tokens[0, 7:] = PAD  # right padding
    tokens[1, 10:] = PAD
    last = last_positions(tokens != PAD)
    with torch.no_grad():
        ours = model(tokens, last=last)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert type(hf).__name__.endswith("ForSequenceClassification") and "lm_head" not in dict(hf.named_parameters())
        theirs = hf(input_ids=tokens, attention_mask=(tokens != PAD).long()).logits[:, 0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        back = load_reward_model(tmp_path)
        torch.testing.assert_close(back(tokens, last=last), ours, rtol=0, atol=1e-6)


def test_a_causal_lm_is_not_a_reward_model(tmp_path):
    cfg = PRESETS["debug-llama"]
    save_hf(Transformer(cfg), cfg, tmp_path)
    with pytest.raises(CheckpointError, match="not a one-label sequence-classification checkpoint: no score.weight"):
        load_reward_model(tmp_path)


def test_reward_model_flops_leave_out_the_unused_language_model_head():
    cfg = PRESETS["debug-llama"]
    model = RewardModel(Transformer(cfg))
    assert model.backbone.flops_per_token(64) - model.flops_per_token(64) == 6 * cfg.vocab_size * cfg.dim
