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


def _compensate(full: torch.Tensor, columns: torch.Tensor, gram: InputGram, dampening: float) -> torch.Tensor:
    """The kept columns ``columns`` refitted by least squares on every calibration token, unless a refit on the
    fitted tokens alone reproduces the held-out sequences worse than the plain kept columns do (a refit of many
    columns on few tokens can fit those tokens and nothing else, as SparseLLM's refits can)."""
    with_bias = full.shape[1] > gram.gram.shape[0]
    plain = full[:, columns]
    if gram.held is not None and gram.held.tokens:

        def held_out_error(weight: torch.Tensor) -> float:
            padded = torch.zeros_like(full)
            padded[:, columns] = weight
            return gram.held.error(full - padded)

        candidate = least_squares_refit(full, gram.augmented(with_bias), columns, dampening)
        if held_out_error(candidate) > held_out_error(plain):
            logger.info(
                "A refit of %d columns does worse on held-out calibration tokens: kept unchanged.", len(columns)
            )
            return plain
    return least_squares_refit(full, gram.merged().augmented(with_bias), columns, dampening)


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
    total = gram.merged() if gram is not None else None
    producers = [(layer.matrix(), rows) for layer, rows in group.producers]
    scores = method.unit_scores(consumer, producers, group.columns, total)
    if scores is None:  # second order: OBS chooses the units
        hessian = total.augmented(with_bias=bias is not None)
        _, removed = obs_remove(full, hessian, group.columns, group.units, group.units - keep, dampening)
        kept = [unit for unit in range(group.units) if unit not in set(removed)]
    else:
        kept = sorted(scores.argsort(descending=True)[:keep].tolist())
    columns = _rows(kept, group.columns, device)
    if bias is not None:
        columns = torch.cat([columns, torch.tensor([full.shape[1] - 1], device=device)])
    new = _compensate(full, columns, gram, dampening) if compensate else full[:, columns]
    if bias is None:
        group.consumer.replace(new)
    else:
        group.consumer.replace(new[:, :-1], new[:, -1])
    for layer, rows in group.producers:
        layer.keep_rows(_rows(kept, rows, device))
    return kept
