"""Where block weights live between blocks: CPU RAM (``offload="cpu"``) or the checkpoint on disk
(``offload="disk"``): a meta-device model whose modules are filled from the safetensors checkpoint and
emptied again."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from ..core.memory import trim_heap
from ..core.safetensors import FLOAT_DTYPES, SafetensorsCheckpoint

OFFLOAD_MODES = ("cpu", "disk")


def _named_slots(
    module: nn.Module, prefix: str, recurse: bool = True
) -> Iterable[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(full name, owner module, attribute, tensor)`` of every parameter and buffer of ``module`` (and of
    its submodules when ``recurse``)."""
    owners = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
    for module_name, owner in owners:
        for attribute, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None:
                yield (f"{module_name}.{attribute}" if module_name else attribute), owner, attribute, tensor


def _assign(owner: nn.Module, attribute: str, tensor: torch.Tensor) -> None:
    if attribute in owner._parameters:
        owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attribute] = tensor


class DiskOffload:
    """Materialises modules of a meta-device model from a `SafetensorsCheckpoint`, and empties them again."""

    def __init__(self, checkpoint: SafetensorsCheckpoint) -> None:
        self.checkpoint = checkpoint

    def load(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Fill every meta tensor of ``module`` (named ``prefix.*`` in the checkpoint) from disk, on CPU, in the
        dtype the model declares (as ``from_pretrained`` casts floating-point weights)."""
        slots = [slot for slot in _named_slots(module, prefix, recurse) if slot[0] in self.checkpoint.tensors]
        values = self.checkpoint.read(name for name, *_ in slots)
        for name, owner, attribute, tensor in slots:
            value = values[name]
            if value.dtype.is_floating_point and tensor.dtype.is_floating_point:
                value = value.to(tensor.dtype)
            if value.shape != tensor.shape:
                raise ValueError(
                    f"The checkpoint holds {name} with shape {tuple(value.shape)} but the model expects "
                    f"{tuple(tensor.shape)}: config.json does not match the weights."
                )
            _assign(owner, attribute, value)
        empty = [name for name, _, _, tensor in _named_slots(module, prefix, recurse) if tensor.is_meta]
        if empty:
            raise ValueError(
                f"The checkpoint has no weight for {empty[0]} ({len(empty)} missing under {prefix or 'the model'}): "
                "offload='disk' reads tensors by the model's own names; re-save the checkpoint with "
                "save_pretrained(), or use offload='cpu'."
            )

    @staticmethod
    def release(module: nn.Module, recurse: bool = True) -> None:
        """Put every parameter of ``module`` back on the meta device, freeing its memory."""
        for _, owner, attribute, tensor in _named_slots(module, "", recurse):
            if attribute in owner._parameters and not tensor.is_meta:
                owner._parameters[attribute] = nn.Parameter(
                    torch.empty_like(tensor, device="meta"), requires_grad=False
                )
        trim_heap()


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not part of {type(model).__name__}.")


def resolve_dtype(
    dtype: str | torch.dtype | None, config_dtype: object, checkpoint: SafetensorsCheckpoint
) -> torch.dtype:
    """The dtype ``from_pretrained(dtype=...)`` would load: explicit, else the config's, else the weights'."""
    for candidate in (dtype, config_dtype):
        if candidate is None or candidate == "auto":
            continue
        if isinstance(candidate, torch.dtype):
            return candidate
        name = str(candidate).removeprefix("torch.")
        if name not in FLOAT_DTYPES:
            raise ValueError(f"Unknown dtype {candidate!r}: use one of {', '.join(FLOAT_DTYPES)} or 'auto'.")
        return FLOAT_DTYPES[name]
    return checkpoint.floating_dtype()


def load_empty_model(
    folder: str | os.PathLike, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, DiskOffload]:
    """A causal LM built from ``folder``'s config.json on the meta device, and the offload that fills it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = SafetensorsCheckpoint(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    resolved = resolve_dtype(dtype, getattr(config, "dtype", None), checkpoint)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=resolved, trust_remote_code=trust_remote_code)
    model.config.name_or_path = os.fspath(folder)
    return model.eval(), DiskOffload(checkpoint)
