"""Structured pruning while training: MLP channels and KV groups are masked gradually, along the cubic schedule of
`optimum_prune.recovery.gradual`, the least salient first (first-order Taylor, ``sum |w * grad|`` over a unit's
producer rows and consumer columns, as LLM-Pruner scores coupled groups), and physically removed at the end.

A masked unit's consumer columns are zero, so it adds nothing to the output: removing it at the end changes no
output, and the result is the same smaller dense model a one-shot structure gives, with the config's new sizes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.layers import TargetLayer
from ..core.memory import peak_memory
from ..report import LayerReport, PruningReport
from ..structured.groups import ChannelGroup
from ..structured.plan import StructurePlan, apply_new_config, block_groups
from ..structured.prune import shrink_group
from .gradual import GradualSchedule, cubic_sparsity
from .train import RecoveryConfig, RecoveryReport, recover


def _layers(group: ChannelGroup) -> list[tuple[TargetLayer, int, bool]]:
    """``(layer, rows or columns per unit, is the consumer)`` of every layer of ``group``."""
    return [(group.consumer, group.columns, True), *((layer, rows, False) for layer, rows in group.producers)]


class GradualStructureCallback(GradualSchedule):
    """A `transformers.TrainerCallback` that masks whole units of channel ``groups`` (``(group, units to keep)``)
    gradually over ``end_step`` steps, re-choosing every ``interval`` steps; units once masked stay masked."""

    def __init__(self, groups: list[tuple[ChannelGroup, int]], end_step: int, interval: int) -> None:
        masks = {
            f"{layer.name}.weight": torch.zeros_like(layer.module.weight, dtype=torch.bool)
            for group, _ in groups
            for layer, _, _ in _layers(group)
        }
        super().__init__(masks)
        self.groups = groups
        self.end_step = end_step
        self.interval = interval
        self.removed = [torch.zeros(group.units, dtype=torch.bool) for group, _ in groups]
        self.saliency = [torch.zeros(group.units) for group, _ in groups]
        self._samples = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        with torch.no_grad():
            for index, (group, _) in enumerate(self.groups):
                self.saliency[index] += self._unit_scores(group, gradient=True)
        self._samples += 1

    def on_step_end(self, args, state, control, **kwargs) -> None:
        step = state.global_step
        if step % self.interval and step < self.end_step:
            return
        fraction = cubic_sparsity(step, self.end_step, 1.0)
        for index, (group, keep) in enumerate(self.groups):
            scores = self.saliency[index] if self._samples else self._unit_scores(group, gradient=False)
            count = round(fraction * (group.units - keep))
            alive = scores.masked_fill(self.removed[index], float("inf"))
            newly = alive.argsort()[: max(count - int(self.removed[index].sum()), 0)]
            self.removed[index][newly] = True
            self.saliency[index].zero_()
            self._mask_units(group, self.removed[index])
        self._samples = 0
        self._keep = {name: (~mask).to(self._parameters[name].dtype) for name, mask in self.masks.items()}
        self.enforce()

    def schedule_state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"removed.{index}": removed for index, removed in enumerate(self.removed)},
            **{f"saliency.{index}": saliency for index, saliency in enumerate(self.saliency)},
        }

    def load_schedule_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for index, (group, _) in enumerate(self.groups):
            self.removed[index] = tensors[f"removed.{index}"]
            self.saliency[index] = tensors[f"saliency.{index}"]
            self._mask_units(group, self.removed[index])

    def kept_units(self) -> list[list[int]]:
        """Each group's units still kept."""
        return [(~removed).nonzero().flatten().tolist() for removed in self.removed]

    @staticmethod
    def _unit_scores(group: ChannelGroup, gradient: bool) -> torch.Tensor:
        """Per unit, ``sum |w * grad|`` (``gradient``) or ``sum |w|`` over its rows and columns."""
        scores = torch.zeros(group.units)
        for layer, size, consumer in _layers(group):
            weight = layer.module.weight
            if gradient and weight.grad is None:
                continue
            values = (weight * weight.grad if gradient else weight).detach().abs().float()
            values = layer.to_layout(values)  # (out, in)
            per_index = values.sum(0) if consumer else values.sum(1)
            scores += per_index.view(group.units, size).sum(1).cpu()
        return scores

    def _mask_units(self, group: ChannelGroup, removed: torch.Tensor) -> None:
        for layer, size, consumer in _layers(group):
            indices = removed.repeat_interleave(size).to(layer.module.weight.device)
            mask = torch.zeros(layer.shape, dtype=torch.bool, device=indices.device)  # (out, in)
            if consumer:
                mask[:, indices] = True
            else:
                mask[indices] = True
            self.masks[f"{layer.name}.weight"] = layer.to_layout(mask)


def prune_structure_gradually(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    plan: StructurePlan,
    layers: list[list[TargetLayer]],
    dataset: Any,
    recovery: RecoveryConfig,
    work_dir: str | Path,
    *,
    interval: int | None = None,
    **training: Any,
) -> tuple[nn.Module, PruningReport, RecoveryReport]:
    """Train ``model`` while the MLP channels and KV groups of ``plan`` are masked along the cubic schedule over
    the first 75% of the steps (re-chosen every ``interval`` steps, default a tenth of those), then remove them;
    return the smaller model, the report and the training report (`recovery.gradual.check_gradual` has accepted
    the plan's structure). ``training`` goes to `recover`."""
    parameters = sum(p.numel() for p in model.parameters())
    groups = [
        (group, plan.keep[kind])
        for block in block_groups(model, layers, list(plan.keep))
        for kind, group in block.items()
    ]
    end = max(1, round(0.75 * recovery.max_steps))
    schedule = GradualStructureCallback(groups, end, interval or max(1, end // 10))
    start = time.perf_counter()
    model, trained = recover(model, tokenizer, {}, dataset, recovery, work_dir, callback=schedule, **training)
    with torch.no_grad():
        for (group, _), kept in zip(groups, schedule.kept_units(), strict=True):
            shrink_group(group, kept)
    apply_new_config(model, plan.updates, [])
    report = PruningReport(
        method="gradual |w * grad| (structured)",
        pattern="structured",
        target_sparsity=0.0,
        allocation="uniform",
        layers=[  # the target layers of the smaller model, measured
            LayerReport(layer.name, index, layer.shape, 0.0, (layer.matrix() == 0).float().mean().item())
            for index, block in enumerate(layers)
            for layer in block
        ],
        total_seconds=time.perf_counter() - start,
        peak_memory_bytes=peak_memory(next(model.parameters()).device),
        structure={
            **plan.describe(),
            "parameters": {"original": parameters, "kept": sum(p.numel() for p in model.parameters())},
        },
    )
    return model, report, trained
