"""Wanda (Sun et al., 2023, arXiv 2306.11695): score ``|W_ij| * ||X_j||_2``, compared within each output row."""

from __future__ import annotations

import torch

from ..core.layers import TargetLayer
from ..core.masks import NMPattern, nm_mask, row_lowest_mask
from ..core.statistics import InputNorms
from .base import PruningMethod


class WandaPruning(PruningMethod):
    name = "wanda"

    def statistic_bytes(self, rows: int, cols: int) -> int:
        return cols * 4

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> InputNorms:
        return InputNorms(layer.in_features, device)

    def prune_matrix(
        self, weight: torch.Tensor, statistic: InputNorms, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        scores = weight.abs() * statistic.squared_norms.sqrt().unsqueeze(0)
        if pattern is not None:
            return nm_mask(scores, pattern)
        return row_lowest_mask(scores, sparsity)
