"""Wanda (Sun et al., 2023, arXiv 2306.11695): score ``|W_ij| * ||X_j||_2``, compared within each output row."""

from __future__ import annotations

import torch

from ..core.layers import TargetLayer
from ..core.masks import NMPattern, nm_mask, row_lowest_mask
from ..core.statistics import InputGram, InputNorms
from .base import PruningMethod


class WandaPruning(PruningMethod):
    name = "wanda"

    def statistic_bytes(self, rows: int, cols: int) -> int:
        return cols * 4

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> InputNorms:
        return InputNorms(layer.in_features, device)

    def unit_scores(
        self, consumer: torch.Tensor, producers: list[tuple[torch.Tensor, int]], columns: int, gram: InputGram
    ) -> torch.Tensor:
        """Wanda-sp: ``sum |W_ij| * ||X_j||`` over each unit's consumer columns."""
        norms = gram.gram.diagonal().clamp_min(0).sqrt()
        return (consumer.abs() * norms).sum(0).view(-1, columns).sum(1)

    def prune_matrix(
        self, weight: torch.Tensor, statistic: InputNorms, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        scores = weight.abs() * statistic.squared_norms.sqrt().unsqueeze(0)
        if pattern is not None:
            return nm_mask(scores, pattern)
        return row_lowest_mask(scores, sparsity)
