"""Assemble the output of a disk-offloaded run from the blocks it streamed to its work folder.

The first shards hold the weights outside the blocks, copied from the source checkpoint a shard at a time
(each no bigger than the largest of them); then one shard per block: its file, linked (or copied) from the
work folder, which stays intact until the output is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from ..core.safetensors import INDEX_FILE, SafetensorsCheckpoint, read_header, write_safetensors
from .offload import saved_block_prefixes
from .work_folder import WorkFolder


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_streamed_weights(
    staging: Path,
    model: nn.Module,
    source: SafetensorsCheckpoint,
    work: WorkFolder,
    blocks_name: str,
    num_blocks: int,
) -> None:
    """Write the sharded safetensors weights and their index into ``staging``.

    The tensors outside the blocks (wherever the checkpoint keeps the blocks: `saved_block_prefixes`) are
    copied from the source checkpoint under its own names (transformers may rename some on load, e.g.
    GPT-NeoX's ``embed_out``), without the tied copies ``save_pretrained``
    drops, floating-point ones in the dtype the model declares, as an in-memory save would write them.
    """
    declared = {name: tensor.dtype for name, tensor in model.state_dict(keep_vars=True).items()}
    default = next(model.parameters()).dtype
    tied = tied_names(model)
    blocks = saved_block_prefixes(model, blocks_name)
    outside = [name for name in source.tensors if name not in tied and not name.startswith(blocks)]
    groups = _groups(outside, source)
    shards = len(groups) + num_blocks
    names = [f"model-{index:05d}-of-{shards:05d}.safetensors" for index in range(1, shards + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    for name, group in zip(names, groups, strict=False):  # one group in memory at a time
        tensors = {
            key: tensor.to(declared.get(key, default)) if tensor.is_floating_point() else tensor
            for key, tensor in source.read(group).items()
        }
        write_safetensors(staging / name, tensors)
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(tensor.nbytes for tensor in tensors.values())
        del tensors
    for index, name in enumerate(names[len(groups) :]):
        target = staging / name
        _link_or_copy(work.block_file(index), target)
        for key, entry in read_header(target).items():
            weight_map[key] = name
            count = 1
            for size in entry["shape"]:
                count *= size
            total += count * _itemsize(entry["dtype"])
    index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")


def _groups(names: list[str], source: SafetensorsCheckpoint) -> list[list[str]]:
    """``names`` in shards no bigger than the largest of them (at least one shard, possibly empty)."""
    cap = max((source.tensors[name].nbytes for name in names), default=0)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = source.tensors[name].nbytes
        if groups[-1] and size + nbytes > cap:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)


def tied_names(model: nn.Module) -> set[str]:
    """The names transformers ties to another weight and leaves out of saved checkpoints (``lm_head.weight``)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})
