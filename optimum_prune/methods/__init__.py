"""Pruning methods, looked up by name from a fixed table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BlockContext, PruningMethod
from .magnitude import MagnitudePruning
from .sparsegpt import SparseGPTPruning
from .sparsellm import SparseLLMPruning
from .wanda import WandaPruning

if TYPE_CHECKING:
    from ..config import PruningConfig

METHODS: dict[str, type[PruningMethod]] = {
    method.name: method for method in (MagnitudePruning, WandaPruning, SparseGPTPruning, SparseLLMPruning)
}


def get_method(config: PruningConfig) -> PruningMethod:
    """Instantiate the method that `config.method` names."""
    if config.method not in METHODS:
        raise ValueError(f"Method {config.method!r} is not available; choose one of {', '.join(METHODS)}.")
    return METHODS[config.method](config)


__all__ = ["METHODS", "BlockContext", "PruningMethod", "get_method"]
