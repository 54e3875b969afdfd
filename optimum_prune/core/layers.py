"""Find the decoder blocks and the prunable matrices of any causal LM (linear layers, fused experts), without
tracing."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass
class TargetLayer:
    """A prunable weight matrix; `matrix` views it as ``(out_features, in_features)``.

    Either a linear layer's ``weight`` (``nn.Linear``, GPT-2's transposed ``Conv1D``), or one expert's slice
    ``parameter[expert]`` of a fused mixture-of-experts parameter (transformers 5 ``experts.gate_up_proj`` /
    ``down_proj``), in the layout the experts module declares (``is_transposed``). An expert's name is
    ``<experts module>.<parameter>.<expert>``.
    """

    name: str
    module: nn.Module
    block_index: int
    parameter: str = "weight"
    expert: int | None = None

    @property
    def parameter_name(self) -> str:
        """The name of the parameter holding this matrix (in the model's state dict)."""
        module_name = self.name.rsplit(".", 2)[0] if self.expert is not None else self.name
        return f"{module_name}.{self.parameter}"

    @property
    def weight(self) -> nn.Parameter:
        """The parameter holding this matrix (the whole 3-D tensor for an expert)."""
        return getattr(self.module, self.parameter)

    @property
    def transposed(self) -> bool:
        if self.expert is not None:
            return bool(self.module.is_transposed)
        return isinstance(self.module, Conv1D)

    def _stored(self) -> torch.Tensor:
        weight = self.weight.detach()
        return weight if self.expert is None else weight[self.expert]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self._stored().shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def matrix(self) -> torch.Tensor:
        """The weight as a float32 ``(out, in)`` copy on the weight's device."""
        stored = self._stored()
        return (stored.T if self.transposed else stored).float().clone()

    def write(self, matrix: torch.Tensor) -> None:
        """Copy an ``(out, in)`` matrix back into the weight, in the weight's dtype."""
        self._stored().copy_(matrix.T if self.transposed else matrix)

    def to_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` matrix (a mask) in the layout this matrix is stored in."""
        return matrix.T if self.transposed else matrix

    def replace(self, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Give the layer a new ``(out, in)`` weight of any shape (and bias), in the weight's dtype and place:
        structured pruning makes layers smaller."""
        if self.expert is not None:
            raise ValueError(f"{self.name} is one expert of a fused parameter: it cannot change shape alone.")
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


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D ``down_proj`` and ``gate_up_proj`` (or ``up_proj``) parameters
    and the layout flags its ``@use_experts_implementation`` decorator sets (``has_gate``, ``is_transposed``)."""
    down = getattr(module, "down_proj", None)
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
        and isinstance(down, nn.Parameter)
        and down.dim() == 3
    )


def expert_parameters(module: nn.Module) -> tuple[str, str]:
    """The names of an experts module's first (reads the hidden states) and second (``down_proj``) parameter."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def group_experts(layers: list[TargetLayer]) -> dict[tuple[str, int], list[TargetLayer]]:
    """The expert layers among ``layers``, grouped by (experts module name, expert)."""
    experts: dict[tuple[str, int], list[TargetLayer]] = {}
    for layer in layers:
        if layer.expert is not None:
            experts.setdefault((layer.parameter_name.rpartition(".")[0], layer.expert), []).append(layer)
    return experts


def target_layer(model: nn.Module, name: str) -> TargetLayer:
    """The `TargetLayer` called ``name`` in ``model`` (an expert's name included)."""
    owner, _, last = name.rpartition(".")
    if last.isdigit():
        module_name, _, parameter = owner.rpartition(".")
        module = model.get_submodule(module_name)
        if is_fused_experts(module):
            return TargetLayer(name, module, -1, parameter, int(last))
    return TargetLayer(name, model.get_submodule(name), -1)


def _language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The module holding the language model's blocks and its name: ``model.get_decoder()`` where the model
    names one (a vision-language model's ``language_model``, so its vision tower is never taken for it), else
    the model itself."""
    get_decoder = getattr(model, "get_decoder", None)  # transformers' models have it; it returns a base model itself
    decoder = get_decoder() if callable(get_decoder) else model
    for name, module in model.named_modules():
        if module is decoder and module is not model:
            return name, decoder
    return "", model


def outside_language_model(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a vision-language model outside its language model and head (vision tower, projector);
    none for a causal LM."""
    _, language_model = _language_model(model)
    if language_model is model:
        return []
    inside = {id(p) for p in language_model.parameters()}
    head = model.get_output_embeddings()
    inside |= {id(p) for p in head.parameters()} if head is not None else set()
    return [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in inside]


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the name and the list of decoder blocks: the largest list of identical modules of the language
    model."""
    best: tuple[int, str, nn.ModuleList] | None = None
    scope, language_model = _language_model(model)
    for name, module in language_model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(type(block) is not type(module[0]) for block in module):
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, f"{scope}.{name}" if scope else name, module)
    if best is None:
        where = f" in its language model ({scope}, what get_decoder() returns)" if scope else ""
        raise ValueError(
            f"{type(model).__name__} has no list of decoder blocks with linear layers{where}: optimum-prune prunes "
            "transformer causal LMs (AutoModelForCausalLM) and the language models of vision-language models "
            "(AutoModelForImageTextToText) block by block."
        )
    return best[1], best[2]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)


def find_target_layers(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> list[list[TargetLayer]]:
    """The matrices to prune, grouped by decoder block.

    By default every linear layer inside the decoder blocks (GPT-2's ``Conv1D`` included) and every expert of
    a fused mixture-of-experts module (see `TargetLayer`); embeddings and ``lm_head`` live outside the blocks
    and are never pruned, nor are routers (the router's parameter, and linear layers sitting directly beside
    the experts, such as Qwen2-MoE's ``shared_expert_gate``). ``targets``/``ignore`` are
    glob patterns on the full module name (an expert's: its parameter's name), also matched against its
    trailing components (``"mlp.*"``, ``"q_proj"``, ``"down_proj"``).
    """
    blocks_name, blocks = find_decoder_blocks(model)
    grouped: list[list[TargetLayer]] = []
    for index, block in enumerate(blocks):
        routers = {
            id(child)
            for module in block.modules()
            if any(is_fused_experts(child) for child in module.children())
            for child in module.children()
        }
        layers = []
        for suffix, module in block.named_modules():
            name = f"{blocks_name}.{index}.{suffix}"
            if is_fused_experts(module):
                candidates = [
                    TargetLayer(f"{name}.{parameter}.{expert}", module, index, parameter, expert)
                    for parameter in expert_parameters(module)
                    for expert in range(getattr(module, parameter).shape[0])
                ]
            elif isinstance(module, LINEAR_TYPES) and id(module) not in routers:
                candidates = [TargetLayer(name, module, index)]
            else:
                continue
            for layer in candidates:
                owner = layer.parameter_name.removesuffix(".weight")
                if targets is not None and not _matches(owner, targets):
                    continue
                if ignore and _matches(owner, ignore):
                    continue
                layers.append(layer)
        grouped.append(layers)
    if not any(grouped):
        raise ValueError(
            f"No layer matches targets={targets} and ignore={ignore}: nothing would be pruned. "
            f"Layer names look like {blocks_name}.0.<module>; patterns are fnmatch globs."
        )
    return grouped


def untargeted_matrices(model: nn.Module, layers: list[list[TargetLayer]]) -> dict[str, int]:
    """Matrices (and larger tensors) inside the decoder blocks that no target layer holds, by name, with their
    sizes: routers, ignored layers, 3-D tensors of unknown modules. Pruning leaves them dense. Fused experts'
    biases (``gate_up_proj_bias``: one row per expert) are biases, not matrices."""
    blocks_name, blocks = find_decoder_blocks(model)
    dense_anyway = {
        id(parameter)
        for module in blocks.modules()
        if is_fused_experts(module)
        for name, parameter in module.named_parameters(recurse=False)
        if name.endswith("_bias")
    }
    skip = dense_anyway | {id(layer.weight) for block in layers for layer in block}
    return {
        f"{blocks_name}.{index}.{name}": parameter.numel()
        for index, block in enumerate(blocks)
        for name, parameter in block.named_parameters()
        if parameter.dim() >= 2 and id(parameter) not in skip
    }
