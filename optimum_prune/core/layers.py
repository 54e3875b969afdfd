"""Find the decoder blocks and the prunable linear layers of any causal LM, without tracing."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass
class TargetLayer:
    """A prunable linear layer; `matrix` views its weight as ``(out_features, in_features)``."""

    name: str
    module: nn.Module
    block_index: int

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def matrix(self) -> torch.Tensor:
        """The weight as a float32 ``(out, in)`` copy on the weight's device."""
        weight = self.module.weight.detach()
        return (weight.T if self.transposed else weight).float().clone()

    def write(self, matrix: torch.Tensor) -> None:
        """Copy an ``(out, in)`` matrix back into the weight, in the weight's dtype."""
        weight = self.module.weight
        weight.data.copy_(matrix.T if self.transposed else matrix)

    def replace(self, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Give the layer a new ``(out, in)`` weight of any shape (and bias), in the weight's dtype and place:
        structured pruning makes layers smaller."""
        weight = self.module.weight
        data = (matrix.T if self.transposed else matrix).to(weight.dtype).contiguous()
        self.module.weight = nn.Parameter(data.to(weight.device), requires_grad=weight.requires_grad)
        if bias is not None:
            old = self.module.bias
            self.module.bias = nn.Parameter(bias.to(old.dtype).to(old.device), requires_grad=old.requires_grad)
        out_features, in_features = matrix.shape
        if self.transposed:  # transformers' Conv1D(nf, nx): nf outputs
            self.module.nf = out_features
        else:
            self.module.in_features, self.module.out_features = in_features, out_features

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the output features ``rows`` (of the weight and the bias)."""
        bias = getattr(self.module, "bias", None)
        self.replace(self.matrix()[rows], bias.detach()[rows].clone() if bias is not None else None)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the name and the list of decoder blocks: the largest list of identical modules."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(type(block) is not type(module[0]) for block in module):
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of decoder blocks with linear layers: optimum-prune prunes "
            "transformer causal LMs (AutoModelForCausalLM) block by block."
        )
    return best[1], best[2]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)


def find_target_layers(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> list[list[TargetLayer]]:
    """The layers to prune, grouped by decoder block.

    By default every linear layer inside the decoder blocks (GPT-2's ``Conv1D`` included); embeddings and
    ``lm_head`` live outside the blocks and are never pruned. ``targets``/``ignore`` are glob patterns on the
    full module name, also matched against its trailing components (``"mlp.*"``, ``"q_proj"``).
    """
    blocks_name, blocks = find_decoder_blocks(model)
    grouped: list[list[TargetLayer]] = []
    for index, block in enumerate(blocks):
        layers = []
        for suffix, module in block.named_modules():
            if not isinstance(module, LINEAR_TYPES):
                continue
            name = f"{blocks_name}.{index}.{suffix}"
            if targets is not None and not _matches(name, targets):
                continue
            if ignore and _matches(name, ignore):
                continue
            layers.append(TargetLayer(name, module, index))
        grouped.append(layers)
    if not any(grouped):
        raise ValueError(
            f"No layer matches targets={targets} and ignore={ignore}: nothing would be pruned. "
            f"Layer names look like {blocks_name}.0.<module>; patterns are fnmatch globs."
        )
    return grouped


def untargeted_matrices(model: nn.Module, layers: list[list[TargetLayer]]) -> dict[str, int]:
    """Matrices (and larger tensors) inside the decoder blocks that no target layer holds, by name, with their
    sizes: fused 3-D mixture-of-experts weights, routers, ignored layers. Pruning leaves them dense."""
    blocks_name, blocks = find_decoder_blocks(model)
    targeted = {id(layer.module.weight) for block in layers for layer in block}
    return {
        f"{blocks_name}.{index}.{name}": parameter.numel()
        for index, block in enumerate(blocks)
        for name, parameter in block.named_parameters()
        if parameter.dim() >= 2 and id(parameter) not in targeted
    }
