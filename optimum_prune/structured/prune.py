"""Remove units of a channel group in place: the producers lose rows, the consumer loses columns (its kept
columns and bias compensated), and every layer gets its new, smaller shape."""

from __future__ import annotations

import logging

import torch

from ..core.statistics import InputGram
from ..methods import PruningMethod
from .groups import ChannelGroup
from .select import least_squares_refit, obs_remove

logger = logging.getLogger(__name__)


def _rows(units: list[int], size: int, device: torch.device) -> torch.Tensor:
    """The row (or column) indices of ``units`` of ``size`` rows each."""
    index = torch.tensor(units, device=device).unsqueeze(1) * size + torch.arange(size, device=device)
    return index.reshape(-1)


def _better_on_held_out(
    full: torch.Tensor, columns: torch.Tensor, fitted: torch.Tensor, plain: torch.Tensor, gram: InputGram
) -> torch.Tensor:
    """The compensated weights, unless on the held-out calibration sequences they reproduce the consumer's
    outputs worse than the plain kept columns do: a refit of many columns on few tokens can fit those tokens
    and nothing else (as SparseLLM's refits can)."""
    if gram.held is None or not gram.held.tokens:
        return fitted

    def error(weight: torch.Tensor) -> float:
        padded = torch.zeros_like(full)
        padded[:, columns] = weight
        return gram.held.error(full - padded)

    if error(fitted) <= error(plain):
        return fitted
    logger.info("Compensation of %d columns fits the held-out calibration tokens worse: kept unchanged.", len(columns))
    return plain


def prune_group(
    group: ChannelGroup,
    gram: InputGram | None,
    method: PruningMethod,
    keep: int,
    compensate: bool,
    dampening: float,
) -> list[int]:
    """Keep ``keep`` units of ``group`` (chosen by ``method``), shrink its layers and return the kept units.
    ``gram`` (the consumer's inputs) may be ``None`` only for scores that read no activations, uncompensated."""
    consumer = group.consumer.matrix()
    device = consumer.device
    bias = getattr(group.consumer.module, "bias", None)
    full = consumer if bias is None else torch.cat([consumer, bias.detach().float().unsqueeze(1)], dim=1)
    hessian = gram.augmented(with_bias=bias is not None) if gram is not None else None
    producers = [(layer.matrix(), rows) for layer, rows in group.producers]
    scores = method.unit_scores(consumer, producers, group.columns, gram)
    if scores is None:  # OBS compensates as it removes
        updated, removed = obs_remove(full, hessian, group.columns, group.units, group.units - keep, dampening)
        kept = [unit for unit in range(group.units) if unit not in set(removed)]
    else:
        kept = sorted(scores.argsort(descending=True)[:keep].tolist())
    columns = _rows(kept, group.columns, device)
    if bias is not None:
        columns = torch.cat([columns, torch.tensor([full.shape[1] - 1], device=device)])
    new = full[:, columns]
    if compensate:
        fitted = updated[:, columns] if scores is None else least_squares_refit(full, hessian, columns, dampening)
        new = _better_on_held_out(full, columns, fitted, new, gram)
    if bias is None:
        group.consumer.replace(new)
    else:
        group.consumer.replace(new[:, :-1], new[:, -1])
    for layer, rows in group.producers:
        layer.keep_rows(_rows(kept, rows, device))
    return kept
