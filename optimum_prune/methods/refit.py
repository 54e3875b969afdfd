"""Optimal weights for a fixed mask: the kept weights of each layer re-solved against its calibration inputs.

For a layer with dense weight ``W`` and calibration inputs ``X`` (their Hessian ``H = 2 X^T X / n``), the
weights that best reproduce the dense outputs on a given support solve, row by row,

    min ||X (w_hat - w)||^2   subject to   w_hat_j = 0 for every pruned j.

As ALPS does (Meng et al., 2024, arXiv 2406.07831, Section 3.3), the problem is scaled by the diagonal of the
dampened Hessian (``H + lambda I``, ``lambda`` a fraction of its mean diagonal, so that dead inputs and tiny
calibration sets stay well posed), which makes that diagonal one: plain conjugate gradients on the scaled
problem are Jacobi-preconditioned ones on the original. Every row is solved at once (its own step sizes).

`Refitted` wraps any mask method (magnitude, Wanda, SparseGPT, or ALPS, whose ADMM support it refines): the
method chooses the mask, then the kept weights are refitted; the block's report records each layer's relative
reconstruction error before and after.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from ..core.layers import TargetLayer
from ..core.masks import NMPattern
from ..core.statistics import Hessian, InputGram, LayerStatistic, RankGroup, require_finite
from .base import BlockContext, PruningMethod, WrappedMethod

logger = logging.getLogger(__name__)

REFIT_DAMPENING = 0.01  # lambda of the scaled problem, times the mean diagonal (ALPS's value)
REFIT_ITERATIONS = 10  # conjugate-gradient steps on the fixed support (ALPS's value)


@dataclass
class ScaledHessian:
    """The dampened Hessian ``H + lambda I`` scaled to a unit diagonal: ``S^-1 (H + lambda I) S^-1`` with
    ``S = sqrt(diag(H + lambda I))``. A weight ``W`` becomes ``W S`` in the scaled problem."""

    matrix: torch.Tensor
    scale: torch.Tensor
    dampening: float

    @classmethod
    def of(cls, hessian: Hessian, dampening: float) -> ScaledHessian:
        """The scaled problem of ``hessian``, computed once for every layer that shares it (q/k/v, gate/up)."""
        cached = _SCALED.get(hessian)
        if cached is None or cached.dampening != dampening:
            cached = cls.from_matrix(hessian.matrix, dampening)
            _SCALED[hessian] = cached
        return cached

    @classmethod
    def from_matrix(cls, hessian: torch.Tensor, dampening: float) -> ScaledHessian:
        matrix = hessian.detach().to(torch.float32).clone()
        require_finite(matrix)
        diagonal = matrix.diagonal()
        mean = float(diagonal.clamp_min(0).mean())
        if mean <= 0.0:
            logger.warning("A layer received only zero inputs during calibration: its Hessian is replaced by I.")
            mean = 1.0
        diagonal += max(dampening, 1e-6) * mean
        scale = diagonal.clamp_min(1e-12 * mean).sqrt()
        matrix /= scale.unsqueeze(0)
        matrix /= scale.unsqueeze(1)
        return cls(matrix, scale, dampening)

    @cached_property
    def eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of `matrix` (computed in float64, kept in float32): every penalty's
        inverse is then one matrix product."""
        values, vectors = torch.linalg.eigh(self.matrix.double())
        return values.clamp_min(0).float(), vectors.float()

    def shifted_inverse(self, rho: float) -> torch.Tensor:
        """``(matrix + rho I)^-1`` from the eigen decomposition."""
        values, vectors = self.eigen
        return (vectors / (values + rho)) @ vectors.T

    def error(self, weight: torch.Tensor, dense: torch.Tensor) -> float:
        """``||X (weight - dense)||^2 / ||X dense||^2`` for scaled ``(out, in)`` weights."""
        difference = weight - dense
        lost = float(((difference @ self.matrix) * difference).sum())
        total = float(((dense @ self.matrix) * dense).sum())
        return lost / total if total > 0 else 0.0


_SCALED: weakref.WeakKeyDictionary[Hessian, ScaledHessian] = weakref.WeakKeyDictionary()


