"""The search behind a parameter budget (``structure={"params": 0.7}``, or ``{"size": "250MB"}``): every mix of `structured.budget` is
pruned on a copy of the model with a share of the calibration sequences, and the one whose held-out calibration
loss is lowest is the structure the run prunes."""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PruningConfig
from ..core.layers import find_target_layers
from ..methods import PruningMethod
from ..structured.budget import budget_mixes
from ..structured.plan import plan_structure
from ..structured.spec import Structure
from .structured import StructuredEngine

SEARCH_SEQUENCES = 16  # calibration sequences each candidate is pruned with
HELD_OUT_SEQUENCES = 8  # the next ones, on which the candidates are compared


@dataclasses.dataclass
class BudgetSearch:
    """What the search chose and what it tried: each mix with its kept parameters and held-out loss."""

    budget: str
    chosen: Structure
    candidates: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        return {"budget": self.budget, "chosen": str(self.chosen), "candidates": self.candidates,
                "seconds": round(self.seconds, 1)}  # fmt: skip


def candidate_mixes(model: nn.Module, config: PruningConfig) -> list[tuple[Structure, int]]:
    """The mixes a budget run compares, checked before any work."""
    return budget_mixes(model, config.structure, find_target_layers(model, config.targets, config.ignore))


@torch.no_grad()
def search_budget(
    model: nn.Module,
    config: PruningConfig,
    method: PruningMethod,
    mixes: list[tuple[Structure, int]],
    input_ids: torch.Tensor,
    device: torch.device,
    progress: bool = True,
) -> BudgetSearch:
    """Prune a copy of ``model`` with each of ``mixes`` (`candidate_mixes`) on the first `SEARCH_SEQUENCES`
    calibration sequences (blocks chosen by Block Influence, the cheap criterion) and measure the model's loss
    on the next `HELD_OUT_SEQUENCES` (on the first ones when there are no others); the lowest wins."""
    start = time.perf_counter()
    fit = input_ids[:SEARCH_SEQUENCES]
    held_out = input_ids[SEARCH_SEQUENCES : SEARCH_SEQUENCES + HELD_OUT_SEQUENCES]
    held_out = held_out if len(held_out) else input_ids[:HELD_OUT_SEQUENCES]
    candidates = []
    for mix, kept in tqdm(mixes, desc="Budget search", unit="mix", disable=not progress):
        trial = mix.choosing_blocks_by("influence")
        candidate = copy.deepcopy(model)
        trial_config = dataclasses.replace(config, structure=trial, num_samples=len(fit), reconstruct=None)
        layers = find_target_layers(candidate, config.targets, config.ignore)
        plan = plan_structure(candidate, trial, layers)
        StructuredEngine(candidate, trial_config, method, plan, device=device, progress=False).run(fit)
        place = next(candidate.parameters()).device
        loss = sum(float(candidate(row.to(place), labels=row.to(place)).loss) for row in held_out.split(1))
        candidates.append({"structure": str(mix), "parameters": kept, "loss": round(loss / len(held_out), 6)})
        del candidate  # else the next deepcopy runs beside it: three copies of the model at once
    best = min(range(len(mixes)), key=lambda index: candidates[index]["loss"])
    return BudgetSearch(config.structure.budget, mixes[best][0], candidates, time.perf_counter() - start)
