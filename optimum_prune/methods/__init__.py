"""Pruning methods: the one table of method names; a method is one file in this folder and one row here."""

from __future__ import annotations

from ..method_settings import MethodSettings
from .base import BlockContext, PruningMethod
from .magnitude import MagnitudePruning
from .sparsegpt import SparseGPTPruning
from .sparsellm import SparseLLMPruning
from .wanda import WandaPruning

METHODS: dict[str, type[PruningMethod]] = {
    method.name: method for method in (MagnitudePruning, WandaPruning, SparseGPTPruning, SparseLLMPruning)
}


def method_class(name: str) -> type[PruningMethod]:
    """The method called ``name``; a clear error listing the others."""
    if name not in METHODS:
        raise ValueError(f"Unknown pruning method {name!r}: choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def get_method(name: str, settings: MethodSettings | None = None) -> PruningMethod:
    """An instance of the method called ``name``, with ``settings`` (default: the method's defaults)."""
    return method_class(name)(settings)


__all__ = ["METHODS", "BlockContext", "MethodSettings", "PruningMethod", "get_method", "method_class"]
