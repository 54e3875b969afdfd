"""The compressed sparse safetensors format: pruned weights as their kept values plus where they go.

A compressed folder holds ``config.json`` (with the pruning metadata), safetensors shards
``model.sparse[-0000i-of-0000N].safetensors`` and the index ``model.sparse.safetensors.index.json``. Each
pruned weight is stored with one of the encodings below; every other tensor is stored as is ("dense"):

- ``bitmask``: ``<name>:mask``, the packed pruned bits (as in ``sparsity_masks.safetensors``), and
  ``<name>:values``, the kept values in row-major order (1-D, the weight's dtype).
- ``nm`` (exact N:M weights): ``<name>:values``, the kept values as a dense ``(rows, cols * N / M)`` tensor, and
  ``<name>:indices``, each kept value's position in its group of M, packed 1, 2, 4 or 8 bits each.
  ``group_dim`` says whether the groups run along the weight's columns (1) or rows (0, GPT-2's ``Conv1D``).

Tensors sharing storage (tied embeddings) are stored once; the index maps the others to it ("tied"). The index
records every tensor's shape, dtype and the CRC-32 of its dense bytes, so that decoding checks it is bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.masks import NMPattern, pack_mask, unpack_mask
from ..core.safetensors import DTYPES, INDEX_FILE, SINGLE_FILE, dtype_name, open_safetensors
from ..errors import InputError
from .files import atomic_directory, read_json, write_model_files
from .masks import MASKS_NAME, Masks, read_masks
from .metadata import read_metadata
from .shards import ShardWriter, checksum

FORMAT_NAME = "optimum-prune-sparse"
FORMAT_VERSION = 1
INDEX_NAME = "model.sparse.safetensors.index.json"
SHARD_PREFIX = "model.sparse"
# The names `Pruner.save_pretrained(format=...)` accepts.
SAVE_FORMATS = ("dense", "compressed")


def check_format(format: str) -> str:
    """Validate a ``format=`` argument against our fixed table."""
    if format not in SAVE_FORMATS:
        raise InputError(f"Unknown format {format!r}: choose one of {', '.join(map(repr, SAVE_FORMATS))}.")
    return format


def is_compressed(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model in the compressed sparse format."""
    return (Path(directory) / INDEX_NAME).is_file()


# ---------------------------------------------------------------------------------------------------- encoding


def _index_width(m: int) -> int | None:
    """Bits per in-group index for groups of ``m`` (1, 2, 4 or 8), ``None`` when ``m`` is too large."""
    bits = max(1, (m - 1).bit_length())
    return next((width for width in (1, 2, 4, 8) if width >= bits), None)


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack small non-negative integers ``width`` bits each into uint8 (little-endian within each byte)."""
    per_byte = 8 // width
    flat = values.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    return (flat.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first ``count`` integers, as uint8."""
    per_byte = 8 // width
    shifts = torch.arange(per_byte, dtype=torch.uint8) * width
    return ((packed.unsqueeze(1) >> shifts) & ((1 << width) - 1)).reshape(-1)[:count]


def _nm_group_dim(mask: torch.Tensor, pattern: NMPattern | None) -> int | None:
    """The dimension along which ``mask`` prunes exactly ``M - N`` of every ``M`` weights, if any."""
    if pattern is None or mask.dim() != 2 or _index_width(pattern.m) is None:
        return None
    for dim in (1, 0):
        matrix = mask if dim == 1 else mask.T
        rows, cols = matrix.shape
        if cols % pattern.m == 0 and bool((matrix.reshape(rows, -1, pattern.m).sum(-1) == pattern.m - pattern.n).all()):
            return dim
    return None


