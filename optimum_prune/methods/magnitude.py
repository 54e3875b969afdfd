"""Magnitude pruning: drop the smallest ``|W|``, one threshold per weight matrix."""

from __future__ import annotations

import torch

from ..core.masks import NMPattern, lowest_mask, nm_mask, prune_count
from ..core.statistics import InputGram, LayerStatistic
from .base import PruningMethod


class MagnitudePruning(PruningMethod):
    name = "magnitude"
    needs_statistics = False

    def unit_scores(
        self, consumer: torch.Tensor, producers: list[tuple[torch.Tensor, int]], columns: int, gram: InputGram
    ) -> torch.Tensor:
        """The squared norm of each unit's consumer columns and producer rows."""
        units = consumer.shape[1] // columns
        scores = consumer.pow(2).sum(0).view(units, columns).sum(1)
        for weight, rows in producers:
            scores += weight.pow(2).sum(1).view(units, rows).sum(1)
        return scores

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
