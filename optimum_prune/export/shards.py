"""Streaming safetensors shards: tensors are written as they come, a shard at a time, never the whole model."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch
from transformers.utils.hub import convert_file_size_to_int

from ..core.safetensors import write_safetensors
from ..errors import InputError


def checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the tensor's bytes (row-major), the same for every dtype and device."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(memoryview(data))


def parse_shard_size(size: int | str) -> int:
    """Bytes in ``"5GB"``, ``"500MiB"`` or an integer; a clear error otherwise."""
    try:
        value = convert_file_size_to_int(size)
    except (ValueError, AttributeError) as error:
        raise InputError(f"max_shard_size={size!r} is not a size: use bytes or a string such as '5GB'.") from error
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"max_shard_size must be positive, got {size!r}.")
    return value


class ShardWriter:
    """Write groups of tensors into ``{prefix}-00001-of-0000N.safetensors`` shards (``{prefix}.safetensors`` when
    one is enough), flushing a shard before it would exceed ``max_shard_size``. A group (one weight's parts) never
    straddles two shards; a group larger than the limit gets a shard of its own."""

    def __init__(self, directory: str | os.PathLike, prefix: str, max_shard_size: int | str, metadata: dict[str, str]):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_shard_size = parse_shard_size(max_shard_size)
        self.metadata = metadata
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_size = 0
        self._written: list[Path] = []
        self.total_size = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> int:
        """Queue one group of tensors; return the index of the shard that will hold it."""
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        if self._pending and self._pending_size + size > self.max_shard_size:
            self._flush()
        self._pending.update({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()})
        self._pending_size += size
        self.total_size += size
        return len(self._written)

    def _flush(self) -> None:
        path = self.directory / f"{self.prefix}-{len(self._written) + 1:05d}.partial"
        write_safetensors(path, self._pending, self.metadata)
        self._written.append(path)
        self._pending, self._pending_size = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give every shard its final name and return the names in shard order."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        names = (
            [f"{self.prefix}.safetensors"]
            if count == 1
            else [f"{self.prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        for path, name in zip(self._written, names, strict=True):
            os.replace(path, self.directory / name)
        return names
