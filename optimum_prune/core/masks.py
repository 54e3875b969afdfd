"""Mask selection shared by every method: exact counts, per-matrix, per-row and N:M masks.

A mask is a boolean tensor of the weight's shape where ``True`` marks a pruned (zeroed) weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Semi-structured sparsity: keep ``n`` weights in every ``m`` consecutive input columns."""

    n: int
    m: int

    @classmethod
    def parse(cls, pattern: str) -> NMPattern | None:
        """Parse ``"unstructured"`` (returns ``None``) or ``"N:M"``; raise a clear error otherwise."""
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a string such as 'unstructured' or '2:4', got {pattern!r}.")
        if pattern.strip().lower() == "unstructured":
            return None
        match = _NM.match(pattern)
        if match is None:
            raise ValueError(f"Unknown pattern {pattern!r}: use 'unstructured' or 'N:M' such as '2:4' or '4:8'.")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(
                f"Invalid N:M pattern {pattern!r}: it keeps N of every M weights, so 0 < N < M is needed "
                "(for example '2:4')."
            )
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights to prune so that ``numel`` weights reach ``sparsity``."""
    return int(round(numel * sparsity))


def split_count(total: int, parts: int) -> torch.Tensor:
    """Split ``total`` into ``parts`` near-equal integer counts that sum exactly to ``total``."""
    edges = torch.div(torch.arange(parts + 1, dtype=torch.int64) * total, parts, rounding_mode="floor")
    return edges[1:] - edges[:-1]


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask the ``count`` lowest scores of the whole tensor (one threshold per tensor); scores equal to the
    threshold are taken in order until exactly ``count`` are masked. (`kthvalue` is several times faster than
    `topk` when ``count`` is a large fraction of the tensor.)"""
    flat = scores.flatten()
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, count).values
    mask = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    mask[ties[: count - int(mask.sum())]] = True
    return mask.view_as(scores)


def row_lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask the lowest scores within each row; rows get near-equal counts summing to the exact total.

    One `kthvalue` per row finds the threshold (several times faster than sorting the rows); scores equal to a
    row's threshold are taken left to right until the row has its count."""
    rows, cols = scores.shape
    counts = split_count(prune_count(rows * cols, sparsity), rows).to(scores.device)
    most = int(counts.max())
    if most == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    thresholds = torch.kthvalue(scores, most, dim=1, keepdim=True).values
    mask = scores < thresholds
    ties = scores == thresholds
    missing = counts - mask.sum(dim=1)  # >= 0: fewer than `most` scores lie below the most-th smallest
    return mask | (ties & (ties.cumsum(dim=1) <= missing.unsqueeze(1)))


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Mask the ``m - n`` lowest scores in every group of ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    pruned = torch.topk(groups, pattern.m - pattern.n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, pruned, True)
    return mask.reshape(rows, cols)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into uint8 bits (row-major, little-endian within each byte), on CPU."""
    flat = mask.flatten().to("cpu", torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    numel = 1
    for size in shape:
        numel *= size
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"A packed mask of {packed.numel()} bytes cannot hold shape {tuple(shape)}.")
    bits = (packed.to(torch.uint8).unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[:numel].bool().view(*shape)
