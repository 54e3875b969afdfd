"""Pruning while training (Zhu & Gupta, *To prune, or not to prune*, arXiv 1710.01878; EfficientLLM's
pruning-aware training): the sparsity of every target weight rises from 0 to the target along a cubic schedule,

    s_t = s_final * (1 - (1 - t / T_end) ** 3),

and every ``interval`` steps the masks grow to ``s_t`` by dropping, among the weights still kept, those of least
running saliency ``|w * grad|`` (averaged since the last update). Masks only grow, and the weights they cover are
held at zero exactly as `SparsityCallback` holds them. The schedule's own state (masks, running saliency) goes
into every Trainer checkpoint, so a run resumed from one grows the same masks as a run never stopped.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.layers import TargetLayer
from ..core.masks import lowest_mask, prune_count
from ..core.memory import peak_memory
from ..core.safetensors import open_safetensors, write_safetensors
from ..errors import InputError
from ..methods import method_class
from ..report import LayerReport, PruningReport
from .callback import SparsityCallback
from .train import RecoveryConfig, RecoveryReport, recover

if TYPE_CHECKING:
    from ..config import PruningConfig


def cubic_sparsity(step: int, end: int, final: float) -> float:
    """The scheduled sparsity after ``step`` of ``end`` steps."""
    progress = min(max(step / end, 0.0), 1.0)
    return final * (1.0 - (1.0 - progress) ** 3)


STATE_FILE = "gradual_state.safetensors"  # in each checkpoint folder
_SAMPLES = "samples"


class GradualSchedule(SparsityCallback, ABC):
    """What the gradual callbacks share: masks that grow during training, and a state (`schedule_state`) that
    is written into every Trainer checkpoint and read back when training resumes from one."""

    _samples: int  # optimizer steps of saliency gathered since the masks last grew

    @abstractmethod
    def schedule_state(self) -> dict[str, torch.Tensor]:
        """The tensors a resumed run needs to continue the schedule exactly."""

    @abstractmethod
    def load_schedule_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from `schedule_state`'s tensors (on the CPU)."""

    def on_save(self, args, state, control, **kwargs) -> None:
        tensors = {**self.schedule_state(), _SAMPLES: torch.tensor(self._samples)}
        write_safetensors(_checkpoint(args, state) / STATE_FILE, {k: v.detach().cpu() for k, v in tensors.items()})

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs) -> None:
        if state.global_step:  # the Trainer resumed from the checkpoint of this step
            with open_safetensors(_checkpoint(args, state) / STATE_FILE) as file:
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
            self._samples = int(tensors.pop(_SAMPLES))
            self.load_schedule_state(tensors)
        super().on_train_begin(args, state, control, model=model, **kwargs)


