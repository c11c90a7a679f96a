"""A scalar head sits on any model's hidden states, tied output layer or not, and reads its score at
each row's last real token; its gradient reaches the model."""

import pytest
import torch

from temper.model.config import PRESETS
from temper.model.heads import ScalarHead, last_positions, score_at
from temper.model.transformer import Transformer


@pytest.mark.parametrize("name", ["debug", "debug-llama"])  # tied and untied output layers
def test_scalar_head_scores_the_last_real_token(name):
    torch.manual_seed(0)
    model = Transformer(PRESETS[name])
    head = ScalarHead(model.cfg.dim)
    x = torch.randint(0, 256, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    hidden = model(x, hidden_only=True)  # (B, T, C)
    assert hidden.shape == (3, 10, model.cfg.dim)
    rewards = score_at(head(hidden), last_positions(mask))  # (B,)
    assert rewards.shape == (3,)
    alone = head(model(x[1:2, :6], hidden_only=True))[0, -1]  # row 1 without its padding
    torch.testing.assert_close(rewards[1], alone, rtol=1e-5, atol=1e-6)
    rewards.sum().backward()
    assert model.layers[0].attn.q_proj.weight.grad is not None and head.score.weight.grad is not None


def test_last_positions_of_ragged_masks():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert last_positions(mask).tolist() == [1, 3, 0]
