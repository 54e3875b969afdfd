"""Capture what the first decoder block receives for every calibration batch: the hidden states (kept where
the `ActivationStore` says) and the other arguments the model passes it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from .activations import ActivationStore
from .offload import DiskOffload


class _InputsCaptured(Exception):
    """Raised by the hook on the first block once its inputs are recorded."""


@dataclass
class CalibrationBatch:
    """One batch of hidden states entering a block, with the other arguments the block is called with."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict

    def run(self, block: nn.Module, device: torch.device) -> torch.Tensor:
        output = block(self.hidden.to(device), *self.args, **self.kwargs)
        return output[0] if isinstance(output, tuple) else output


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder blocks (embeddings, rotary tables)."""
    inside = set(blocks.modules())
    for module in model.modules():
        if module in inside:
            continue
        for parameter in module._parameters.values():
            if parameter is not None and not parameter.is_meta:
                parameter.data = parameter.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)


CalibrationInputs = torch.Tensor | list[dict[str, torch.Tensor]]
"""``(num_samples, seq_len)`` token ids, or one dict of model inputs per sample (a processor's, for images)."""


def _model_inputs(inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    """``inputs`` on ``device``; pixel values and other floating inputs in the model's ``dtype``."""
    return {key: value.to(device, dtype if value.is_floating_point() else None) for key, value in inputs.items()}


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    inputs: CalibrationInputs,
    batch_size: int,
    device: torch.device,
    store: ActivationStore,
    placed: bool = False,
) -> list[CalibrationBatch]:
    """Run the model up to its first block for every batch of ``inputs`` and record what the block gets.

    For token ids, the other arguments (masks, positions, rotary embeddings) only depend on the batch shape,
    since calibration sequences have equal length and no padding, so they are recorded once per shape; samples
    given as model inputs (images: positions follow where they sit) are one batch each, with their own. The
    modules before the first block run on ``device``, or where accelerate ``placed`` them (its hooks move the
    inputs).
    """
    batches: list[CalibrationBatch] = []
    extras: dict[object, tuple[tuple, dict]] = {}
    per_shape = isinstance(inputs, torch.Tensor)

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        key = hidden.shape if per_shape else len(batches)
        if key not in extras:
            extras[key] = (args[1:], kwargs)
        batches.append(CalibrationBatch(store.keep(hidden), *extras[key]))
        raise _InputsCaptured

    if not placed:
        _move_outside_blocks(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    samples = [{"input_ids": batch} for batch in inputs.split(batch_size)] if per_shape else inputs
    dtype = next(blocks.parameters()).dtype
    try:
        for sample in samples:
            with suppress(_InputsCaptured):
                model(**_model_inputs(sample, device, dtype), use_cache=False)
    finally:
        handle.remove()
        if not placed:
            _move_outside_blocks(model, blocks, torch.device("cpu"))
    return batches


@contextmanager
def outside_blocks_loaded(
    model: nn.Module, blocks: nn.ModuleList, disk: DiskOffload | None, head: bool = False
) -> Iterator[None]:
    """Read the weights outside the blocks that may run before the first block (all but the output
    embedding, unless ``head``) from disk, and empty them again afterwards; a no-op for in-memory models."""
    if disk is None:
        yield
        return
    inside = set(blocks.modules())
    output = model.get_output_embeddings()
    skip = set() if output is None else set(output.modules())
    modules = [(name, m) for name, m in model.named_modules() if m not in inside and m not in skip]
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source, left out of checkpoints
    heads = [(name, m) for name, m in model.named_modules() if m in skip] if head else []
    try:
        for name, module in modules:
            disk.load(module, name, recurse=False)
        for name, module in heads:
            if f"{name}.weight" in tied:  # the head is the input embedding: share it, as transformers ties it
                module.weight = model.get_parameter(tied[f"{name}.weight"])
            else:
                disk.load(module, name, recurse=False)
        yield
    finally:
        for _, module in modules + heads:
            disk.release(module, recurse=False)


class _Replay(nn.Module):
    """Stands in for all the decoder blocks: returns the given hidden states, whatever it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.hidden


@contextmanager
def loss_after_blocks(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device, disk: DiskOffload | None, placed: bool = False
) -> Iterator[Callable[[list[torch.Tensor], torch.Tensor], float]]:
    """A function giving the model's own mean next-token loss on ``input_ids`` (one row per sequence) when its
    last block outputs the given hidden states (a list of ``(batch, seq, hidden)`` tensors covering the rows in
    order). What comes after the blocks (final norm, head, the loss) runs in the model's own code: while inside,
    the blocks are replaced by one stand-in that returns those hidden states."""
    replay = _Replay()
    saved = blocks._modules
    blocks._modules = {"0": replay}
    try:
        with outside_blocks_loaded(model, blocks, disk, head=True):
            if not placed:
                _move_outside_blocks(model, blocks, device)

            def loss(hidden: list[torch.Tensor], input_ids: torch.Tensor) -> float:
                rows = [row for batch in hidden for row in batch.split(1)]
                total = 0.0
                for row, ids in zip(rows, input_ids.split(1), strict=True):  # one sequence: logits stay small
                    replay.hidden = row.to(device)
                    output = model(input_ids=ids.to(device), labels=ids.to(device), use_cache=False)
                    total += float(output.loss)
                return total / len(rows)

            try:
                yield loss
            finally:
                if not placed:
                    _move_outside_blocks(model, blocks, torch.device("cpu"))
    finally:
        blocks._modules = saved
