"""The one safetensors stack: the dtype table, header reading with damage checks, a checkpoint's tensors read
one by one, lazy `safe_open` access, and a streaming writer."""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Our own fixed table: the name we write in JSON, the safetensors header code, the dtype. Never resolved through
# ``getattr(torch, ...)``.
_TABLE = (
    ("float64", "F64", torch.float64),
    ("float32", "F32", torch.float32),
    ("float16", "F16", torch.float16),
    ("bfloat16", "BF16", torch.bfloat16),
    ("float8_e4m3fn", "F8_E4M3", torch.float8_e4m3fn),
    ("float8_e5m2", "F8_E5M2", torch.float8_e5m2),
    ("int64", "I64", torch.int64),
    ("int32", "I32", torch.int32),
    ("int16", "I16", torch.int16),
    ("int8", "I8", torch.int8),
    ("uint8", "U8", torch.uint8),
    ("bool", "BOOL", torch.bool),
)
DTYPES: dict[str, torch.dtype] = {name: dtype for name, _, dtype in _TABLE}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, _, dtype in _TABLE}
FLOAT_DTYPES = {
    name: dtype
    for name, dtype in DTYPES.items()
    if dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}
_CODES: dict[str, torch.dtype] = {code: dtype for _, code, dtype in _TABLE}
_CODE_OF: dict[torch.dtype, str] = {dtype: code for _, code, dtype in _TABLE}


def dtype_name(dtype: torch.dtype) -> str:
    """The table name of ``dtype``; a clear error for a dtype the formats do not store."""
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"Tensors of dtype {dtype} cannot be saved; supported: {', '.join(DTYPES)}.")
    return DTYPE_NAMES[dtype]


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
                if entry["dtype"] not in _CODES:
                    raise ValueError(f"{name} holds {key} as {entry['dtype']}, a dtype optimum-prune cannot read.")
                dtype = _CODES[entry["dtype"]]
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


@contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """``safe_open`` a file lazily, turning a missing, truncated or garbled file into an error that names it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the saved model is incomplete, save it again.")
    try:
        handle = safe_open(os.fspath(path), framework="pt")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a valid safetensors file ({error}): it is truncated or corrupted.") from error
    with handle as f:
        yield f


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU) as a safetensors file, streaming each tensor's bytes: unlike
    ``safetensors.torch.save_file``, no serialized copy of the whole file is built in memory."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _CODE_OF[tensor.dtype],
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