def conjugate_gradient_refit(
    weight: torch.Tensor, dense: torch.Tensor, kept: torch.Tensor, hessian: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Conjugate gradients on the fixed support ``kept`` from the scaled ``weight`` (zero outside ``kept``)
    towards ``argmin (w - dense) H (w - dense)^T``, one system per row, all rows at once; returns the new
    scaled weight. Each step lowers every row's error (the solver minimises it along conjugate directions)."""
    keep = kept.to(weight.dtype)
    solution = weight * keep
    target = dense @ hessian
    residual = (target - solution @ hessian) * keep
    direction = residual.clone()
    squared = residual.pow(2).sum(1)
    stop = 1e-10 * target.pow(2).sum(1).clamp_min(1e-30)
    for _ in range(iterations):
        if bool((squared <= stop).all()):
            break
        product = direction @ hessian
        curvature = (direction * product).sum(1)
        step = torch.where(curvature > 0, squared / curvature.clamp_min(1e-30), torch.zeros_like(curvature))
        solution.addcmul_(step.unsqueeze(1), direction)
        residual.addcmul_(step.unsqueeze(1), product, value=-1).mul_(keep)
        new_squared = residual.pow(2).sum(1)
        ratio = torch.where(squared > 0, new_squared / squared.clamp_min(1e-30), torch.zeros_like(squared))
        direction = residual + ratio.unsqueeze(1) * direction
        squared = new_squared
    return solution


def refit_layer(
    weight: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor, scaled: ScaledHessian, iterations: int
) -> tuple[torch.Tensor, float, float]:
    """Refit the kept weights of a pruned ``(out, in)`` ``weight`` of the ``dense`` one; return the new weight
    (exactly zero where ``pruned``) and the relative reconstruction errors before and after. A refit that
    would raise the error (only rounding can) is not applied."""
    scale = scaled.scale.unsqueeze(0)
    start, reference = weight * scale, dense * scale
    before = scaled.error(start, reference)
    refitted = conjugate_gradient_refit(start, reference, ~pruned, scaled.matrix, iterations)
    after = scaled.error(refitted, reference)
    if not torch.isfinite(refitted).all() or not after <= before:
        return weight, before, before
    return (refitted / scale).masked_fill_(pruned, 0.0), before, after


class WithHessian(LayerStatistic):
    """A method's own statistic beside the Hessian that the refit needs."""

    def __init__(self, own: LayerStatistic | None, hessian: Hessian) -> None:
        self.own = own
        self.hessian = hessian

    def update(self, inputs: torch.Tensor) -> None:
        if self.own is not None:
            self.own.update(inputs)
        self.hessian.update(inputs)

    def sum_over_ranks(self, ranks: RankGroup) -> None:
        if self.own is not None:
            self.own.sum_over_ranks(ranks)
        self.hessian.sum_over_ranks(ranks)


class Refitted(WrappedMethod):
    """``method``'s masks with the kept weights refitted (see the module docstring)."""

    def __init__(
        self, method: PruningMethod, refit_iterations: int = REFIT_ITERATIONS, dampening: float = REFIT_DAMPENING
    ) -> None:
        super().__init__(method, "refit applies to methods that prune each layer on its own.")
        self.iterations = refit_iterations
        self.dampening = dampening
        self._own_hessian = method.needs_statistics and isinstance(
            method.make_statistic(_probe_layer(), torch.device("meta")), Hessian
        )

    def statistic_bytes(self, rows: int, cols: int) -> int:
        extra = 0 if self._own_hessian else cols * cols * 4
        return self.method.statistic_bytes(rows, cols) + extra

    def working_bytes(self, rows: int, cols: int) -> int:
        # the scaled Hessian, the dense weight, and the solver's residual, direction and product
        return self.method.working_bytes(rows, cols) + cols * cols * 4 + 5 * rows * cols * 4

    def pruning_flops(self, rows: int, cols: int, tokens: int) -> float:
        accumulate = 0.0 if self._own_hessian else 2.0 * cols * cols * tokens
        return (
            self.method.pruning_flops(rows, cols, tokens)
            + accumulate
            + 2.0 * rows * cols * cols * (self.iterations + 3)
        )

    def unit_scores(
        self, consumer: torch.Tensor, producers: list[tuple[torch.Tensor, int]], columns: int, gram: InputGram
    ) -> torch.Tensor | None:
        return self.method.unit_scores(consumer, producers, columns, gram)  # structure: the method's own scores

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> LayerStatistic:
        own = self.method.make_statistic(layer, device) if self.method.needs_statistics else None
        return own if isinstance(own, Hessian) else WithHessian(own, Hessian(layer.in_features, device))

    def prune_matrix(
        self, weight: torch.Tensor, statistic: LayerStatistic | None, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        return self.prune_and_refit(weight, statistic, sparsity, pattern)[0]

    def prune_and_refit(
        self, weight: torch.Tensor, statistic: LayerStatistic, sparsity: float, pattern: NMPattern | None
    ) -> tuple[torch.Tensor, float, float]:
        """Prune ``weight`` in place with the method, refit its kept weights; return the mask and the relative
        reconstruction errors before and after the refit."""
        hessian, own = (statistic, statistic) if isinstance(statistic, Hessian) else (statistic.hessian, statistic.own)
        scaled = ScaledHessian.of(hessian, self.dampening)  # before the method may consume the Hessian
        dense = weight.clone()
        mask = self.method.prune_matrix(weight, own, sparsity, pattern)
        weight.masked_fill_(mask, 0.0)
        refitted, before, after = refit_layer(weight, dense, mask, scaled, self.iterations)
        weight.copy_(refitted)
        return mask, before, after

    def prune_block(self, context: BlockContext) -> dict[str, torch.Tensor]:
        masks = {}
        for layer in context.layers:
            weight = layer.matrix()
            mask, before, after = self.prune_and_refit(
                weight, context.statistics[layer.name], context.sparsity, context.pattern
            )
            layer.write(weight)
            masks[layer.name] = mask
            context.errors[layer.name] = (before, after)
        return masks


def _probe_layer() -> TargetLayer:
    """A one-input linear layer on the meta device, to ask a method which statistic it makes."""
    return TargetLayer("probe", torch.nn.Linear(1, 1, device="meta"), -1)
