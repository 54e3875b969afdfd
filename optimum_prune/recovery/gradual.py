"""Pruning while training (Zhu & Gupta, *To prune, or not to prune*, arXiv 1710.01878; EfficientLLM's
pruning-aware training): the sparsity of every target weight rises from 0 to the target along a cubic schedule,

    s_t = s_final * (1 - (1 - t / T_end) ** 3),

and every ``interval`` steps the masks grow to ``s_t`` by dropping, among the weights still kept, those of least
running saliency ``|w * grad|`` (averaged since the last update). Masks only grow, and the weights they cover are
held at zero exactly as `SparsityCallback` holds them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.masks import lowest_mask, prune_count
from .callback import SparsityCallback


def cubic_sparsity(step: int, end: int, final: float) -> float:
    """The scheduled sparsity after ``step`` of ``end`` steps."""
    progress = min(max(step / end, 0.0), 1.0)
    return final * (1.0 - (1.0 - progress) ** 3)


class GradualPruningCallback(SparsityCallback):
    """A `transformers.TrainerCallback` that prunes ``weights`` (``{name: parameter}``) gradually to the
    unstructured ``sparsity`` over ``end_step`` steps, re-choosing its masks every ``interval`` steps; `masks`
    holds them as they grow, ``True`` = pruned."""

    def __init__(self, weights: Mapping[str, nn.Parameter], sparsity: float, end_step: int, interval: int) -> None:
        super().__init__({name: torch.zeros_like(weight, dtype=torch.bool) for name, weight in weights.items()})
        self.weights = dict(weights)
        self.sparsity = sparsity
        self.end_step = end_step
        self.interval = interval
        self.saliency = {name: torch.zeros_like(weight, dtype=torch.float32) for name, weight in weights.items()}
        self._samples = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        with torch.no_grad():
            for name, weight in self.weights.items():
                if weight.grad is not None:
                    self.saliency[name] += (weight.detach() * weight.grad).abs().float()
        self._samples += 1

    def on_step_end(self, args, state, control, **kwargs) -> None:
        step = state.global_step
        if step % self.interval and step < self.end_step:
            return
        target = cubic_sparsity(step, self.end_step, self.sparsity)
        for name, weight in self.weights.items():
            self.masks[name] = self._grow(self.masks[name], self.saliency[name], weight, target)
            self.saliency[name].zero_()
        self._samples = 0
        self._keep = {name: (~mask).to(self.weights[name].dtype) for name, mask in self.masks.items()}
        self.enforce()

    def _grow(self, mask: torch.Tensor, saliency: torch.Tensor, weight: torch.Tensor, target: float) -> torch.Tensor:
        """The mask at ``target``: the old one plus the least salient weights still kept."""
        scores = saliency if self._samples else weight.detach().abs().float()
        count = prune_count(weight.numel(), target)
        return lowest_mask(scores.masked_fill(mask, float("-inf")), count) if count else mask
