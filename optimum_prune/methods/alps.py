"""ALPS (Meng, Behdin, Wang and Mazumder, NeurIPS 2024, arXiv 2406.07831; reference code
github.com/mazumder-lab/ALPS).

Each layer's problem ``min ||X W_hat - X W||^2`` subject to a cardinality (or N:M) constraint is solved by
ADMM on the diagonally scaled problem (`refit.ScaledHessian`): a ridge least-squares step on
``H + rho I`` (from one eigen decomposition), a projection onto the constraint (the largest
``|B + V / rho|`` of the whole layer, or of every N:M group), a dual update. The penalty ``rho`` grows while
the support still moves (x1.3, x1.2, x1.1 as it settles), is cut by 5 when it starts too large to move the
support at all, and the iterations stop once the support is stable. The kept weights of the final support
are then refined by conjugate gradients (`refit.Refitted`, through which the method always runs).
"""

from __future__ import annotations

import torch

from ..core.layers import TargetLayer
from ..core.masks import NMPattern, lowest_mask, nm_mask, prune_count
from ..core.statistics import Hessian, InputGram
from ..method_settings import ALPSSettings
from .base import PruningMethod
from .refit import ScaledHessian

MAX_RHO = 1e6  # the reference's ceiling of the penalty
SETTLE_ITERATIONS = 30  # before this many iterations a nearly stable support does not stop the solver
STABLE_SUPPORT = 3e-4  # the support counts as stable when fewer than this share of its kept weights moved


def _project(values: torch.Tensor, count: int, pattern: NMPattern | None) -> torch.Tensor:
    """The pruned positions of the projection of ``values`` onto the constraint (largest magnitudes kept)."""
    scores = values.pow(2)
    return nm_mask(scores, pattern) if pattern is not None else lowest_mask(scores, count)


def alps_admm(
    weight: torch.Tensor,
    scaled: ScaledHessian,
    sparsity: float,
    pattern: NMPattern | None,
    rho: float,
    max_iterations: int,
    update_every: int,
) -> torch.Tensor:
    """The ADMM phase on a float32 ``(out, in)`` ``weight``, updated in place to the projected solution; returns
    the mask of pruned weights."""
    count = prune_count(weight.numel(), sparsity) if pattern is None else 0
    kept = weight.numel() - (count if pattern is None else weight.numel() * (pattern.m - pattern.n) // pattern.m)
    dense = weight * scaled.scale.unsqueeze(0)
    target = dense @ scaled.matrix
    first_mask = _project(dense, count, pattern)
    first_split = dense.masked_fill(first_mask, 0.0)
    solution, split, dual = dense.clone(), first_split.clone(), torch.zeros_like(dense)
    support = first_mask
    inverse = scaled.shifted_inverse(rho)
    penalty_grown = False
    for iteration in range(1, max_iterations + 1):
        solution = (target - dual + rho * split) @ inverse
        mask = _project(solution + dual / rho, count, pattern)
        split = (solution + dual / rho).masked_fill_(mask, 0.0)
        dual.add_(solution - split, alpha=rho)
        if iteration % update_every:
            continue
        moved = int((mask != support).sum())  # positions that entered or left the support
        support = mask
        share = moved / max(kept, 1)
        if share > 0.1:
            penalty_grown, rho = True, rho * 1.3
        elif share > 0.005:
            penalty_grown, rho = True, rho * 1.2
        elif moved > 0:
            if penalty_grown:
                rho *= 1.1
            else:  # rho started too large for the support to move: smaller, and start again
                rho /= 5
                solution, split, dual = dense.clone(), first_split.clone(), torch.zeros_like(dense)
        elif penalty_grown:
            break
        else:
            rho /= 5
        rho = min(rho, MAX_RHO)
        inverse = scaled.shifted_inverse(rho)
        if iteration >= SETTLE_ITERATIONS and share < STABLE_SUPPORT:
            break
    mask = _project(solution, count, pattern)
    weight.copy_(solution.masked_fill_(mask, 0.0) / scaled.scale.unsqueeze(0))
    return mask


class ALPSPruning(PruningMethod):
    name = "alps"
    settings_class = ALPSSettings
    always_refits = True  # the ADMM support's kept weights are refined by conjugate gradients

    def statistic_bytes(self, rows: int, cols: int) -> int:
        return cols * cols * 4

    def working_bytes(self, rows: int, cols: int) -> int:
        # eigenvectors, the shifted inverse and a float64 copy for the decomposition; five weight-sized tensors
        return 4 * cols * cols * 4 + 5 * rows * cols * 4

    def pruning_flops(self, rows: int, cols: int, tokens: int) -> float:
        iterations = self.settings.max_iterations / 3  # the support is usually stable well before the limit
        updates = iterations / self.settings.update_every
        return 2.0 * cols * cols * tokens + 10.0 * cols**3 + iterations * 2 * rows * cols * cols + updates * 2 * cols**3

    def unit_scores(
        self, consumer: torch.Tensor, producers: list[tuple[torch.Tensor, int]], columns: int, gram: InputGram
    ) -> None:
        return None  # structure: units removed by Optimal Brain Surgeon on the consumer's Hessian, as SparseGPT's

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> Hessian:
        return Hessian(layer.in_features, device)

    def prune_matrix(
        self, weight: torch.Tensor, statistic: Hessian, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        settings = self.settings
        scaled = ScaledHessian.of(statistic, settings.dampening)
        return alps_admm(
            weight, scaled, sparsity, pattern, settings.rho, settings.max_iterations, settings.update_every
        )
