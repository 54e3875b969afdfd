"""Pruning masks as a file: which weights were pruned (not merely zero), one bit per weight.

``sparsity_masks.safetensors`` holds, per pruned weight (keyed by its parameter name, e.g.
``model.layers.0.mlp.up_proj.weight``), a uint8 tensor of packed bits: bit ``i`` of the row-major flattened
weight, little-endian within each byte, is 1 when the weight was pruned. The shapes live in the file's header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..core.layers import target_layer
from ..core.masks import pack_mask, unpack_mask
from ..core.safetensors import open_safetensors
from ..errors import InputError

MASKS_NAME = "sparsity_masks.safetensors"
MASKS_FORMAT = "optimum-prune-masks"
MASKS_VERSION = 1


class Masks(Mapping[str, torch.Tensor]):
    """Boolean pruning masks keyed by parameter name (``True`` = pruned), in the weight's own layout.

    They are kept packed (one bit per weight) and unpacked when read, so holding a large model's masks costs an
    eighth of a byte per weight.
    """

    def __init__(self, packed: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
        if set(packed) != set(shapes):
            raise InputError(f"Masks and shapes name different weights: {sorted(set(packed) ^ set(shapes))}.")
        self._packed = {name: bits.to("cpu", torch.uint8).reshape(-1) for name, bits in packed.items()}
        self._shapes = {name: tuple(int(size) for size in shape) for name, shape in shapes.items()}
        for name, bits in self._packed.items():
            numel = _numel(self._shapes[name])
            if bits.numel() != (numel + 7) // 8:
                raise InputError(
                    f"The mask of {name} has {bits.numel()} bytes but shape {self._shapes[name]} needs "
                    f"{(numel + 7) // 8}: the masks are corrupted."
                )

    @classmethod
    def from_dense(cls, masks: Mapping[str, torch.Tensor]) -> Masks:
        """Pack boolean masks (``True`` = pruned)."""
        return cls(
            {name: pack_mask(mask) for name, mask in masks.items()}, {n: tuple(m.shape) for n, m in masks.items()}
        )

    @classmethod
    def from_pruner(cls, model: nn.Module, layer_masks: Mapping[str, torch.Tensor]) -> Masks:
        """Convert the engine's masks (layer name -> packed ``(out, in)`` bits, as in ``Pruner.masks``) into
        parameter masks in each weight's layout (GPT-2's ``Conv1D`` stores ``(in, out)``); the masks of a fused
        mixture-of-experts parameter's experts are stacked into one."""
        packed, shapes = {}, {}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for name, bits in layer_masks.items():
            layer = target_layer(model, name)
            if layer.expert is not None:
                experts.setdefault(layer.parameter_name, {})[layer.expert] = layer.to_layout(
                    unpack_mask(bits, layer.shape)
                )
                continue
            if layer.transposed:
                bits = pack_mask(unpack_mask(bits, layer.shape).T)
            packed[layer.parameter_name] = bits
            shapes[layer.parameter_name] = tuple(layer.weight.shape)
        for name, masks in experts.items():
            shape = tuple(model.get_parameter(name).shape)
            if sorted(masks) != list(range(shape[0])):
                raise InputError(f"{name} holds {shape[0]} experts but masks were kept for {len(masks)} of them.")
            packed[name] = pack_mask(torch.stack([masks[expert] for expert in range(shape[0])]))
            shapes[name] = shape
        return cls(packed, shapes)

    def packed(self, name: str) -> torch.Tensor:
        """The packed uint8 bits of ``name``."""
        return self._packed[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def sparsity(self, name: str) -> float:
        """The fraction of ``name``'s weights that were pruned."""
        return self[name].sum().item() / max(_numel(self._shapes[name]), 1)

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._packed[name], self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __repr__(self) -> str:
        return f"Masks({len(self)} weights)"


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel


def write_masks(masks: Masks, directory: str | os.PathLike) -> Path:
    """Write ``sparsity_masks.safetensors`` into ``directory`` and return its path."""
    path = Path(directory) / MASKS_NAME
    metadata = {
        "format": MASKS_FORMAT,
        "version": str(MASKS_VERSION),
        "shapes": json.dumps({name: list(masks.shape(name)) for name in masks}),
    }
    save_file({name: masks.packed(name).contiguous() for name in masks}, os.fspath(path), metadata=metadata)
    return path


def read_masks(path: str | os.PathLike) -> Masks:
    """Read a masks file written by `write_masks`; clear errors for anything else or a damaged file."""
    path = Path(path)
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != MASKS_FORMAT:
            raise InputError(f"{path} is not an optimum-prune masks file (its header has no {MASKS_FORMAT!r}).")
        if metadata.get("version") != str(MASKS_VERSION):
            raise InputError(
                f"{path} holds masks of format version {metadata.get('version')}; this optimum-prune reads "
                f"version {MASKS_VERSION}: upgrade optimum-prune."
            )
        try:
            shapes = {name: tuple(shape) for name, shape in json.loads(metadata["shapes"]).items()}
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise InputError(f"{path} is damaged: its header has no valid mask shapes ({error}).") from error
        if set(f.keys()) != set(shapes):
            raise InputError(
                f"{path} is damaged: masks {sorted(set(f.keys()) ^ set(shapes))} are missing or not in its header."
            )
        packed = {name: f.get_tensor(name) for name in shapes}
    for name, bits in packed.items():
        if bits.dtype != torch.uint8:
            raise InputError(f"{path} is damaged: the mask of {name} is {bits.dtype}, not packed uint8 bits.")
    try:
        return Masks(packed, shapes)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from error


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Set every pruned weight of ``model`` back to zero, in place; return how many were nonzero.

    Call it after each optimizer step when fine-tuning a pruned model, so that it keeps its sparsity.
    """
    parameters = dict(model.named_parameters(remove_duplicate=False))
    missing = [name for name in masks if name not in parameters]
    if missing:
        raise KeyError(f"The model has no parameters {missing[:5]} named by the masks: they belong to another model.")
    restored = 0
    for name in masks:
        weight = parameters[name]
        mask = masks[name]
        if tuple(mask.shape) != tuple(weight.shape):
            raise InputError(f"The mask of {name} has shape {tuple(mask.shape)} but the weight {tuple(weight.shape)}.")
        mask = mask.to(weight.device)
        restored += int(torch.count_nonzero(weight[mask]))
        weight.masked_fill_(mask, 0)
    return restored
