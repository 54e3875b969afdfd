"""The work folder of a resumable run: what is needed to continue after the last finished block.

Layout of ``<output>.partial/``: ``fingerprint.json`` (what the run computes, compared on resume),
``block-NNNNN.safetensors`` (a finished block's pruned weights, under their full names),
``masks-NNNNN.safetensors`` (its packed masks), ``activations.safetensors`` (the hidden states entering
the next block; one file per rank in a distributed run) and ``state.json``, written last, which marks the block
as finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.safetensors import write_safetensors
from ..errors import InputError
from ..report import LayerReport
from .distributed import Ranks

FINGERPRINT = "fingerprint.json"
STATE = "state.json"
ACTIVATIONS = "activations.safetensors"  # activations-RRRRR-of-WWWWW.safetensors per rank in a distributed run


def work_folder_path(
    output_dir: str | os.PathLike, offload_folder: str | os.PathLike | None = None, structure: bool = False
) -> Path:
    """Where the run writing ``output_dir`` keeps its state until it completes: ``<output_dir>.partial``
    (``<output_dir>.partial-structure`` for its structured pass), inside ``offload_folder`` when one is given."""
    output = Path(output_dir).absolute()
    parent = Path(offload_folder).absolute() if offload_folder is not None else output.parent
    return parent / (output.name + (".partial-structure" if structure else ".partial"))


def work_folder_paths(output_dir: str | os.PathLike, offload_folder: str | os.PathLike | None = None) -> list[Path]:
    """Every work folder a run writing ``output_dir`` may keep: its structured pass's, then its block-by-block
    pass's."""
    return [work_folder_path(output_dir, offload_folder, structure) for structure in (True, False)]


def calibration_digest(inputs: torch.Tensor | list[dict[str, torch.Tensor]]) -> str:
    """A SHA-256 of the calibration tokens' values (or every tensor of image + text samples), to recognise the
    same calibration on resume."""
    digest = hashlib.sha256()
    if isinstance(inputs, torch.Tensor):
        inputs = [{"": inputs}]
    for sample in inputs:
        for key in sorted(sample):
            digest.update(key.encode())
            digest.update(sample[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    write_safetensors(temporary, tensors)
    os.replace(temporary, path)


@dataclass
class Progress:
    """The progress of an interrupted run."""

    next_block: int
    sparsities: list[float]
    layers: list[LayerReport]
    block_seconds: list[float]
    elapsed_seconds: float
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    structure: dict[str, Any] = field(default_factory=dict)  # a structured run: what each block kept
    reconstruction: list[dict[str, Any]] = field(default_factory=list)  # each block's `BlockReconstruction`


class WorkFolder:
    """Saves each finished block to the work folder and reads the state back on resume.

    Args:
        folder: the work folder.
        fingerprint: JSON data identifying the run (config, model, calibration tokens); a resumed run must
            have the same.
        resume: continue from ``folder`` if it holds a run; without it an existing folder is an error, so
            that finished blocks are never thrown away silently.
    """

    def __init__(
        self, folder: str | os.PathLike, fingerprint: dict[str, Any], resume: bool, ranks: Ranks | None = None
    ) -> None:
        self.folder = Path(folder)
        self.ranks = ranks or Ranks()
        world = self.ranks.world
        self.activations_file = (
            ACTIVATIONS if world == 1 else f"activations-{self.ranks.rank:05d}-of-{world:05d}.safetensors"
        )
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        path = self.folder / FINGERPRINT
        if self.has_finished_block:
            if not resume:
                raise FileExistsError(
                    f"{self.folder} holds an unfinished run: pass resume=True (--resume) to continue it, or delete "
                    "the folder to start again from the first block."
                )
            saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            if saved != fingerprint:
                changed = sorted(key for key in {*saved, *fingerprint} if saved.get(key) != fingerprint.get(key))
                raise InputError(
                    f"Cannot resume from {self.folder}: it was started with a different {', '.join(changed)}. "
                    "Run again with the same arguments, or delete the folder to start fresh."
                )
        else:  # nothing worth keeping: a run that stopped before its first block finished starts afresh
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.ranks.main:
                _write_json(path, fingerprint)

    @property
    def has_finished_block(self) -> bool:
        """Whether a block has finished, so that the folder holds work a new run would throw away."""
        return (self.folder / STATE).is_file()

    def block_file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def load(self) -> Progress | None:
        """The saved progress, or ``None`` when no block has finished yet."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        layers = [LayerReport.from_dict(layer) for layer in data["layers"]]
        return Progress(
            data["next_block"],
            data["sparsities"],
            layers,
            data["block_seconds"],
            data["elapsed_seconds"],
            data.get("expert_tokens", {}),
            data.get("structure", {}),
            data.get("reconstruction", []),
        )

    def load_masks(self, num_blocks: int) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for index in range(num_blocks):
            masks.update(load_file(self.folder / f"masks-{index:05d}.safetensors"))
        return masks

    def load_activations(self) -> list[torch.Tensor]:
        """This rank's hidden states entering the next block."""
        tensors = load_file(self.folder / self.activations_file)
        return [tensors[f"batch.{index}"] for index in range(len(tensors))]

    def restore_block(self, block: nn.Module, index: int, prefix: str) -> None:
        """Copy the saved pruned weights of block ``index`` into ``block`` (an in-memory model of the same
        shapes)."""
        tensors = load_file(self.block_file(index))
        block.load_state_dict({name.removeprefix(prefix + "."): tensor for name, tensor in tensors.items()})

    def save_block(
        self,
        index: int,
        block: nn.Module,
        prefix: str,
        masks: dict[str, torch.Tensor],
        next_hidden: list[torch.Tensor] | None,
        state: Progress,
    ) -> None:
        """Record that block ``index`` is finished: its weights, masks, the next block's inputs, then the state.
        In a distributed run rank 0 writes the block and its masks, every rank its own inputs, and the state is
        written once every rank has."""
        if self.ranks.main:
            _save({f"{prefix}.{name}": tensor for name, tensor in block.state_dict().items()}, self.block_file(index))
            _save(masks, self.folder / f"masks-{index:05d}.safetensors")
        if next_hidden is not None:
            _save({f"batch.{i}": hidden for i, hidden in enumerate(next_hidden)}, self.folder / self.activations_file)
        self.ranks.barrier()
        if self.ranks.main:
            _write_json(self.folder / STATE, dataclasses.asdict(state))
        self.ranks.barrier()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
