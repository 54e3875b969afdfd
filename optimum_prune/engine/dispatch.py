"""Blocks of a model that accelerate dispatched (``from_pretrained(..., device_map=...)``): materialised through
accelerate's own hooks and weights maps, pruned, and written back where accelerate keeps them.

accelerate places each module on a GPU, the CPU or "disk" and attaches an `AlignDevicesHook`; an offloaded
module's tensors sit on the meta device and its hook loads them from ``hook.weights_map`` (a `PrefixedDataset`
over a CPU state dict or an `OffloadedWeightsLoader` of the offload folder and the checkpoint) for each
forward. While the engine works on a block, `load` gives every tensor of the block its value (from the weights
map for offloaded ones) and sets the block's hooks aside, so that the engine's own forwards neither reload nor
drop the weights; `release` writes the pruned values of offloaded tensors back into the weights map (a
memory-mapped file in the offload folder for disk: the checkpoint the weights came from is never written), puts
every tensor back where it was (meta for offloaded ones) and the hooks back on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from accelerate.hooks import ModelHook
from accelerate.utils import has_offloaded_params, named_module_tensors, offload_weight, set_module_tensor_to_device
from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset
from torch import nn

from ..core.layers import find_decoder_blocks
from ..errors import InputError


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` (``from_pretrained(..., device_map=...)`` or ``dispatch_model``)."""
    return getattr(model, "hf_device_map", None) is not None or any(hasattr(m, "_hf_hook") for m in model.modules())


@dataclass
class _Held:
    """A module whose hook is set aside while its block is processed, and where its tensors were."""

    module: nn.Module
    hook: ModelHook
    devices: dict[str, torch.device] = field(default_factory=dict)


class AccelerateDispatch:
    """Loads and releases the blocks of a dispatched model (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._held: list[_Held] = []
        _, blocks = find_decoder_blocks(model)
        inside = set(blocks.modules())
        for module in model.modules():
            whole = module not in inside and has_offloaded_params(module) and module._hf_hook.place_submodules
            if whole and any(block in set(module.modules()) for block in blocks):
                raise InputError(
                    "accelerate offloads this model as a whole (cpu_offload or disk_offload), so no block can be "
                    "loaded on its own: load it with a device_map (per-module placement), or let optimum-prune "
                    "offload it (Pruner.from_pretrained(path, offload='disk'))."
                )
        for module in model.modules():
            if has_offloaded_params(module):
                dataset = _dataset(module)
                if isinstance(dataset, OffloadedWeightsLoader) and dataset.index and dataset.save_folder is None:
                    raise InputError(
                        "The model has disk-offloaded weights but no offload folder to write their pruned values "
                        "to: load it with from_pretrained(..., offload_folder=DIR)."
                    )

    def load(self, block: nn.Module) -> None:
        """Give every tensor of ``block`` its value, on the device it has (offloaded ones on the CPU), and set the
        block's hooks aside."""
        for module in block.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is None:
                continue
            held = _Held(module, hook)
            offloaded = has_offloaded_params(module)
            recurse = bool(getattr(hook, "place_submodules", False))  # the hook holds its submodules' tensors too
            for name, tensor in named_module_tensors(module, include_buffers=True, recurse=recurse):
                held.devices[name] = tensor.device
                if offloaded and tensor.is_meta and name in hook.weights_map:
                    set_module_tensor_to_device(module, name, "cpu", value=hook.weights_map[name])
            module._hf_hook = ModelHook()  # accelerate's forward wrapper calls whatever hook the module holds now
            self._held.append(held)

    def release(self, block: nn.Module) -> None:
        """Write the values of ``block``'s offloaded tensors back to their weights maps, return every tensor to
        where it was, and the hooks to their modules."""
        for held in self._held:
            module, hook = held.module, held.hook
            module._hf_hook = hook
            offloaded = has_offloaded_params(module)
            tensors = dict(named_module_tensors(module, include_buffers=True, recurse=True))
            for name, device in held.devices.items():
                tensor = tensors[name]
                if offloaded and name in hook.weights_map:
                    _write_back(hook.weights_map, name, tensor.detach())
                set_module_tensor_to_device(module, name, device, value=None if device.type == "meta" else tensor)
        self._held = []


def _dataset(module: nn.Module):
    weights_map = module._hf_hook.weights_map
    return weights_map.dataset if isinstance(weights_map, PrefixedDataset) else weights_map


def _write_back(weights_map, name: str, value: torch.Tensor) -> None:
    """Store ``value`` as the offloaded tensor ``name`` of a weights map: in its CPU state dict, or as a memory-
    mapped file in its offload folder (the index then points there, not at the checkpoint it was read from)."""
    key = f"{weights_map.prefix}{name}" if isinstance(weights_map, PrefixedDataset) else name
    dataset = weights_map.dataset if isinstance(weights_map, PrefixedDataset) else weights_map
    value = value.to("cpu").clone()
    if isinstance(dataset, OffloadedWeightsLoader):
        if key in dataset.state_dict:
            dataset.state_dict[key] = value
            return
        os.makedirs(dataset.save_folder, exist_ok=True)
        offload_weight(value, key, dataset.save_folder, index=dataset.index)
        return
    dataset[key] = value
