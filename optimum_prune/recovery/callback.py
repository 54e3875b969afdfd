"""Keep pruned weights at exactly zero while any `transformers.Trainer` trains the model.

Two guards, as llm-compressor's ``ConstantPruningModifier`` had them: a gradient hook multiplies each masked
weight's gradient by its keep-mask, so AdamW's moments of pruned entries stay zero (and decoupled weight decay
of a zero weight is zero); and after every optimizer step the masks are applied again, against paths that
bypass the hook (gradient clipping, loss scaling, optimizers with other updates). The masks are the ones the
pruner kept, never re-derived from ``|W| == 0``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import InputError


def _parameters(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The masked parameters of ``model`` by mask name; a wrapper's prefix (``module.``) is allowed."""
    named = dict(model.named_parameters(remove_duplicate=False))
    found = {}
    for name, mask in masks.items():
        candidates = [key for key in named if key == name or key.endswith("." + name)]
        if not candidates:
            raise KeyError(f"The model has no parameter {name} named by the masks: they belong to another model.")
        parameter = named[candidates[0]]
        if tuple(parameter.shape) != tuple(mask.shape):
            raise InputError(
                f"The mask of {name} has shape {tuple(mask.shape)} but the weight {tuple(parameter.shape)}."
            )
        found[name] = parameter
    return found


class SparsityCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that keeps every pruned weight exactly zero during training.

    Args:
        masks: ``{parameter name: bool tensor}`` with ``True`` where a weight was pruned (`Pruner.masks` through
            `optimum_prune.export.masks.Masks`, or `optimum_prune.load_masks(folder)`).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SparsityCallback(masks)])
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = masks
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._keep: dict[str, torch.Tensor] = {}
        self._parameters: dict[str, nn.Parameter] = {}

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs) -> None:
        if model is None:
            raise InputError("SparsityCallback needs the model: use it with a transformers Trainer.")
        self._remove_hooks()
        self._parameters = _parameters(model, self.masks)
        for name, parameter in self._parameters.items():
            keep = (~self.masks[name]).to(device=parameter.device, dtype=parameter.dtype)
            self._keep[name] = keep
            with torch.no_grad():
                parameter.mul_(keep)
            if parameter.requires_grad:  # the hook reads the current mask: masks may grow (gradual pruning)
                self._handles.append(parameter.register_hook(lambda grad, name=name: grad * self._keep[name]))

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.enforce()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.enforce()
        self._remove_hooks()

    def enforce(self) -> None:
        """Set every pruned weight back to zero (a no-op when the hooks did their job)."""
        with torch.no_grad():
            for name, parameter in self._parameters.items():
                parameter.mul_(self._keep[name])

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_masks_hold(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise unless every pruned weight of ``model`` is exactly zero (checked before a recovered model is
    written)."""
    parameters = _parameters(model, masks)
    broken = {
        name: int(torch.count_nonzero(parameter.detach()[masks[name].to(parameter.device)]))
        for name, parameter in parameters.items()
    }
    broken = {name: count for name, count in broken.items() if count}
    if broken:
        raise RuntimeError(
            f"{sum(broken.values())} pruned weights are no longer zero after training (in {', '.join(list(broken)[:3])}"
            f"{' ...' if len(broken) > 3 else ''}): the masks were not kept. Nothing was written."
        )
