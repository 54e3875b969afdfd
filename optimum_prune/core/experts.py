"""The calibration inputs of each expert of a fused mixture-of-experts module (transformers 5 ``experts``).

A pre-hook on the experts module feeds a `RoutingRecord` what the router decided for every calibration batch
(the hidden states, each token's chosen experts and their gate weights) without changing the forward. From
that record, `RoutingRecord.expert_inputs` rebuilds one expert's inputs at a time: the tokens routed to it for its first parameter
(``gate_up_proj``/``up_proj``), and, for ``down_proj``, what that expert's own first projection, bias and
gating (the module's ``_apply_gate`` or ``act_fn``) make of them, in the layout the module declares.

How experts are calibrated (`EXPERT_CALIBRATIONS`):
- ``routed``: the tokens the router sends to the expert; an expert that receives fewer than a minimum is
  calibrated on every token instead (too few tokens make its statistics noise);
- ``all``: every token through every expert (llm-compressor's ``moe_calibrate_all_experts``);
- ``weighted``: the routed tokens scaled by their gate weight (MoE-Pruner, arXiv 2410.12013).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .layers import expert_parameters

EXPERT_CALIBRATIONS = ("routed", "all", "weighted")


@dataclass
class RoutedBatch:
    """One call of an experts module: ``hidden`` ``(tokens, hidden)``, each token's ``top_k`` chosen experts
    and their gate weights ``(tokens, top_k)``."""

    hidden: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


class RoutingRecord:
    """What the router of one experts module decided for every calibration batch, and each expert's inputs.

    Feed it the module's calls with `observe` (from a forward pre-hook: the forward itself is unchanged);
    ``keep`` stores the hidden states (where the engine keeps activations).
    """

    def __init__(self, module: nn.Module, keep: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.module = module
        self.batches: list[RoutedBatch] = []
        self._keep = keep
        self._signature = inspect.signature(module.forward)

    @property
    def num_experts(self) -> int:
        return self.module.down_proj.shape[0]

    def observe(self, args: tuple, kwargs: dict) -> None:
        """Record one call (``hidden_states, top_k_index, top_k_weights`` by position or keyword)."""
        hidden, experts, weights = list(self._signature.bind(*args, **kwargs).arguments.values())[:3]
        hidden = self._keep(hidden.reshape(-1, hidden.shape[-1]))
        self.batches.append(RoutedBatch(hidden, experts.detach(), weights.detach()))

    def tokens_per_expert(self) -> list[int]:
        """How many calibration tokens the router sent to each expert."""
        counts = torch.zeros(self.num_experts + 1, dtype=torch.long)
        for batch in self.batches:  # indices past the last expert are expert-parallel sentinels
            flat = batch.experts.flatten().clamp(max=self.num_experts).cpu()
            counts += torch.bincount(flat, minlength=self.num_experts + 1)
        return counts[: self.num_experts].tolist()

    def expert_inputs(
        self, expert: int, calibration: str, every_token: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, the float32 inputs of ``expert``'s first parameter and of its ``down_proj``.

        ``every_token`` (or ``calibration="all"``) runs every token through the expert; otherwise only the
        tokens routed to it, scaled by their gate weight when ``calibration="weighted"``.
        """
        for batch in self.batches:
            yield _expert_inputs(self.module, batch, expert, calibration, every_token)


@torch.no_grad()
def _expert_inputs(
    module: nn.Module, batch: RoutedBatch, expert: int, calibration: str, every_token: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    first, _ = expert_parameters(module)
    device = getattr(module, first).device
    hidden = batch.hidden.to(device, torch.float32)
    scale = None
    if not every_token and calibration != "all":
        tokens, slots = (batch.experts == expert).nonzero(as_tuple=True)
        hidden = hidden[tokens.to(device)]
        if calibration == "weighted":
            scale = batch.weights[tokens, slots].to(device, torch.float32).unsqueeze(1)
    weight = getattr(module, first)[expert].float()
    bias = getattr(module, f"{first}_bias")[expert].float() if module.has_bias else None
    if module.is_transposed:
        projected = hidden @ weight if bias is None else hidden @ weight + bias
    else:
        projected = nn.functional.linear(hidden, weight, bias)
    inner = module._apply_gate(projected) if module.has_gate else module.act_fn(projected)
    if scale is not None:
        hidden, inner = hidden * scale, inner * scale
    return hidden, inner
