"""Structured pruning of mixtures of experts: drop whole experts, the least used and least contributing.

An expert's score is what it adds to the block's output over the calibration tokens routed to it: the sum, over
those tokens, of its gate weight times the norm of its output (REAP, arXiv 2510.13999, and the expert-pruning line
of work), so an expert the router rarely picks, or picks with small weights, or whose output is small, goes first.
Dropping an expert removes its slice of every fused parameter (and bias) of the experts module and its row of
every router parameter beside it (``gate.weight``, ``router.bias``, DeepSeek's ``e_score_correction_bias``), and
the config gets the new expert count, so the result loads with stock transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from ..core.experts import RoutingRecord
from ..core.layers import expert_parameters, is_fused_experts

EXPERTS = "experts"
_NOT_A_COUNT = ("per_tok", "shared", "top", "group")  # expert-named config fields that are not the expert count


def experts_modules(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(parent, experts)`` for every fused experts module of ``block``; the parent holds the router."""
    return [(parent, child) for parent in block.modules() for child in parent.children() if is_fused_experts(child)]


def expert_count_fields(config: PretrainedConfig, experts: int) -> list[str]:
    """The config fields holding the number of routed experts (``num_experts``, ``num_local_experts``,
    ``n_routed_experts``): integers equal to it whose name says expert and is not a per-token or group count."""
    return [
        name
        for name, value in config.to_dict().items()
        if "expert" in name and isinstance(value, int) and value == experts and not any(p in name for p in _NOT_A_COUNT)
    ]


@torch.no_grad()
def expert_scores(record: RoutingRecord) -> torch.Tensor:
    """Each expert's contribution: the sum over its routed tokens of gate weight x the norm of its output."""
    module = record.module
    _, down = expert_parameters(module)
    scores = torch.zeros(record.num_experts, dtype=torch.float64)
    for expert in range(record.num_experts):
        weight = getattr(module, down)[expert].float()
        for _, inner in record.expert_inputs(expert, "weighted"):  # inner is already scaled by the gate weight
            output = inner @ weight if module.is_transposed else inner @ weight.T
            scores[expert] += output.norm(dim=-1).sum().item()
    return scores


@torch.no_grad()
def drop_experts(parent: nn.Module, experts: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the experts ``keep`` (sorted indices): slice the experts' fused parameters and biases, and the
    row-per-expert parameters and buffers that the parent and its other children own directly (the router's
    weight, bias and score correction; a shared expert's layers sit one level deeper and are left alone)."""
    count = experts.down_proj.shape[0]
    owners = [experts, parent, *(child for child in parent.children() if child is not experts)]
    for module in owners:
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or tensor.dim() == 0 or tensor.shape[0] != count:
                    continue
                if module is not experts and tensor.dim() > 2:
                    continue
                sliced = tensor.detach()[keep.to(tensor.device)].clone()
                parameter = store is module._parameters
                store[name] = nn.Parameter(sliced, requires_grad=tensor.requires_grad) if parameter else sliced
        for attribute in ("num_experts", "n_routed_experts"):
            if getattr(module, attribute, None) == count:
                setattr(module, attribute, len(keep))
