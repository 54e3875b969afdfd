"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774).

Optimal Brain Surgeon on the layer-wise Hessian ``H = 2 X^T X``: columns are visited left to right; the mask
of each block of `block_size` columns is chosen adaptively from ``w^2 / [H^-1]_jj^2``, and the error of every
pruned weight is compensated on the columns not yet visited, lazily in blocks.
"""

from __future__ import annotations

import torch

from ..core.layers import TargetLayer
from ..core.masks import NMPattern, lowest_mask, nm_mask, prune_count
from ..core.statistics import Hessian, InputGram
from ..method_settings import SparseGPTSettings
from .base import PruningMethod

PANEL = 32  # columns per lazily batched panel inside a block


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian_inverse: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None,
    block_size: int,
) -> torch.Tensor:
    """Prune ``weight`` (float32, ``(out, in)``) in place given the Cholesky factor of ``H^-1``; return the
    mask. Unstructured masks prune exactly ``round(sparsity * numel)`` weights.

    The weight is processed transposed, so that each input column is one contiguous row. Inside a block the
    error of each column reaches the next columns of its panel of `PANEL` columns at once (a rank-1 update)
    and the rest of the block after the panel (one matrix product), as the block reaches the columns after it.
    """
    cols = weight.shape[1]
    columns = weight.T.contiguous()
    pruned = torch.zeros_like(columns, dtype=torch.bool)
    errors = torch.empty_like(columns[:block_size])
    total = prune_count(weight.numel(), sparsity)
    panel = PANEL if pattern is None else max(pattern.m, PANEL // pattern.m * pattern.m)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, block_mask, block_errors = columns[start:end], pruned[start:end], errors[: end - start]
        inverse = hessian_inverse[start:end, start:end]
        diagonal = inverse.diagonal().unsqueeze(1)
        if pattern is None:
            count = round(total * end / cols) - round(total * start / cols)
            block_mask.copy_(lowest_mask((block.pow(2) / diagonal.pow(2)).T, count).T)
            scale = block_mask / diagonal  # error of column i: its pruned weights / [H^-1]_ii
        else:
            scale = torch.empty_like(block)
        for first in range(0, end - start, panel):
            last = min(first + panel, end - start)
            for i in range(first, last):
                if pattern is not None and i % pattern.m == 0:
                    group = slice(i, i + pattern.m)
                    block_mask[group] = nm_mask((block[group].pow(2) / diagonal[group].pow(2)).T, pattern).T
                    torch.div(block_mask[group], diagonal[group], out=scale[group])
                torch.mul(block[i], scale[i], out=block_errors[i])
                block[i + 1 : last].addr_(inverse[i, i + 1 : last], block_errors[i], alpha=-1)
            block[last:].addmm_(inverse[first:last, last:].T, block_errors[first:last], alpha=-1)
        block.masked_fill_(block_mask, 0.0)
        columns[end:].addmm_(hessian_inverse[start:end, end:].T, block_errors, alpha=-1)
    weight.copy_(columns.T)
    return pruned.T.contiguous()


class SparseGPTPruning(PruningMethod):
    name = "sparsegpt"
    settings_class = SparseGPTSettings

    def statistic_bytes(self, rows: int, cols: int) -> int:
        return cols * cols * 4

    def working_bytes(self, rows: int, cols: int) -> int:
        return rows * cols * 9 + 2 * cols * cols * 4  # the Hessian is inverted in place, with two more

    def pruning_flops(self, rows: int, cols: int, tokens: int) -> float:
        return 2.0 * cols * cols * tokens + 2 * rows * cols * cols + 3 * cols**3

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> Hessian:
        return Hessian(layer.in_features, device)

    def unit_scores(
        self, consumer: torch.Tensor, producers: list[tuple[torch.Tensor, int]], columns: int, gram: InputGram
    ) -> None:
        return None  # second order: units are removed by Optimal Brain Surgeon on the consumer's Hessian

    def prune_matrix(
        self, weight: torch.Tensor, statistic: Hessian, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        inverse = statistic.inverse_cholesky(self.settings.dampening)
        return sparsegpt_prune(weight, inverse, sparsity, pattern, self.settings.block_size)
