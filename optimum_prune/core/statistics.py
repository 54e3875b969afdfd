"""Calibration statistics gathered from a layer's inputs, in float32 whatever the model dtype."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch


class LayerStatistic(ABC):
    """Accumulates a statistic over the calibration inputs of one layer."""

    @abstractmethod
    def update(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs of shape ``(..., in_features)``."""

    @abstractmethod
    def sum_over_ranks(self, ranks: RankGroup) -> None:
        """Turn this statistic into that of every rank's tokens (a distributed run). Sums are reduced as sums,
        so the result does not depend on how the samples were split."""


class RankGroup(Protocol):
    """The ranks of a distributed run, as statistics see them (`optimum_prune.engine.distributed.Ranks`)."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place."""

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""


def _sum_tokens(tokens: int, ranks: RankGroup, device: torch.device) -> int:
    total = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
    ranks.all_reduce(total)
    return int(total.item())


class InputNorms(LayerStatistic):
    """Squared L2 norm of every input feature over all calibration tokens (Wanda's ``||X_j||^2``)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.squared_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.squared_norms += x.pow(2).sum(dim=0)
        self.tokens += x.shape[0]

    def sum_over_ranks(self, ranks: RankGroup) -> None:
        ranks.all_reduce(self.squared_norms)
        self.tokens = _sum_tokens(self.tokens, ranks, self.squared_norms.device)


class Hessian(LayerStatistic):
    """Running mean of ``2 X^T X`` over calibration tokens (SparseGPT's layer-wise Hessian).

    Only the upper triangle is accumulated, in column panels (a product per panel with the columns from it
    onward: about 56% of the full product's FLOPs); `matrix` mirrors it in place into the full symmetric
    matrix, and `inverse_cholesky` turns that, in place too, into the factor SparseGPT needs, once for all
    the layers sharing this statistic.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self._matrix: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._panel = gram_panel(in_features)
        self._symmetric = False
        self._inverse: torch.Tensor | None = None
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        if self._symmetric:
            raise RuntimeError("The Hessian is complete: it takes no more inputs once `matrix` was read.")
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        total = self.tokens + x.shape[0]
        add_upper_gram(self._matrix, x, self._panel, beta=self.tokens / total, alpha=2.0 / total)
        self.tokens = total

    def sum_over_ranks(self, ranks: RankGroup) -> None:
        """The mean over every rank's tokens: each rank's mean weighted by its tokens, summed, divided."""
        if self._symmetric or self._matrix is None:
            raise RuntimeError("Sum the Hessian over the ranks before reading it.")
        total = _sum_tokens(self.tokens, ranks, self._matrix.device)
        self._matrix.mul_(self.tokens)
        ranks.all_reduce(self._matrix)
        self._matrix.div_(max(total, 1))
        self.tokens = total

    @property
    def matrix(self) -> torch.Tensor:
        """The full symmetric ``(in_features, in_features)`` float32 Hessian (completed in place when first read)."""
        if self._matrix is None:
            raise RuntimeError("The Hessian was turned into its inverse's Cholesky factor.")
        if not self._symmetric:
            mirror_upper(self._matrix, self._panel)
            self._symmetric = True
        return self._matrix

    def inverse_cholesky(self, dampening: float) -> torch.Tensor:
        """`inverse_hessian_cholesky` of this Hessian, computed once in its place (`matrix` is gone after)."""
        if self._inverse is None:
            self._inverse = inverse_hessian_cholesky(self.matrix, dampening, in_place=True)
            self._matrix = None
        return self._inverse


def gram_panel(width: int) -> int:
    """Column panel width for `add_upper_gram`: at least 128, at most 8 panels."""
    return max(128, -(-width // 8))


def add_upper_gram(matrix: torch.Tensor, x: torch.Tensor, panel: int, *, beta: float = 1.0, alpha: float = 1.0) -> None:
    """``matrix = beta * matrix + alpha * x^T x`` on the upper triangle only, one product per column panel with
    the columns from it onward (about 56% of the full product's FLOPs with 8 panels); see `mirror_upper`."""
    for start in range(0, x.shape[1], panel):
        columns = slice(start, start + panel)
        matrix[columns, start:].addmm_(x[:, columns].T, x[:, start:], beta=beta, alpha=alpha)


def mirror_upper(matrix: torch.Tensor, panel: int) -> None:
    """Complete, in place, a matrix accumulated by `add_upper_gram` into the full symmetric one."""
    size = matrix.shape[0]
    for start in range(0, size, panel):
        stop = min(start + panel, size)
        diagonal = matrix[start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T


def require_finite(hessian: torch.Tensor) -> None:
    """Refuse a calibration statistic that holds NaN or inf: no solver can recover from it, and LAPACK's own
    error for it ("pivots given to lu_solve must all be >= 1", "not positive definite") names no cause."""
    if not torch.isfinite(hessian).all():
        raise ValueError(
            "The calibration Hessian holds NaN or inf values: the model's activations overflow on the "
            "calibration text (try float32 weights, --dtype float32)."
        )


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening: float, *, in_place: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian; dampening grows until it is positive definite.

    ``in_place=True`` uses ``hessian`` as the working matrix (it is overwritten), so that at most two more
    matrices of its size are allocated.
    """
    require_finite(hessian)
    work = hessian if in_place else hessian.clone()
    diagonal = work.diagonal()
    diagonal[diagonal == 0] = 1.0  # inputs that are always zero
    mean_diagonal = float(diagonal.mean())
    added = 0.0
    for attempt in range(6):
        damping = max(dampening, 1e-8) * 10**attempt * mean_diagonal
        diagonal += damping - added
        added = damping
        factor, info = torch.linalg.cholesky_ex(work)
        if info != 0:
            continue
        torch.cholesky_inverse(factor, out=work)
        inverse, info = torch.linalg.cholesky_ex(work, upper=True)
        if info == 0:
            return inverse
        torch.mm(factor, factor.T, out=work)  # back to the dampened Hessian, to dampen it more
    raise RuntimeError("The calibration Hessian is not positive definite even with 10^5 x dampening.")


class InputGram(LayerStatistic):
    """Sums of ``x xᵀ`` and ``x`` over the calibration tokens (float32), and their count. With
    ``held_out_every=k``, every k-th calibration sequence goes to `held` instead, a second `InputGram` that
    judges a fit on tokens it was not fitted to."""

    def __init__(self, in_features: int, device: torch.device, held_out_every: int = 0) -> None:
        self.gram = torch.zeros(in_features, in_features, device=device)
        self.sum = torch.zeros(in_features, device=device)
        self.tokens = 0
        self.held = InputGram(in_features, device) if held_out_every else None
        self._every = held_out_every
        self._sequences = 0

    def update(self, inputs: torch.Tensor) -> None:
        if self.held is not None and inputs.dim() == 3:
            index = torch.arange(self._sequences, self._sequences + inputs.shape[0], device=inputs.device)
            self._sequences += inputs.shape[0]
            held = index % self._every == self._every - 1
            if held.any():
                self.held.update(inputs[held])
            inputs = inputs[~held]
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self.gram.addmm_(x.T, x)
        self.sum += x.sum(0)
        self.tokens += x.shape[0]

    def sum_over_ranks(self, ranks: RankGroup) -> None:
        """Sums as sums; each rank holds out every k-th of its own sequences."""
        ranks.all_reduce(self.gram)
        ranks.all_reduce(self.sum)
        self.tokens = _sum_tokens(self.tokens, ranks, self.gram.device)
        if self.held is not None:
            self.held.sum_over_ranks(ranks)

    def merged(self) -> InputGram:
        """The statistic of every token, held out or not."""
        if self.held is None:
            return self
        total = InputGram(self.gram.shape[0], self.gram.device)
        total.gram = self.gram + self.held.gram
        total.sum = self.sum + self.held.sum
        total.tokens = self.tokens + self.held.tokens
        return total

    def error(self, difference: torch.Tensor) -> float:
        """``sum ||difference x||^2`` over the tokens, for a weight difference ``(out, in[+1 for a bias])``."""
        gram = self.augmented(with_bias=difference.shape[1] > self.gram.shape[0])
        return float(((difference @ gram) * difference).sum())

    def augmented(self, with_bias: bool) -> torch.Tensor:
        """The Gram matrix, with a last row and column for a constant input of 1 when ``with_bias``."""
        if not with_bias:
            return self.gram.clone()
        size = self.gram.shape[0]
        matrix = torch.empty(size + 1, size + 1, device=self.gram.device)
        matrix[:size, :size] = self.gram
        matrix[:size, size] = matrix[size, :size] = self.sum
        matrix[size, size] = self.tokens
        return matrix
