"""A parameter budget instead of fractions: the mixes of KV groups, blocks and MLP width that keep at most a
share of the model's parameters, or at most a size in bytes (the search among them is `engine.budget`)."""

from __future__ import annotations

from torch import nn

from ..core.layers import TargetLayer
from ..errors import InputError
from .groups import ATTENTION, MLP
from .plan import block_groups, kept_parameters, plan_structure
from .spec import Structure

BLOCK_SHARES = (0.0, 0.1, 0.2)  # shares of the blocks a mix may remove before the MLP makes up the rest
MAX_MIXES = 2 * len(BLOCK_SHARES) + 1  # no or one KV group removed at each block share, and the blocks alone
COMPARABLE = 0.03  # mixes keeping this share of the model less than the fullest one remove more: not compared


def budget_mixes(model: nn.Module, budget: Structure, layers: list[list[TargetLayer]]) -> list[tuple[Structure, int]]:
    """``(structure, kept parameters)`` of every mix that meets the budget (`budget_parameters`; and keeps no less than the
    fullest such mix minus `COMPARABLE` of the model): for no KV group and one KV
    group removed (where the config allows it), and a tenth or a fifth of the blocks or none removed, the widest
    MLP (a multiple of ``align``) that brings the model within the budget; and the blocks alone. Checked like any
    structure (a meta-device model of each), counted exactly as the saved model's parameters."""
    total = sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())
    target = budget_parameters(model, budget, total)
    groups = applicable_groups(model, layers)
    common = {"align": budget.align, "compensate": budget.compensate}
    blocks, found = len(layers), {}
    removals = [(kv, round(blocks * share)) for kv in (0, 1) for share in BLOCK_SHARES]
    for kv, removed in removals:
        base = {"layers": removed / blocks, **common}
        if kv:
            if ATTENTION not in groups or groups[ATTENTION].units < 2:
                continue
            base["attention"] = kv / groups[ATTENTION].units
        mix = _with_mlp(model, base, target, groups[MLP].units if MLP in groups else 0, layers)
        if mix is not None:
            found[str(mix[0])] = mix
    for removed in range(1, blocks):  # the blocks alone: the fewest that meet the budget
        mix = _counted(model, {"layers": removed / blocks, **common}, layers)
        if mix is not None and mix[1] <= target:
            found[str(mix[0])] = mix
            break
    fullest = max((mix[1] for mix in found.values()), default=0)
    found = {name: mix for name, mix in found.items() if mix[1] >= fullest - COMPARABLE * total}
    if not found:
        kinds = ", ".join([{MLP: "MLP width", ATTENTION: "KV groups"}[kind] for kind in groups] + ["blocks"])
        raise InputError(
            f"No mix of {kinds} (what {type(model).__name__} can lose) keeps at most {budget.budget} of its "
            f"{total:,} parameters: give a larger budget."
        )
    return list(found.values())


def applicable_groups(model: nn.Module, layers: list[list[TargetLayer]]) -> dict:
    """The first block's MLP and attention channel groups, each only where the model has it among the target
    layers (GPT-2 has no separate KV projections, a mixture of experts no dense MLP): a budget searches those."""
    groups = {}
    for kind in (MLP, ATTENTION):
        try:
            groups.update(block_groups(model, layers, [kind])[0] if layers else {})
        except InputError:
            continue
    return groups


def budget_parameters(model: nn.Module, budget: Structure, total: int) -> float:
    """The parameters a budget keeps at most: ``params`` of ``total``, or ``size`` bytes over the bytes of one
    weight in the model's dtype (what the saved safetensors take); a size the model already fits is refused."""
    if budget.params:
        return budget.params * total
    itemsize = next(model.parameters()).element_size()
    if budget.size >= total * itemsize:
        raise InputError(
            f"structure size={budget.size:,} bytes is no smaller than {type(model).__name__}'s {total * itemsize:,} "
            f"bytes ({total:,} parameters of {itemsize} bytes): give a smaller size."
        )
    return budget.size / itemsize


def _counted(model: nn.Module, values: dict, layers: list[list[TargetLayer]]) -> tuple[Structure, int] | None:
    """The structure of ``values`` and its kept parameters, or ``None`` when it is not a valid structure."""
    try:
        structure = Structure(**values)  # the blocks' criterion is the budget's, set by the caller on the chosen mix
        return structure, kept_parameters(model, plan_structure(model, structure, layers))
    except InputError:
        return None


def _with_mlp(
    model: nn.Module, base: dict, target: float, width: int, layers: list[list[TargetLayer]]
) -> tuple[Structure, int] | None:
    """``base`` with the widest MLP (kept channels a multiple of ``align``) that meets ``target``: a binary
    search, as the kept parameters grow with the width."""
    without = _counted(model, base, layers) if base["layers"] or base.get("attention") else None
    if without is not None and without[1] <= target:
        return without
    align = base["align"] if width >= base["align"] else 1
    widths = list(range(align, width, align))  # kept channels, every one removing at least one
    best, low, high = None, 0, len(widths) - 1
    while low <= high:
        middle = (low + high) // 2
        mix = _counted(model, {**base, "mlp": 1 - widths[middle] / width}, layers)
        if mix is not None and mix[1] <= target:
            best, low = mix, middle + 1
        else:
            high = middle - 1
    return best
