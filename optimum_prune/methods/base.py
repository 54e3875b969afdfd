"""The interface every pruning method implements; a new method is one new file in this folder and one row of
the table in ``methods/__init__.py``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.layers import TargetLayer
from ..core.masks import NMPattern
from ..core.statistics import InputGram, LayerStatistic
from ..errors import InputError
from ..method_settings import MethodSettings


@dataclass
class BlockContext:
    """What a method sees of one decoder block when pruning it."""

    index: int
    block: nn.Module
    layers: list[TargetLayer]
    statistics: dict[str, LayerStatistic]
    sparsity: float
    pattern: NMPattern | None
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # refitted layers: error before, after


class PruningMethod(ABC):
    """Chooses and applies the masks of one decoder block from its calibration statistics.

    Subclasses set `name` and `settings_class`, return the statistic they need from `make_statistic` (``None``
    for none) and implement `prune_matrix`. Methods that prune several layers jointly override `prune_block`
    and set `joint`.
    The cost methods tell the estimate what a layer of ``rows x cols`` weights costs; methods place no data on
    devices themselves (the engine does).
    """

    name: ClassVar[str]
    settings_class: ClassVar[type[MethodSettings]] = MethodSettings
    needs_statistics: ClassVar[bool] = True
    joint: ClassVar[bool] = False  # prune_block prunes layers together: a distributed run keeps a block on one rank
    always_refits: ClassVar[bool] = False  # its kept weights are always refitted (`methods.refit.Refitted`)

    def __init__(self, settings: MethodSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.settings_class()

    def statistic_bytes(self, rows: int, cols: int) -> int:
        """Bytes of one layer's calibration statistic."""
        return 0

    def working_bytes(self, rows: int, cols: int) -> int:
        """Bytes the pruning of one layer holds besides its weight and statistic."""
        return rows * cols * 17

    def pruning_flops(self, rows: int, cols: int, tokens: int) -> float:
        """Floating-point operations of accumulating one layer's statistic and pruning it."""
        return 20.0 * rows * cols

    def unit_scores(
        self, consumer: torch.Tensor, producers: list[tuple[torch.Tensor, int]], columns: int, gram: InputGram
    ) -> torch.Tensor | None:
        """Structured pruning: one score per unit of a channel group (higher = keep), from the consumer's
        ``(out, in)`` weight (``columns`` per unit), the producers' weights (with their rows per unit) and the
        consumer's input Gram matrix; ``None`` removes units by Optimal Brain Surgeon instead."""
        raise InputError(f"Method {self.name!r} has no structured form: use magnitude, wanda or sparsegpt.")

    def block_costs(self, layers: list[list[TargetLayer]], tokens: int) -> tuple[int, float]:
        """Extra host bytes (at the busiest block) and FLOPs (over every block) of pruning layers jointly."""
        return 0, 0.0

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


class WrappedMethod(PruningMethod):
    """A per-layer ``method`` that does more to each layer after its masks (`Refitted`, `GPTQRounded`); reported,
    and given settings, as ``method``. ``purpose`` ends the refusal of a method that prunes a block's layers
    jointly."""

    def __init__(self, method: PruningMethod, purpose: str) -> None:
        if method.joint:
            raise InputError(
                f"Method {method.name!r} prunes the layers of a block jointly and updates their weights itself: "
                f"{purpose}"
            )
        super().__init__(method.settings)
        self.method = method
        self.name = method.name  # type: ignore[misc]
        self.settings_class = method.settings_class  # type: ignore[misc]
