"""OWL, outlier-weighted layerwise sparsity (Yin et al., 2023, arXiv 2310.05175).

Blocks whose Wanda scores ``|W| * ||X||`` hold more outliers (scores above ``M`` times the block mean, over all
target layers of the block at once) keep more weights. Block sparsities are linear in the outlier ratio:

    S_i = S - lambda * (r_i - r_mean) / max_j |r_j - r_mean|,   r_mean = sum_j n_j r_j / sum_j n_j

(``n_j``: the block's prunable weights), so every block lies in ``[S - lambda, S + lambda]`` as the paper
states, the farthest one exactly on the edge, and the parameter-weighted mean is ``S`` exactly. The reference
code (github.com/luuyin/OWL) min-max scales the ratios onto ``[0, 2 lambda]`` and subtracts their plain mean:
its spread is always ``2 lambda`` but one side can exceed ``lambda`` (up to ``2 lambda``) when the ratios are
skewed, and its mean is the target only when all blocks have the same size. Both agree when the ratios are
symmetric about their mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.layers import TargetLayer
from ..core.statistics import InputNorms


def _wanda_scores(layer: TargetLayer, norms: InputNorms) -> torch.Tensor:
    return layer.matrix().abs_().mul_(norms.squared_norms.sqrt().unsqueeze(0))


def outlier_ratio(layers: Sequence[TargetLayer], statistics: dict[str, InputNorms], m: float) -> float:
    """Share of a block's Wanda scores larger than ``m`` times their mean over the whole block."""
    total, count = 0.0, 0
    for layer in layers:
        scores = _wanda_scores(layer, statistics[layer.name])
        total += scores.sum(dtype=torch.float64).item()
        count += scores.numel()
    threshold = m * total / count
    outliers = sum(int((_wanda_scores(layer, statistics[layer.name]) > threshold).sum()) for layer in layers)
    return outliers / count


def owl_sparsities(ratios: Sequence[float], parameters: Sequence[int], target: float, spread: float) -> list[float]:
    """Per-block sparsities in ``[target - spread, target + spread]``, lower for higher outlier ratios, whose
    parameter-weighted mean is ``target``."""
    ratio = torch.tensor(ratios, dtype=torch.float64)
    weight = torch.tensor(parameters, dtype=torch.float64)
    centred = ratio - (ratio * weight).sum() / weight.sum()
    largest = centred.abs().max()
    if largest == 0:
        return [target] * len(ratios)
    return (target - centred * (spread / largest)).tolist()
