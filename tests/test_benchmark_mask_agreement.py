"""benchmarks/mask_agreement.py: per-block counts of differing mask entries."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO))

from benchmarks.mask_agreement import mask_agreement  # noqa: E402


def test_counts_differences_per_block():
    first = {
        "model.layers.0.mlp.down_proj.weight": torch.tensor([[0.0, 1.0], [2.0, 0.0]]),
        "model.layers.1.mlp.down_proj.weight": torch.tensor([[0.0, 1.0], [2.0, 3.0]]),
        "model.layers.1.input_layernorm.weight": torch.tensor([1.0, 1.0]),
        "model.embed_tokens.weight": torch.ones(3, 2),
    }
    second = {**first, "model.layers.1.mlp.down_proj.weight": torch.tensor([[5.0, 0.0], [0.0, 3.0]])}
    assert mask_agreement(first, second) == {0: (0, 4), 1: (3, 4)}
    with pytest.raises(ValueError, match="different tensors"):
        mask_agreement(first, {})