def _checkpoint(args: Any, state: Any) -> Path:
    """The folder of the Trainer's checkpoint at the current step."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


class GradualPruningCallback(GradualSchedule):
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

    def schedule_state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"mask.{name}": mask for name, mask in self.masks.items()},
            **{f"saliency.{name}": saliency for name, saliency in self.saliency.items()},
        }

    def load_schedule_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, weight in self.weights.items():
            self.masks[name] = tensors[f"mask.{name}"].to(weight.device)
            self.saliency[name] = tensors[f"saliency.{name}"].to(weight.device)

    def _grow(self, mask: torch.Tensor, saliency: torch.Tensor, weight: torch.Tensor, target: float) -> torch.Tensor:
        """The mask at ``target``: the old one plus the least salient weights still kept."""
        scores = saliency if self._samples else weight.detach().abs().float()
        count = prune_count(weight.numel(), target)
        return lowest_mask(scores.masked_fill(mask, float("-inf")), count) if count else mask


def check_gradual(config: PruningConfig) -> None:
    """Refuse, before any work, what pruning while training cannot reach: an unstructured, uniform sparsity, or
    a structure of MLP channels and KV groups, not both."""
    structure = config.structure
    if structure is not None and config.sparsity:
        raise InputError(
            "Gradual pruning reaches a structure or a sparsity, not both: prune the structure gradually, then the "
            "saved smaller model."
        )
    if structure is not None and (structure.layers or structure.experts):
        raise InputError(
            "Gradual structured pruning removes MLP channels and KV groups; blocks and experts are removed "
            "one-shot: prune them first (prune()), then recover()."
        )
    if structure is not None and structure.is_budget:
        raise InputError(
            f"Gradual structured pruning takes fractions (mlp=, attention=); a budget ({structure.budget}) is "
            "searched one-shot: use --recover-schedule one-shot (prune() then recover()), or give mlp=/attention=."
        )
    if structure is None and (config.nm_pattern is not None or config.allocation != "uniform"):
        raise InputError("Gradual pruning prunes to an unstructured, uniform sparsity: drop pattern and OWL.")
    if config.refit or method_class(config.method).always_refits:
        what = "refit" if config.refit else f"method {config.method!r} (it always refits)"
        raise InputError(
            f"Gradual pruning grows its masks from training saliency and never calls the method's solver, so "
            f"{what} would do nothing: drop it (use --method magnitude), or prune one-shot."
        )


SCHEDULE_FILE = "schedule.json"  # in the work folder: what the schedule was started with


def schedule_settings(config: PruningConfig, max_steps: int, interval: int | None) -> dict[str, Any]:
    """What must stay the same for a gradual run to resume: where the schedule goes and how fast."""
    return {
        "sparsity": config.sparsity,
        "structure": config.to_dict()["structure"],
        "targets": config.targets,
        "ignore": config.ignore,
        "max_steps": max_steps,
        "interval": interval,
    }


def check_same_schedule(work_dir: str | Path, settings: dict[str, Any]) -> None:
    """Refuse to resume gradual pruning in ``work_dir`` with another schedule than the one it was started with
    (the masks grown so far belong to that one)."""
    path = Path(work_dir) / SCHEDULE_FILE
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in {*saved, *settings} if saved.get(key) != settings.get(key))
        if changed:
            before = ", ".join(f"{key}={saved.get(key)!r}" for key in changed)
            now = ", ".join(f"{key}={settings.get(key)!r}" for key in changed)
            raise InputError(
                f"Cannot resume the gradual pruning in {work_dir}: it was started with {before}, this run asks for "
                f"{now}. Run it with the settings it was started with, or delete {work_dir} to start over."
            )


def record_schedule(work_dir: str | Path, settings: dict[str, Any]) -> None:
    """Keep the schedule's settings in ``work_dir``, for `check_same_schedule` when the run resumes."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    (Path(work_dir) / SCHEDULE_FILE).write_text(json.dumps(settings, sort_keys=True), encoding="utf-8")


def prune_gradually(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: PruningConfig,
    layers: list[list[TargetLayer]],
    dataset: Any,
    recovery: RecoveryConfig,
    work_dir: str | Path,
    *,
    interval: int | None = None,
    **training: Any,
) -> tuple[nn.Module, dict[str, torch.Tensor], PruningReport, RecoveryReport]:
    """Train ``model`` while its target ``layers`` are pruned to ``config.sparsity`` along the cubic schedule over
    the first 75% of the steps (masks re-chosen every ``interval`` steps, default a tenth of those), the rest
    with the masks fixed; return the model, the masks by weight name, the report (measured) and the training
    report. ``training`` goes to `recover` (teacher, text column...)."""
    if any(layer.expert is not None for block in layers for layer in block):
        raise InputError(
            "Gradual pruning chooses one mask per weight tensor, and fused mixture-of-experts parameters hold many "
            "experts: prune one-shot and then recover, or leave the experts out with ignore=['*.experts.*']."
        )
    weights = {f"{layer.name}.weight": layer.module.weight for block in layers for layer in block}
    end = max(1, round(0.75 * recovery.max_steps))
    schedule = GradualPruningCallback(weights, config.sparsity, end, interval or max(1, end // 10))
    start = time.perf_counter()
    model, trained = recover(model, tokenizer, {}, dataset, recovery, work_dir, callback=schedule, **training)
    report = PruningReport(
        method="gradual |w * grad|",
        pattern=config.pattern,
        target_sparsity=config.sparsity,
        allocation="uniform",
        layers=[
            LayerReport(
                layer.name,
                index,
                layer.shape,
                config.sparsity,
                schedule.masks[f"{layer.name}.weight"].float().mean().item(),
            )
            for index, block in enumerate(layers)
            for layer in block
        ],
        total_seconds=time.perf_counter() - start,
        peak_memory_bytes=peak_memory(next(model.parameters()).device),
    )
    return model, schedule.masks, report, trained
