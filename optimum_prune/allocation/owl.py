"""OWL, outlier-weighted layerwise sparsity (Yin et al., 2023, arXiv 2310.05175).

Blocks whose Wanda scores ``|W| * ||X||`` hold more outliers (scores above ``M`` times the block mean) keep
more weights. This implementation spreads block sparsities linearly in the outlier ratio around the target,
scaled so that the farthest block sits exactly at ``target +- lambda``; the mean weighted by each block's
parameter count equals the target exactly, so the model reaches the requested global sparsity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine.structure import TargetLayer
from ..methods.statistics import InputNorms


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
