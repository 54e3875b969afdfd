"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774).

Optimal Brain Surgeon on the layer-wise Hessian ``H = 2 X^T X``: columns are visited left to right; the mask
of each block of `block_size` columns is chosen adaptively from ``w^2 / [H^-1]_jj^2``, and the error of every
pruned weight is compensated on the columns not yet visited, lazily in blocks.
"""

from __future__ import annotations

import torch

from ..engine.structure import TargetLayer
from .base import PruningMethod
from .masking import NMPattern, lowest_mask, nm_mask, prune_count
from .statistics import Hessian


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian; dampening grows until it is positive definite."""
    hessian = hessian.clone()
    diagonal = hessian.diagonal()
    diagonal[diagonal == 0] = 1.0  # inputs that are always zero
    mean_diagonal = diagonal.mean()
    for attempt in range(6):
        damped = hessian + torch.eye(len(hessian), device=hessian.device) * (
            max(dampening, 1e-8) * 10**attempt * mean_diagonal
        )
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if info == 0:
                return inverse
    raise RuntimeError("The calibration Hessian is not positive definite even with 10^5 x dampening.")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian_inverse: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None,
    block_size: int,
) -> torch.Tensor:
    """Prune ``weight`` (float32, ``(out, in)``) in place given the Cholesky factor of ``H^-1``; return the
    mask. Unstructured masks prune exactly ``round(sparsity * numel)`` weights."""
    rows, cols = weight.shape
    mask = torch.zeros_like(weight, dtype=torch.bool)
    total = prune_count(weight.numel(), sparsity)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = weight[:, start:end].clone()
        block_inverse = hessian_inverse[start:end, start:end]
        diagonal = block_inverse.diagonal()
        errors = torch.zeros_like(block)
        if pattern is None:
            count = round(total * end / cols) - round(total * start / cols)
            block_mask = lowest_mask(block.pow(2) / diagonal.pow(2), count)
        else:
            block_mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if pattern is not None and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                block_mask[:, group] = nm_mask(block[:, group].pow(2) / diagonal[group].pow(2), pattern)
            column = block[:, i]
            error = torch.where(block_mask[:, i], column, torch.zeros_like(column)) / diagonal[i]
            block[:, i:].sub_(error.unsqueeze(1) * block_inverse[i, i:].unsqueeze(0))
            errors[:, i] = error
        block[block_mask] = 0.0
        weight[:, start:end] = block
        mask[:, start:end] = block_mask
        weight[:, end:].sub_(errors @ hessian_inverse[start:end, end:])
    return mask


class SparseGPTPruning(PruningMethod):
    name = "sparsegpt"

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> Hessian:
        return Hessian(layer.in_features, device)

    def prune_matrix(
        self, weight: torch.Tensor, statistic: Hessian, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        inverse = inverse_hessian_cholesky(statistic.matrix, self.config.dampening)
        return sparsegpt_prune(weight, inverse, sparsity, pattern, self.config.block_size)
