"""What structured pruning is asked to remove (standard library only: the CLI and the config read it)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

KINDS = ("mlp", "attention", "layers", "experts")
LAYER_CRITERIA = ("loss", "influence")
DEFAULT_LAYER_CRITERION = "loss"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(value: int | str) -> int:
    """Bytes of ``value``: an integer, or a number with a unit (``"250MB"``, ``"1.5GiB"``, decimal or binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if match is None:
        raise InputError(f"structure size={value!r} must be a size in bytes, e.g. 250MB or 1.5GiB.")
    return int(float(match[1]) * SIZE_UNITS[(match[2] or "").upper()])


@dataclass
class Structure:
    """Fractions removed in every block: ``mlp`` of the MLP channels (rounded so that the kept width is a
    multiple of ``align``), ``attention`` of the attention heads (in whole KV groups: a removed group takes
    its query heads with it), ``layers`` of the decoder blocks and ``experts`` of the routed experts of a mixture
    of experts (those contributing least to the output). ``layer_criterion`` chooses the blocks: ``"loss"``
    removes them one at a time, each time the one whose removal raises the calibration loss least (SLEB);
    ``"influence"`` removes those that change their input least (Block Influence, ShortGPT). ``compensate``
    refits the kept weights of the consuming layers by least squares (second-order methods do it as they
    remove). ``params`` is a budget instead of fractions: the share of the parameters to keep, the mix of MLP
    width, KV groups and blocks chosen by a search (`engine.budget`); ``size`` is the same budget in bytes of
    the saved weights (``"250MB"``, ``"1.5GiB"`` or an integer), at the model's dtype."""

    mlp: float = 0.0
    attention: float = 0.0
    layers: float = 0.0
    experts: float = 0.0
    align: int = 32
    compensate: bool = True
    layer_criterion: str = DEFAULT_LAYER_CRITERION
    params: float = 0.0
    size: int | str = 0

    def __post_init__(self) -> None:
        for kind in KINDS:
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"structure {kind}={value!r} must be a number in [0, 1).")
            if not 0.0 <= value < 1.0:
                raise InputError(
                    f"structure {kind}={value} must be in [0, 1): it is the fraction removed (1 would remove all)."
                )
            setattr(self, kind, float(value))
        if isinstance(self.params, bool) or not isinstance(self.params, (int, float)) or not 0 <= self.params < 1:
            raise InputError(f"structure params={self.params!r} must be in (0, 1): the share of parameters kept.")
        self.params = float(self.params)
        self.size = parse_size(self.size)
        if self.size < 0:
            raise InputError(f"structure size={self.size} must be a positive size in bytes.")
        if self.params and self.size:
            raise InputError("structure params= and size= are two budgets: give one.")
        if self.is_budget and any(getattr(self, kind) for kind in KINDS):
            given = ", ".join(f"{kind}=" for kind in KINDS if getattr(self, kind))
            name = "params" if self.params else "size"
            raise InputError(f"structure {name}= chooses the mix itself: drop {given} (or drop {name}=).")
        if not self.is_budget and not any(getattr(self, kind) for kind in KINDS):
            raise InputError(
                f"structure removes nothing: give a fraction for one of {', '.join(KINDS)}, or a budget params= or "
                "size=."
            )
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise InputError(f"structure align={self.align!r} must be a positive integer (channels).")
        if not isinstance(self.compensate, bool):
            raise InputError(f"structure compensate={self.compensate!r} must be true or false.")
        if self.layer_criterion not in LAYER_CRITERIA:
            raise InputError(
                f"structure layer_criterion={self.layer_criterion!r}: choose one of {', '.join(LAYER_CRITERIA)}."
            )
        if self.layer_criterion != DEFAULT_LAYER_CRITERION and not (self.layers or self.is_budget):
            raise InputError(
                f"structure layer_criterion={self.layer_criterion} chooses which blocks go, and no blocks are removed: "
                "add layers=FRACTION (or a params=/size= budget), or drop layer_criterion."
            )

    @property
    def is_budget(self) -> bool:
        """Whether a search chooses the mix (a ``params`` or ``size`` budget)."""
        return bool(self.params or self.size)

    def choosing_blocks_by(self, criterion: str) -> Structure:
        """This structure with ``criterion`` choosing its removed blocks (itself when it removes none)."""
        return dataclasses.replace(self, layer_criterion=criterion) if self.layers else self

    @property
    def budget(self) -> str:
        """The budget as ``--structure`` takes it (``params=0.7``, ``size=250000000``); empty without one."""
        if self.params:
            return f"params={self.params:g}"
        return f"size={self.size}" if self.size else ""

    def __str__(self) -> str:
        """``mlp=0.25 layers=0.1`` (what is removed), as ``--structure`` takes it."""
        removed = [f"{kind}={getattr(self, kind):g}" for kind in KINDS if getattr(self, kind)]
        removed += [self.budget] if self.is_budget else []
        if (self.layers or self.is_budget) and self.layer_criterion != DEFAULT_LAYER_CRITERION:
            removed.append(f"layer_criterion={self.layer_criterion}")
        return " ".join(removed)

    @classmethod
    def from_value(cls, value: Structure | dict[str, Any]) -> Structure:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"structure must be a dict such as {{'mlp': 0.25}}, got {type(value).__name__}.")
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise InputError(f"Unknown structure {', '.join(unknown)}: use {', '.join(known)}.")
        return cls(**value)


def parse_structure(items: list[str]) -> dict[str, Any]:
    """``["mlp=0.25", "layers=0.1", "compensate=false"]`` (the CLI's ``--structure``) as a dict."""
    values: dict[str, Any] = {}
    for item in items:
        key, separator, text = (part.strip() for part in item.partition("="))
        if not separator or not key or not text:
            raise InputError(f"cannot read {item!r}: use KIND=FRACTION, e.g. mlp=0.25 attention=0.33 layers=0.1.")
        if key in values:
            raise InputError(f"{key} is given twice: give each KIND once.")
        if key in ("layer_criterion", "size"):
            values[key] = text
            continue
        if key == "compensate":
            if text.lower() not in ("true", "false"):
                raise InputError(f"compensate={text!r} must be true or false.")
            values[key] = text.lower() == "true"
            continue
        try:
            values[key] = int(text) if key == "align" else float(text)
        except ValueError:
            raise InputError(f"{key}={text!r} is not a number.") from None
    return values
