"""Where block weights live between blocks: CPU RAM (``offload="cpu"``) or the checkpoint on disk
(``offload="disk"``): a meta-device model whose modules are filled from the safetensors checkpoint and
emptied again."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
from torch import nn

from ..core.layers import is_fused_experts
from ..core.memory import trim_heap
from ..core.safetensors import FLOAT_DTYPES, SafetensorsCheckpoint
from ..errors import InputError

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
    """Materialises modules of a meta-device model from a `SafetensorsCheckpoint`, and empties them again.

    Tensors that the checkpoint stores under other names or in another layout, as transformers' weight
    conversion saves them (fused mixture-of-experts parameters as one tensor per expert in every Qwen-MoE,
    Mixtral or DeepSeek checkpoint, Mixtral's ``block_sparse_moe`` names), are assembled from it
    (`_saved_layout`).
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, model: nn.Module | None = None) -> None:
        self.checkpoint = checkpoint
        self.model = model

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
                raise InputError(
                    f"The checkpoint holds {name} with shape {tuple(value.shape)} but the model expects "
                    f"{tuple(tensor.shape)}: config.json does not match the weights."
                )
            _assign(owner, attribute, value)
        for name, owner, attribute, tensor in _named_slots(module, prefix, recurse):
            if tensor.is_meta and self.model is not None:
                experts = is_fused_experts(owner) and tensor.dim() == 3
                assembled = self._assemble(name, tensor, experts)
                if assembled is not None:
                    _assign(owner, attribute, assembled)
        empty = [name for name, _, _, tensor in _named_slots(module, prefix, recurse) if tensor.is_meta]
        if empty:
            raise InputError(
                f"The checkpoint has no weight for {empty[0]} ({len(empty)} missing under {prefix or 'the model'}): "
                "offload='disk' reads tensors by the model's own names; re-save the checkpoint with "
                "save_pretrained(), or use offload='cpu'."
            )

    def _assemble(self, name: str, tensor: torch.Tensor, experts: bool) -> torch.Tensor | None:
        """Tensor ``name`` read from the checkpoint in transformers' saved layout (``None``: the checkpoint does
        not hold it); ``experts``: a fused experts parameter, assembled expert by expert."""
        rows = tensor.shape[0] if experts else 1
        layout = _saved_layout(self.model, name, tensor.shape, experts)
        keys = [
            _expert_key(key, row) if repeated else key
            for key, _, repeated in layout
            for row in (range(rows) if repeated else [0])
        ]
        if not layout or not all(key in self.checkpoint.tensors for key in keys):
            return None
        stored = self.checkpoint.read(keys)
        values = iter(stored[key] for key in keys)
        assembled = torch.empty(tensor.shape, dtype=tensor.dtype).view(rows, -1)
        for _, index, repeated in layout:
            positions = index.flatten()
            if repeated:
                for row in range(rows):
                    assembled[row, positions] = next(values).flatten().to(tensor.dtype)
            else:
                assembled[:, positions] = next(values).reshape(rows, -1).to(tensor.dtype)
        return assembled.view(tensor.shape)

    @staticmethod
    def release(module: nn.Module, recurse: bool = True) -> None:
        """Put every parameter of ``module`` back on the meta device, freeing its memory."""
        for _, owner, attribute, tensor in _named_slots(module, "", recurse):
            if attribute in owner._parameters and not tensor.is_meta:
                owner._parameters[attribute] = nn.Parameter(
                    torch.empty_like(tensor, device="meta"), requires_grad=False
                )
        trim_heap()


def _saved_layout(
    model: nn.Module, name: str, shape: torch.Size, experts: bool
) -> list[tuple[str, torch.Tensor, bool]]:
    """Where transformers' ``save_pretrained`` stores tensor ``name`` of ``shape``: ``(checkpoint key, index,
    repeated)`` for each tensor it writes, found by reverting transformers' own weight conversion on a probe of
    positions, so every layout it knows (renamed, split, transposed) is read back. ``index`` holds, for each
    value of that tensor, its flat position in ``name`` (in one expert's slice for ``experts``); ``repeated``
    keys name expert 0 (Qwen-MoE's ``experts.0.gate_proj.weight``) and repeat for every expert, the others keep
    one row per expert (Granite-MoE's ``input_linear.weight``)."""
    from transformers.core_model_loading import revert_weight_conversion

    probe_shape = (1, *shape[1:]) if experts else tuple(shape)
    probe = torch.arange(math.prod(probe_shape)).view(probe_shape)
    return [
        (key, index, experts and (index.dim() < len(shape) or index.shape[0] != 1))
        for key, index in revert_weight_conversion(model, {name: probe}).items()
        if key != name or experts
    ]


def saved_block_prefixes(model: nn.Module, blocks_name: str) -> tuple[str, ...]:
    """The key prefixes under which a checkpoint of ``model`` may hold its decoder blocks: ``blocks_name.`` and
    the prefix transformers' ``save_pretrained`` renames it to (LLaVA, Gemma 3 and Mistral 3 store
    ``model.language_model.layers`` as ``language_model.model.layers``), found by reverting the model's weight
    conversion on meta probes of block 0's tensors."""
    from transformers.core_model_loading import revert_weight_conversion

    first = f"{blocks_name}.0."
    probe = {
        name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name.startswith(first)
    }
    saved = {key.partition(".0.")[0] + "." for key in revert_weight_conversion(model, probe) if ".0." in key}
    return tuple(sorted({blocks_name + ".", *saved}))


def _expert_key(key: str, expert: int) -> str:
    """The checkpoint key of ``expert`` from the key of expert 0 (its last ``.0.`` component)."""
    head, _, tail = key.rpartition(".0.")
    return f"{head}.{expert}.{tail}"


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise InputError(f"{type(module).__name__} is not part of {type(model).__name__}.")


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
            raise InputError(f"Unknown dtype {candidate!r}: use one of {', '.join(FLOAT_DTYPES)} or 'auto'.")
        return FLOAT_DTYPES[name]
    return checkpoint.floating_dtype()


def load_empty_model(
    folder: str | os.PathLike, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, DiskOffload]:
    """A causal LM built from ``folder``'s config.json on the meta device, and the offload that fills it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..core.auto import auto_model_class

    checkpoint = SafetensorsCheckpoint(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    resolved = resolve_dtype(dtype, getattr(config, "dtype", None), checkpoint)
    with init_empty_weights():
        model = auto_model_class(config).from_config(config, dtype=resolved, trust_remote_code=trust_remote_code)
    model.config.name_or_path = os.fspath(folder)
    return model.eval(), DiskOffload(checkpoint, model)