def encode(
    name: str, tensor: torch.Tensor, mask: torch.Tensor | None, pattern: NMPattern | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The index entry and the stored tensors of one state-dict tensor (``mask``: ``True`` = pruned)."""
    tensor = tensor.detach().to("cpu")
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
    if mask is None:
        entry.update(encoding="dense", crc32=checksum(tensor))
        return entry, {name: tensor}
    if tuple(mask.shape) != tuple(tensor.shape):
        raise InputError(f"The mask of {name} has shape {tuple(mask.shape)} but the weight {tuple(tensor.shape)}.")
    mask = mask.to("cpu", torch.bool)
    changed = int(torch.count_nonzero((tensor != 0) & mask))
    if changed:
        raise InputError(
            f"{name} has {changed} nonzero weights where its mask says pruned (was it trained after pruning?): "
            "call optimum_prune.apply_masks(model, masks) first, or save with format='dense'."
        )
    negative_zeros = tensor.is_floating_point() and bool((torch.signbit(tensor) & mask).any())
    entry["crc32"] = checksum(tensor.masked_fill(mask, 0) if negative_zeros else tensor)  # pruned decode as +0.0
    group_dim = _nm_group_dim(mask, pattern)
    if group_dim is None:
        entry.update(encoding="bitmask", kept=int(mask.numel() - torch.count_nonzero(mask)))
        return entry, {f"{name}:values": torch.masked_select(tensor, ~mask), f"{name}:mask": pack_mask(mask)}
    matrix, kept = (tensor, ~mask) if group_dim == 1 else (tensor.T, ~mask.T)
    rows, cols = matrix.shape
    width = _index_width(pattern.m)
    positions = torch.masked_select((torch.arange(cols) % pattern.m).to(torch.uint8), kept)
    entry.update(encoding="nm", n=pattern.n, m=pattern.m, group_dim=group_dim, index_bits=width)
    return entry, {
        f"{name}:values": torch.masked_select(matrix, kept).reshape(rows, cols * pattern.n // pattern.m),
        f"{name}:indices": pack_bits(positions, width),
    }


# ---------------------------------------------------------------------------------------------------- decoding


class _Decoder:
    """Decodes the tensors of one shard, checking every part against the index; errors name file and tensor."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self.handle = handle

    def fail(self, name: str, problem: str) -> ValueError:
        return ValueError(f"{self.path.name}: tensor {name!r} {problem}; the file is corrupted, save the model again.")

    def part(self, name: str, suffix: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = f"{name}:{suffix}" if suffix else name
        tensor = self.handle.get_tensor(key)
        if tensor.dtype != dtype or tensor.numel() != numel:
            raise self.fail(
                key, f"is {tensor.dtype} with {tensor.numel()} elements where the index says {dtype} with {numel}"
            )
        return tensor

    def nm_layout(self, name: str, entry: dict[str, Any]) -> tuple[int, int, int, torch.Tensor]:
        """Rows, columns, kept columns and the column of every kept value of an ``nm`` weight."""
        n, m, width = int(entry["n"]), int(entry["m"]), int(entry["index_bits"])
        if len(entry["shape"]) != 2 or entry["group_dim"] not in (0, 1):
            raise self.fail(name, f"has an N:M encoding but shape {entry['shape']} / group_dim {entry['group_dim']}")
        rows, cols = entry["shape"] if entry["group_dim"] == 1 else entry["shape"][::-1]
        kept = cols * n // m
        if not 0 < n < m or cols % m or width != _index_width(m):
            raise self.fail(name, f"has an invalid {n}:{m} layout for shape {entry['shape']}")
        packed = self.part(name, "indices", torch.uint8, (rows * kept * width + 7) // 8)
        index = unpack_bits(packed, width, rows * kept).view(rows, kept // n, n).long()
        if bool((index >= m).any()) or (n > 1 and bool((index.diff(dim=-1) <= 0).any())):
            raise self.fail(name, f"has in-group indices that are not increasing positions below {m}")
        columns = (torch.arange(kept // n).view(1, -1, 1) * m + index).view(rows, kept)
        return rows, cols, kept, columns

    def decode(self, name: str, entry: dict[str, Any]) -> torch.Tensor:
        shape, dtype = tuple(entry["shape"]), DTYPES[entry["dtype"]]
        numel = int(torch.Size(shape).numel())
        encoding = entry["encoding"]
        if encoding == "dense":
            tensor = self.part(name, "", dtype, numel).view(shape)
        elif encoding == "bitmask":
            mask = unpack_mask(self.part(name, "mask", torch.uint8, (numel + 7) // 8), shape)
            kept = int(numel - mask.sum())
            if kept != entry["kept"]:
                raise self.fail(name, f"has a mask keeping {kept} weights where the index says {entry['kept']}")
            tensor = torch.zeros(shape, dtype=dtype)
            tensor[~mask] = self.part(name, "values", dtype, kept)
        else:
            rows, cols, kept, columns = self.nm_layout(name, entry)
            values = self.part(name, "values", dtype, rows * kept).view(rows, kept)
            tensor = torch.zeros(rows, cols, dtype=dtype).scatter_(1, columns, values)
            if entry["group_dim"] == 0:
                tensor = tensor.T.contiguous()
        if checksum(tensor) != entry["crc32"]:
            raise self.fail(name, "decodes to values whose CRC-32 differs from the index")
        return tensor

    def mask(self, name: str, entry: dict[str, Any]) -> torch.Tensor:
        """The packed pruned bits of a sparse entry, in the weight's layout."""
        numel = int(torch.Size(entry["shape"]).numel())
        if entry["encoding"] == "bitmask":
            return self.part(name, "mask", torch.uint8, (numel + 7) // 8)
        rows, cols, _, columns = self.nm_layout(name, entry)
        mask = torch.ones(rows, cols, dtype=torch.bool).scatter_(1, columns, False)
        return pack_mask(mask if entry["group_dim"] == 1 else mask.T)


_PARTS = {"dense": ("",), "bitmask": ("values", "mask"), "nm": ("values", "indices")}
_REQUIRED = {
    "dense": ("shard", "shape", "dtype", "crc32"),
    "bitmask": ("shard", "shape", "dtype", "crc32", "kept"),
    "nm": ("shard", "shape", "dtype", "crc32", "n", "m", "group_dim", "index_bits"),
    "tied": ("target",),
}


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``model.sparse.safetensors.index.json`` and the shard sizes it records."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a compressed optimum-prune model: it has no {INDEX_NAME}.")
    index = read_json(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise InputError(f"{path} does not describe the {FORMAT_NAME!r} format.")
    if index.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path} is format version {index.get('format_version')}; this optimum-prune reads version "
            f"{FORMAT_VERSION}: upgrade optimum-prune."
        )
    files, tensors = index.get("files"), index.get("tensors")
    if not isinstance(files, dict) or not isinstance(tensors, dict):
        raise InputError(f"{path} is damaged: it lacks its 'files' or 'tensors' table.")
    for name, entry in tensors.items():
        encoding = entry.get("encoding") if isinstance(entry, dict) else None
        if encoding not in _REQUIRED:
            raise InputError(f"{path}: tensor {name!r} has unknown encoding {encoding!r}.")
        missing = [key for key in _REQUIRED[encoding] if key not in entry]
        if missing:
            raise InputError(f"{path}: tensor {name!r} lacks {missing} in the index.")
        if encoding == "tied" and tensors.get(entry["target"], {}).get("encoding") in (None, "tied"):
            raise InputError(f"{path}: tensor {name!r} is tied to {entry['target']!r}, which is not stored.")
        if encoding != "tied" and (entry["shard"] not in files or entry["dtype"] not in DTYPES):
            raise InputError(f"{path}: tensor {name!r} names an unknown shard or dtype.")
    for file, size in files.items():
        shard = directory / file
        if Path(file).name != file or not shard.is_file():
            raise FileNotFoundError(f"{shard} is missing: the compressed model is incomplete, save it again.")
        if shard.stat().st_size != size:
            raise InputError(
                f"{shard} is {shard.stat().st_size} bytes but the index records {size}: it is truncated or was "
                "replaced; save the model again."
            )
    return index


def _shards(directory: Path, index: dict[str, Any]) -> Iterator[tuple[_Decoder, dict[str, dict[str, Any]]]]:
    """Each shard's decoder with the entries it holds, after checking it holds exactly their parts."""
    for file in index["files"]:
        entries = {n: e for n, e in index["tensors"].items() if e["encoding"] != "tied" and e["shard"] == file}
        expected = {f"{n}:{p}" if p else n for n, e in entries.items() for p in _PARTS[e["encoding"]]}
        with open_safetensors(directory / file) as handle:
            present = set(handle.keys())
            if expected - present:
                raise InputError(
                    f"{file} lacks tensors {sorted(expected - present)[:5]}: it is corrupted or truncated."
                )
            if present - expected:
                raise InputError(f"{file} holds tensors {sorted(present - expected)[:5]} that its index does not list.")
            yield _Decoder(directory / file, handle), entries


def iter_decoded(
    directory: str | os.PathLike, index: dict[str, Any] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every stored tensor of a compressed folder, dense and checked, one shard at a time (tied copies
    are not repeated)."""
    directory = Path(directory)
    index = read_index(directory) if index is None else index
    for decoder, entries in _shards(directory, index):
        for name, entry in entries.items():
            yield name, decoder.decode(name, entry)


def load_compressed_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict of a compressed folder; tied names share one tensor."""
    index = read_index(directory)
    state = dict(iter_decoded(directory, index))
    for name, entry in index["tensors"].items():
        if entry["encoding"] == "tied":
            state[name] = state[entry["target"]]
    return {name: state[name] for name in index["tensors"]}


def read_compressed_masks(directory: str | os.PathLike) -> Masks:
    """The pruning masks of a compressed folder, read from its sparse encodings (no values are decoded)."""
    directory = Path(directory)
    packed, shapes = {}, {}
    for decoder, entries in _shards(directory, read_index(directory)):
        for name, entry in entries.items():
            if entry["encoding"] != "dense":
                packed[name] = decoder.mask(name, entry)
                shapes[name] = tuple(entry["shape"])
    return Masks(packed, shapes)


# ---------------------------------------------------------------------------------------------------- saving


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for tensors that are the same view of the same memory (tied weights)."""
    if tensor.numel() == 0:
        return (id(tensor),)
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def write_compressed(
    tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | os.PathLike,
    masks: Mapping[str, torch.Tensor],
    *,
    pattern: NMPattern | None = None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Encode ``(name, tensor)`` pairs as they come into compressed shards plus the index; return the shard names.

    ``masks`` maps names to boolean pruned masks (a `Masks` unpacks one weight at a time); those tensors are stored
    sparse, with the ``nm`` encoding where they follow ``pattern`` exactly. Tensors sharing memory are stored once.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory, SHARD_PREFIX, max_shard_size, {"format": "pt", "optimum_prune": FORMAT_NAME})
    entries: dict[str, dict[str, Any]] = {}
    stored: dict[tuple, str] = {}
    dense_size = 0
    for name, tensor in tensors:
        if tensor.device.type == "meta":
            raise InputError(f"{name} is on the meta device (offloaded): load the whole model before saving it.")
        key = _storage_key(tensor)
        if key in stored:
            entries[name] = {"encoding": "tied", "target": stored[key]}
            continue
        stored[key] = name
        entry, parts = encode(name, tensor, masks.get(name), pattern)
        entry["shard"] = writer.add(parts)
        entries[name] = entry
        dense_size += tensor.numel() * tensor.element_size()
    unknown = sorted(set(masks) - set(entries))
    if unknown:
        raise KeyError(f"The masks name weights the model does not have: {unknown[:5]}.")
    names = writer.close()
    for entry in entries.values():
        if "shard" in entry:
            entry["shard"] = names[entry["shard"]]
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metadata": {"dense_size": dense_size, "stored_size": writer.total_size},
        "files": {name: (directory / name).stat().st_size for name in names},
        "tensors": entries,
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike,
    masks: Mapping[str, torch.Tensor],
    *,
    pattern: NMPattern | None = None,
    max_shard_size: int | str = "5GB",
) -> list[str]:
    """Write ``model`` into ``directory`` in the compressed format, streaming shard by shard (see
    `write_compressed`), with ``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them."""
    state = model.state_dict()
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise KeyError(f"The masks name weights the model does not have: {unknown[:5]}.")
    names = write_compressed(state.items(), directory, masks, pattern=pattern, max_shard_size=max_shard_size)
    write_model_files(directory, model)
    return names


def _dense_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a transformers safetensors folder (one file or shards), one at a time."""
    index = folder / INDEX_FILE
    if index.is_file():
        files = list(dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: it is not a dense model folder.")
    for file in files:
        with open_safetensors(folder / file) as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                yield name, handle.get_tensor(name)


def compress(
    source: str | os.PathLike,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> str:
    """Write a dense folder saved with ``save_masks=True`` (after fine-tuning, say) in the compressed format.

    The pruned weights come from its ``sparsity_masks.safetensors`` and must be zero (`apply_masks`); the N:M
    pattern from its metadata. Streams one tensor at a time and copies every other file.
    """
    source = Path(source)
    if is_compressed(source):
        raise InputError(f"{source} is already compressed.")
    if not (source / MASKS_NAME).is_file():
        raise FileNotFoundError(
            f"{source} has no {MASKS_NAME}: compressing needs the masks, so save the model with save_masks=True."
        )
    masks = read_masks(source / MASKS_NAME)
    metadata = read_metadata(source)
    pattern = NMPattern.parse(metadata["pattern"]) if metadata else None
    skip = {SINGLE_FILE, INDEX_FILE}
    if (source / INDEX_FILE).is_file():
        skip |= set(json.loads((source / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values())
    with atomic_directory(save_directory, overwrite) as staging:
        write_compressed(_dense_tensors(source), staging, masks, pattern=pattern, max_shard_size=max_shard_size)
        _copy_other_files(source, staging, skip)
    return os.fspath(save_directory)


def _copy_other_files(source: Path, target: Path, skip: set[str]) -> None:
    for item in source.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)


def decompress(
    source: str | os.PathLike,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> str:
    """Write a compressed folder back as plain dense safetensors that ``AutoModelForCausalLM`` loads.

    Streams one tensor at a time; copies every other file (config with the metadata, tokenizer, masks). Tied
    copies are left out, as ``save_pretrained`` does: transformers ties them again from the config.
    """
    source = Path(source)
    index = read_index(source)
    ours = {INDEX_NAME, *index["files"]}
    with atomic_directory(save_directory, overwrite) as staging:
        writer = ShardWriter(staging, "model", max_shard_size, {"format": "pt"})
        placed = {name: writer.add({name: tensor}) for name, tensor in iter_decoded(source, index)}
        names = writer.close()
        if len(names) > 1:
            dense_index = {
                "metadata": {"total_size": writer.total_size},
                "weight_map": {name: names[shard] for name, shard in placed.items()},
            }
            (staging / INDEX_FILE).write_text(json.dumps(dense_index, indent=2) + "\n", encoding="utf-8")
        _copy_other_files(source, staging, ours)
    return os.fspath(save_directory)
