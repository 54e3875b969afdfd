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

# How strongly a refit is pulled towards the old weights (times each input's own energy): the held-out
# sequences choose. SmolLM2-135M's MLPs choose 1.0 at 8 x 512 calibration tokens.
REFIT_DAMPENINGS = (0.01, 0.1, 1.0, 10.0, 100.0)


def _rows(units: list[int], size: int, device: torch.device) -> torch.Tensor:
    """The row (or column) indices of ``units`` of ``size`` rows each."""
    index = torch.tensor(units, device=device).unsqueeze(1) * size + torch.arange(size, device=device)
    return index.reshape(-1)


def _compensate(full: torch.Tensor, columns: torch.Tensor, gram: InputGram, dampening: float) -> torch.Tensor:
    """The kept columns ``columns`` refitted by least squares on every calibration token, with the pull towards
    the old weights (`REFIT_DAMPENINGS`) under which a refit on the fitted tokens alone best reproduces the
    held-out sequences; the plain kept columns when none does better than they do. A refit of many columns on
    few tokens fits those tokens and little else (as SparseLLM's refits can), so how much to trust it is
    measured, not assumed. Without held-out tokens (fewer sequences than ``held_out_every``), ``dampening``."""
    with_bias = full.shape[1] > gram.gram.shape[0]
    plain = full[:, columns]
    if gram.held is None or not gram.held.tokens:
        return least_squares_refit(full, gram.augmented(with_bias), columns, dampening)

    def held_out_error(weight: torch.Tensor) -> float:
        padded = torch.zeros_like(full)
        padded[:, columns] = weight
        return gram.held.error(full - padded)

    fitted = gram.augmented(with_bias)
    errors = {value: held_out_error(least_squares_refit(full, fitted, columns, value)) for value in REFIT_DAMPENINGS}
    chosen = min(errors, key=errors.__getitem__)
    if errors[chosen] >= held_out_error(plain):
        logger.info("No refit of %d columns does better on held-out calibration tokens: kept unchanged.", len(columns))
        return plain
    return least_squares_refit(full, gram.merged().augmented(with_bias), columns, chosen)


def _consumer_with_bias(group: ChannelGroup) -> tuple[torch.Tensor, bool]:
    """The consumer's ``(out, in)`` weight, with its bias as a last column when it has one."""
    consumer = group.consumer.matrix()
    bias = getattr(group.consumer.module, "bias", None)
    if bias is None:
        return consumer, False
    return torch.cat([consumer, bias.detach().float().unsqueeze(1)], dim=1), True


def _kept_columns(group: ChannelGroup, kept: list[int], full: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """The consumer's columns of units ``kept`` (and its bias column) in ``full``."""
    columns = _rows(kept, group.columns, full.device)
    if with_bias:
        columns = torch.cat([columns, torch.tensor([full.shape[1] - 1], device=full.device)])
    return columns


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
    full, with_bias = _consumer_with_bias(group)
    total = gram.merged() if gram is not None else None
    producers = [(layer.matrix(), rows) for layer, rows in group.producers]
    scores = method.unit_scores(full[:, : group.consumer.in_features], producers, group.columns, total)
    if scores is None:  # second order: OBS chooses the units
        hessian = total.augmented(with_bias=with_bias)
        _, removed = obs_remove(full, hessian, group.columns, group.units, group.units - keep, dampening)
        gone = set(removed)
        kept = [unit for unit in range(group.units) if unit not in gone]
    else:
        kept = sorted(scores.argsort(descending=True)[:keep].tolist())
    columns = _kept_columns(group, kept, full, with_bias)
    shrink_group(group, kept, _compensate(full, columns, gram, dampening) if compensate else full[:, columns])
    return kept


def shrink_group(group: ChannelGroup, kept: list[int], consumer: torch.Tensor | None = None) -> None:
    """Give the layers of ``group`` the shapes of keeping units ``kept``: the producers keep their rows, the
    consumer becomes ``consumer`` (``(out, kept columns [+ 1 for its bias])``; default: its kept columns as
    they are, which a resumed run then overwrites with the saved weights)."""
    with_bias = getattr(group.consumer.module, "bias", None) is not None
    if consumer is None:
        full, _ = _consumer_with_bias(group)
        consumer = full[:, _kept_columns(group, kept, full, with_bias)]
    if with_bias:
        group.consumer.replace(consumer[:, :-1], consumer[:, -1])
    else:
        group.consumer.replace(consumer)
    for layer, rows in group.producers:
        layer.keep_rows(_rows(kept, rows, consumer.device))
