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
    """Running mean of ``2 X^T X`` over calibration tokens (SparseGPT's layer-wise Hessian).

    Only the upper triangle is accumulated, in column panels (a product per panel with the columns from it
    onward: about 56% of the full product's FLOPs); `matrix` mirrors it into the full symmetric matrix.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._panel = max(128, -(-in_features // 8))
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        total = self.tokens + x.shape[0]
        for start in range(0, x.shape[1], self._panel):
            panel = slice(start, start + self._panel)
            self._upper[panel, start:].addmm_(x[:, panel].T, x[:, start:], beta=self.tokens / total, alpha=2.0 / total)
        self.tokens = total

    @property
    def matrix(self) -> torch.Tensor:
        """The full symmetric ``(in_features, in_features)`` float32 Hessian (a new tensor)."""
        upper = self._upper.triu()
        return upper + upper.triu(1).T
