"""Magnitude pruning: drop the smallest ``|W|``, one threshold per weight matrix."""

from __future__ import annotations

import torch

from ..core.masks import NMPattern, lowest_mask, nm_mask, prune_count
from ..core.statistics import LayerStatistic
from .base import PruningMethod


class MagnitudePruning(PruningMethod):
    name = "magnitude"
    needs_statistics = False

    def prune_matrix(
        self,
        weight: torch.Tensor,
        statistic: LayerStatistic | None,
        sparsity: float,
        pattern: NMPattern | None,
    ) -> torch.Tensor:
        scores = weight.abs()
        if pattern is not None:
            return nm_mask(scores, pattern)
        return lowest_mask(scores, prune_count(weight.numel(), sparsity))
