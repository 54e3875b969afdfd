"""Where block weights live between blocks: CPU RAM (``offload="cpu"``) or the checkpoint on disk
(``offload="disk"``), read one tensor at a time from its safetensors shards."""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

OFFLOAD_MODES = ("cpu", "disk")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a checkpoint, described from its shard's header: file, dtype, shape, byte offset."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def read_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), without its data.
    Each entry's ``data_offsets`` are made absolute (from the start of the file). A truncated or corrupted
    file raises a `ValueError` that names it."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if length is None or length > size - 8:
            raise ValueError(f"{path} is truncated or is not a safetensors file: download or save it again.")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} has a corrupted safetensors header ({error}): download or save it again."
            ) from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupted safetensors header: download or save it again.")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        entry["data_offsets"] = [8 + length + offset for offset in entry["data_offsets"]]
        if entry["data_offsets"][1] > size:
            raise ValueError(
                f"{path} is truncated: {key} ends at byte {entry['data_offsets'][1]} of a {size}-byte file. "
                "Download or save it again."
            )
    return header


class SafetensorsCheckpoint:
    """The safetensors weights of a local model folder: one ``model.safetensors`` or shards with an index.

    Only headers are read when it is opened; `read` copies each requested tensor straight from its file
    into a new CPU tensor (one ``readinto``, no memory map), so reading a block costs that block's memory.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = {}
        else:
            raise FileNotFoundError(
                f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: offload='disk' streams weights from a "
                "local safetensors checkpoint. Save the model with save_pretrained(), or use offload='cpu'."
            )
        files = sorted(set(weight_map.values())) or [SINGLE_FILE]
        missing = [name for name in files if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"The checkpoint index {index} lists {len(missing)} shard(s) missing from {self.folder}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Download the complete checkpoint "
                "before pruning."
            )
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            for key, entry in read_header(self.folder / name).items():
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"{name} holds {key} as {entry['dtype']}, a dtype optimum-prune cannot read.")
                dtype = _DTYPES[entry["dtype"]]
                info = TensorInfo(name, dtype, tuple(entry["shape"]), entry["data_offsets"][0])
                if entry["data_offsets"][1] - info.offset != info.nbytes:
                    raise ValueError(f"{name} is corrupt: {key}'s byte range does not match its shape and dtype.")
                self.tensors[key] = info
        lost = [key for key, name in weight_map.items() if key not in self.tensors]
        if lost:
            raise ValueError(
                f"The checkpoint index {index} maps {len(lost)} tensor(s) (e.g. {lost[0]}) to shards that do not "
                "hold them: the checkpoint is incomplete or mixed up; download it again."
            )

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def floating_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (what ``dtype="auto"`` loads without a config dtype)."""
        return next((info.dtype for info in self.tensors.values() if info.dtype.is_floating_point), torch.float32)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copy ``keys`` out of their shards into CPU memory."""
        infos = sorted(((key, self.tensors[key]) for key in keys), key=lambda item: (item[1].file, item[1].offset))
        tensors = {}
        for file_name, group in itertools.groupby(infos, key=lambda item: item[1].file):
            with open(self.folder / file_name, "rb") as file:
                for key, info in group:
                    tensor = torch.empty(info.shape, dtype=info.dtype)
                    file.seek(info.offset)
                    if info.nbytes and file.readinto(tensor.view(-1).view(torch.uint8).numpy()) != info.nbytes:
                        raise ValueError(f"{file_name} is truncated: {key} ends past the end of the file.")
                    tensors[key] = tensor
        return tensors


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Give the memory freed with the last block back to the OS: glibc keeps freed heap pages otherwise,
    and the resident size would creep up block after block."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc's malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> None:
    """Have glibc serve every allocation of 1 MiB or more from its own memory map, unmapped when freed.

    By default glibc raises that threshold to the largest size freed so far (up to 32 MiB), after which
    tensors of a few MiB (activations, Hessians, weight copies) come from its heap, where fragmentation keeps
    freed pages resident: the peak memory of a blockwise run then creeps up block after block (by about a
    third over 24 blocks in ``benchmarks/memory.py``). The setting is process-wide and idempotent; a
    threshold set through glibc's ``MALLOC_MMAP_THRESHOLD_`` environment variable is left alone.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


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


_DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


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
        if name not in _DTYPE_NAMES:
            raise ValueError(f"Unknown dtype {candidate!r}: use one of {', '.join(_DTYPE_NAMES)} or 'auto'.")
        return _DTYPE_NAMES[name]
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


_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU) as a safetensors file, streaming each tensor's bytes: unlike
    ``safetensors.torch.save_file``, no serialized copy of the whole file is built in memory."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
