"""Pruning methods: the one table of method names; a method is one file in this folder and one row here."""

from __future__ import annotations

from ..errors import InputError
from ..method_settings import GPTQ_BITS, MethodSettings
from .alps import ALPSPruning
from .base import BlockContext, PruningMethod
from .gptq import GPTQRounded
from .magnitude import MagnitudePruning
from .refit import Refitted
from .sparsegpt import SparseGPTPruning
from .sparsellm import SparseLLMPruning
from .wanda import WandaPruning

METHODS: dict[str, type[PruningMethod]] = {
    method.name: method for method in (MagnitudePruning, WandaPruning, SparseGPTPruning, SparseLLMPruning, ALPSPruning)
}


def method_class(name: str) -> type[PruningMethod]:
    """The method called ``name``; a clear error listing the others."""
    if name not in METHODS:
        raise InputError(f"Unknown pruning method {name!r}: choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def get_method(
    name: str, settings: MethodSettings | None = None, refit: bool = False, gptq: str | None = None
) -> PruningMethod:
    """An instance of the method called ``name``, with ``settings`` (default: the method's defaults); with
    ``refit`` (always for a method that `always_refits`), its kept weights refitted after each mask; with
    ``gptq`` (``"int4"``, ``"int8"``), then rounded onto that ONNX grid (`GPTQRounded`)."""
    method = method_class(name)(settings)
    if refit or method.always_refits:
        options = {
            key: getattr(method.settings, key)
            for key in ("dampening", "refit_iterations")
            if hasattr(method.settings, key)
        }
        method = Refitted(method, **options)
    return GPTQRounded(method, gptq) if gptq else method


__all__ = ["GPTQ_BITS", "METHODS", "BlockContext", "MethodSettings", "PruningMethod", "get_method", "method_class"]
