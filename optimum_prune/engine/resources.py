"""Checks run before a long pruning run starts: memory limits and free disk space, against the estimate."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..core.memory import format_bytes
from ..errors import InputError
from .estimate import RunEstimate

MaxMemory = dict[int | str, int | str]


def _bytes(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    return value if isinstance(value, int) else convert_file_size_to_int(value)


def _key(key: int | str) -> str:
    if isinstance(key, int):
        return f"cuda:{key}"
    return "cuda:0" if key == "cuda" else key


def check_max_memory(max_memory: MaxMemory | None, estimate: RunEstimate, device: torch.device, offload: str) -> None:
    """Refuse limits (accelerate's ``max_memory``: ``{0: "20GiB", "cpu": "64GiB"}``) that cannot hold one block,
    or, without disk offload, the model in host memory."""
    if not max_memory:
        return
    limits = {_key(key): _bytes(value) for key, value in max_memory.items()}
    device_key = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    limit = limits.get(device_key)
    if limit is not None and limit < estimate.block_bytes:
        raise InputError(
            f"max_memory allows {format_bytes(limit)} on {device_key}, smaller than one decoder block "
            f"({format_bytes(estimate.block_bytes)} of weights): the engine processes a whole block at once. Raise the "
            f"limit to at least {format_bytes(estimate.block_bytes + estimate.statistics_bytes)} (block + statistics)."
        )
    host = limits.get("cpu")
    if host is not None and offload == "cpu" and host < estimate.weights_bytes:
        raise InputError(
            f"max_memory allows {format_bytes(host)} of host memory, but offload='cpu' keeps all "
            f"{format_bytes(estimate.weights_bytes)} of weights there: use offload='disk' to stream blocks from the checkpoint."
        )


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _size(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file()) if folder.is_dir() else 0


def check_free_space(
    estimate: RunEstimate, work_folder: Path, output_dir: str | os.PathLike, linked: bool = True
) -> None:
    """Refuse to start when the work folder's or the output's file system lacks room for the run's files.

    ``linked``: the output shares the work folder's block files (hard links, disk offload) on one file system;
    otherwise (an in-memory model saved at the end, or another file system) it needs its own copy.
    """
    work_folder = Path(work_folder)
    needed = max(estimate.disk_bytes - _size(work_folder), 0)
    places = {os.stat(_existing(work_folder)).st_dev: [work_folder, needed]}
    output = _existing(Path(output_dir))
    device = os.stat(output).st_dev
    if device in places and not linked:
        places[device][1] += estimate.weights_bytes
    elif device not in places:
        places[device] = [output, estimate.weights_bytes]
    for place, size in places.values():
        free = shutil.disk_usage(_existing(place)).free
        if free < size:
            raise OSError(
                f"Not enough free disk space for {place}: the run writes about {format_bytes(size)} there (pruned weights "
                f"and calibration activations) but only {format_bytes(free)} is free. Free some space or choose another "
                "output_dir/offload_folder."
            )
