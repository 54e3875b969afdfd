"""The interface every pruning method implements; a new method is one new file in this folder."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..engine.structure import TargetLayer
from .masking import NMPattern
from .statistics import LayerStatistic

if TYPE_CHECKING:
    from ..config import PruningConfig


@dataclass
class BlockContext:
    """What a method sees of one decoder block when pruning it."""

    index: int
    block: nn.Module
    layers: list[TargetLayer]
    statistics: dict[str, LayerStatistic]
    sparsity: float
    pattern: NMPattern | None


class PruningMethod(ABC):
    """Chooses and applies the masks of one decoder block from its calibration statistics.

    Subclasses set `name`, return the statistic they need from `make_statistic` (``None`` for none) and
    implement `prune_matrix`. Methods that prune several layers jointly override `prune_block`.
    """

    name: ClassVar[str]
    needs_statistics: ClassVar[bool] = True

    def __init__(self, config: PruningConfig) -> None:
        self.config = config

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> LayerStatistic | None:
        """A fresh statistic to accumulate from `layer`'s calibration inputs, or ``None``."""
        return None

    @abstractmethod
    def prune_matrix(
        self,
        weight: torch.Tensor,
        statistic: LayerStatistic | None,
        sparsity: float,
        pattern: NMPattern | None,
    ) -> torch.Tensor:
        """Prune a float32 ``(out, in)`` weight in place (updating kept weights if the method does) and
        return the boolean mask of pruned weights."""

    def prune_block(self, context: BlockContext) -> dict[str, torch.Tensor]:
        """Prune every target layer of a block; return each layer's mask by name."""
        masks = {}
        for layer in context.layers:
            weight = layer.matrix()
            mask = self.prune_matrix(weight, context.statistics.get(layer.name), context.sparsity, context.pattern)
            weight[mask] = 0.0
            layer.write(weight)
            masks[layer.name] = mask
        return masks
