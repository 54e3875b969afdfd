"""Where the calibration activations wait between blocks: on a device, or in files on disk.

A calibration run keeps ``num_samples x seq_len x hidden`` values entering the next block, twice while a block
turns its inputs into its outputs: 2 x 2.1 GB for a 7B model at 128 x 2048 tokens in bf16, 2 x 4.3 GB at 70B.
``"disk"`` puts each batch in a file that is memory-mapped and unlinked at once, so the kernel reads it back
when the next block needs it, can evict it under memory pressure (it never counts towards an out-of-memory
kill), and frees its space as soon as the batch is dropped, even if the process dies. The engine evicts a
batch once a pass is done with it, so that only the batch being processed is mapped into the process.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref
from pathlib import Path

import torch

DISK = "disk"


class ActivationStore:
    """Keeps tensors on ``where`` (a device, or ``"disk"``: memory-mapped files in ``folder``)."""

    def __init__(self, where: str | torch.device, folder: str | os.PathLike | None = None) -> None:
        self.on_disk = where == DISK
        self.device = None if self.on_disk else torch.device(where)
        self.folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self._mappings: dict[int, mmap.mmap] = {}  # data pointer of a kept tensor -> its file mapping
        if self.on_disk:
            self.folder.mkdir(parents=True, exist_ok=True)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (detached) where this store keeps activations."""
        tensor = tensor.detach()
        if not self.on_disk:
            return tensor.to(self.device)
        size = tensor.numel() * tensor.element_size()
        descriptor, path = tempfile.mkstemp(prefix="activations-", dir=self.folder)
        try:
            os.ftruncate(descriptor, size)
            mapping = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
            os.unlink(path)
        stored = torch.frombuffer(mapping, dtype=tensor.dtype, count=tensor.numel()).view(tensor.shape)
        stored.copy_(tensor)
        self._mappings[stored.data_ptr()] = mapping
        weakref.finalize(stored, self._forget, stored.data_ptr(), mapping)
        self.evict(stored)
        return stored

    def _forget(self, pointer: int, mapping: mmap.mmap) -> None:
        if self._mappings.get(pointer) is mapping:  # not a newer mapping that reuses the address
            del self._mappings[pointer]

    def evict(self, tensor: torch.Tensor) -> None:
        """Unmap the pages of a tensor kept on disk from this process (they stay in the file and the page
        cache, and come back when it is read again); a no-op for any other tensor."""
        mapping = self._mappings.get(tensor.data_ptr())
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)
