"""Calibration statistics gathered from a layer's inputs, in float32 whatever the model dtype."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class LayerStatistic(ABC):
    """Accumulates a statistic over the calibration inputs of one layer."""

    @abstractmethod
    def update(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs of shape ``(..., in_features)``."""


class InputNorms(LayerStatistic):
    """Squared L2 norm of every input feature over all calibration tokens (Wanda's ``||X_j||^2``)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.squared_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.squared_norms += x.pow(2).sum(dim=0)
        self.tokens += x.shape[0]


class Hessian(LayerStatistic):
    """Running mean of ``2 X^T X`` over calibration tokens (SparseGPT's layer-wise Hessian)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        new_tokens = x.shape[0]
        total = self.tokens + new_tokens
        self.matrix.mul_(self.tokens / total)
        x = x * (2.0 / total) ** 0.5
        self.matrix.addmm_(x.T, x)
        self.tokens = total
