"""Which units of a channel group to remove, and the consumer's weights after removal.

The statistic is the Gram matrix of the consumer's calibration inputs (with their sum, for the bias). A
method scores units itself (`PruningMethod.unit_scores`: weight norms for magnitude, Wanda-sp's
``sum |W_ij| ||X_j||`` for Wanda); a second-order method (SparseGPT, as ZipLM and SlimGPT do) returns no
scores and units are removed by Optimal Brain Surgeon on the consumer's Hessian, in rounds, removing the
units whose removal raises the output error least and updating the kept columns each time.

Compensation refits the kept columns of the consumer by least squares to its outputs over the calibration
tokens, ``W_K = W H[:, K] H[K, K]^-1``, dampened towards the old weights; a bias, when the consumer has one, is
refitted with them as a column whose input is always 1 (FLAP's bias compensation is its special case). After
OBS has chosen the units, the kept columns get that refit too (the result of OBS's own sequence of updates, on
every token). `optimum_prune.structured.prune` keeps a refit only where it generalises to held-out sequences.
"""

from __future__ import annotations

import math

import torch

from ..core.statistics import require_finite

ROUNDS = 16  # OBS removes about 1/16 of what it must remove per round, re-scoring in between


def _dampened(matrix: torch.Tensor, dampening: float) -> torch.Tensor:
    """``H + dampening * diag(H)``: each input dampened by its own energy. A dampening by the mean diagonal, as
    SparseGPT's, is dominated by a few massive activations in models that have them (SmolLM2), and then
    drowns every ordinary input: OBS would score units by weight magnitude alone."""
    matrix = matrix.clone()
    diagonal = matrix.diagonal()
    diagonal.add_(dampening * diagonal + 1e-8 * diagonal.mean().clamp_min(1e-8))
    return matrix


def obs_remove(
    consumer: torch.Tensor, hessian: torch.Tensor, columns: int, units: int, remove: int, dampening: float
) -> tuple[torch.Tensor, list[int]]:
    """Remove ``remove`` of the first ``units x columns`` columns of ``consumer`` (``(out, in[+1])``; a last bias
    column is never removed) by Optimal Brain Surgeon on ``hessian``; return the updated weight and the
    removed units. The inverse Hessian is downdated in float64: in float32 its rounding, over many rounds on
    the wide dynamic range of a model with massive activations, can leave a kept unit's block singular."""
    require_finite(hessian)
    weight = consumer.to(torch.float64)
    dampened = _dampened(hessian.to(torch.float64), dampening)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(dampened))
    removed: list[int] = []
    step = max(1, math.ceil(remove / ROUNDS))
    blocks = torch.arange(units * columns, device=weight.device).view(units, columns)
    while len(removed) < remove:
        gone = set(removed)
        alive = [unit for unit in range(units) if unit not in gone]
        index = blocks[alive]  # (alive, columns)
        block_inverse = inverse[index.unsqueeze(-1), index.unsqueeze(-2)]  # (alive, columns, columns)
        unit_weights = weight[:, index]  # (out, alive, columns)
        solved = torch.linalg.solve(block_inverse, unit_weights.permute(1, 2, 0))  # (alive, columns, out)
        errors = (unit_weights.permute(1, 2, 0) * solved).sum((1, 2))
        chosen = [alive[i] for i in errors.argsort()[: min(step, remove - len(removed))].tolist()]
        cols = blocks[chosen].reshape(-1)
        pivot = torch.linalg.inv(inverse[cols][:, cols])
        if not torch.isfinite(pivot).all():  # the downdates lost the inverse: exactly, from the kept columns
            inverse = _kept_inverse(dampened, blocks[removed].reshape(-1))
            pivot = torch.linalg.inv(inverse[cols][:, cols])
        weight -= weight[:, cols] @ pivot @ inverse[cols]
        inverse -= inverse[:, cols] @ pivot @ inverse[cols]
        removed += chosen
    weight[:, blocks[removed].reshape(-1)] = 0.0  # the updates leave removed columns near, not at, zero
    return weight.to(consumer.dtype), sorted(removed)


def _kept_inverse(dampened: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The inverse of the dampened Hessian restricted to the columns not in ``removed`` (what the OBS downdates of
    the full inverse converge to), in place in a full-size matrix whose removed rows and columns are zero."""
    kept = torch.ones(dampened.shape[0], dtype=torch.bool, device=dampened.device)
    kept[removed] = False
    index = kept.nonzero().squeeze(1)
    inverse = torch.zeros_like(dampened)
    inverse[index.unsqueeze(1), index] = torch.cholesky_inverse(torch.linalg.cholesky(dampened[index][:, index]))
    return inverse


def least_squares_refit(
    consumer: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, dampening: float
) -> torch.Tensor:
    """The consumer's kept columns ``K`` refitted to its full outputs, pulled towards their old values:
    ``argmin ||W X - W' X_K||^2 + ||(W' - W_K) D^1/2||^2 = (W H[:, K] + W_K D) (H[K, K] + D)^-1`` with
    ``D = dampening * diag(H[K, K])`` (each input dampened by its own energy, as `obs_remove` does)."""
    gram = hessian[kept][:, kept]
    damped = _dampened(gram, dampening)
    rhs = consumer @ hessian[:, kept] + consumer[:, kept] * (damped.diagonal() - gram.diagonal())
    return torch.linalg.solve(damped, rhs.T).T
