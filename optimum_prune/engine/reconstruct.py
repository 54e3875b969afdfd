"""Block-wise reconstruction: after a block is pruned, train what it kept to reproduce the dense block.

Shin et al. (EMNLP 2024, arXiv 2406.15524) and EBFT (arXiv 2402.12419): the pruned block's kept weights, norms and
biases are trained by Adam (learning rate decayed linearly to zero) so that its output on the calibration batches
matches the dense block's, the pruned weights held at exactly zero (their gradients dropped, the zeros written
back after every step, so N:M patterns and structured shapes hold). The loss is per hidden channel: each channel's
squared error divided by that channel's mean square in the targets (``"normalized"``), because in models with
massive activations one residual channel holds most of the hidden state's norm (SmolLM2: 83-98% from block 11 on)
and a plain MSE trains for it alone. A share of the calibration batches is held out: the block keeps its trained
weights only if their held-out error fell (the refit's rule), else it goes back to what pruning left.

In a distributed run the calibration batches are numbered across the ranks; each step is one of them, run by the
rank holding it, its gradients summed over the ranks (the others add zeros), so every rank ends with the weights
one process would reach on the same batches (the training steps themselves do not run in parallel). The engine
calls `reconstruct_block` with the block on the execution device.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.layers import TargetLayer
from ..method_settings import ReconstructionSettings
from .capture import CalibrationBatch
from .distributed import Ranks


@dataclass
class BlockReconstruction:
    """What reconstruction did to one block: held-out error before and after (relative, per channel), the
    calibration loss at the first and last step, the epochs run, the seconds, and whether it kept the result."""

    block: int
    held_out_before: float
    held_out_after: float
    first_loss: float
    last_loss: float
    epochs: int
    seconds: float
    kept: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _float32(batch: CalibrationBatch) -> CalibrationBatch:
    """``batch`` with every floating tensor in float32, for training."""

    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.float()
        if isinstance(value, tuple):
            return tuple(cast(item) for item in value)
        return value

    return CalibrationBatch(
        cast(batch.hidden), cast(batch.args), {key: cast(value) for key, value in batch.kwargs.items()}
    )


class _Objective:
    """The loss of a block output against its target: per-channel normalised or plain, as a sum over tokens (so
    that sums over batches and ranks divide once by the token count)."""

    def __init__(self, kind: str, targets: list[torch.Tensor], ranks: Ranks, device: torch.device) -> None:
        width = targets[0].shape[-1]
        squares = torch.zeros(width, dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        for target in targets:
            flat = target.to(device).reshape(-1, width).double()
            squares += flat.square().sum(0)
            tokens += flat.shape[0]
        ranks.all_reduce(squares)
        ranks.all_reduce(tokens)
        mean_square = squares / tokens.clamp_min(1)
        if (
            kind == "normalized"
        ):  # a channel of almost no energy weighs at most 1e6 times an average one, not infinitely
            self.weights = (1.0 / mean_square.clamp_min(1e-6 * mean_square.mean().item())).float()
        else:  # "mse": every channel alike (1 / width, so the reported error is the mean square over width)
            self.weights = torch.full((width,), 1.0 / width, device=device)
        self.width = width

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed over tokens, averaged over channels."""
        error = (output.float() - target.float()).reshape(-1, self.width).square()
        return (error * self.weights).sum() / self.width


def _held_out_error(
    block: nn.Module,
    batches: list[CalibrationBatch],
    targets: list[torch.Tensor],
    objective: _Objective,
    ranks: Ranks,
    device: torch.device,
) -> float:
    """The objective per token over every rank's held-out batches."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch, target in zip(batches, targets, strict=True):
            output = _float32(batch).run(block, device)
            total[0] += objective(output, target.to(device)).double()
            total[1] += output.numel() / objective.width
    ranks.all_reduce(total)
    return (total[0] / total[1].clamp_min(1)).item()


def reconstruct_block(
    index: int,
    block: nn.Module,
    layers: list[TargetLayer],
    batches: list[CalibrationBatch],
    targets: list[torch.Tensor],
    settings: ReconstructionSettings,
    device: torch.device,
    ranks: Ranks | None = None,
    progress: bool = False,
) -> BlockReconstruction:
    """Train the pruned ``block`` on ``batches`` (this rank's) towards ``targets`` (the dense block's outputs for
    them) with ``settings``; the zeros of the target ``layers`` stay zero.

    The batches are numbered across the ranks (rank 0's first): the last share of them judges, and each training
    step is one of the others, in an order drawn alike on every rank, run by the rank that holds it (the gradients
    are summed over the ranks), so that a distributed run takes the steps of one process."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    ranks = ranks or Ranks.current()
    counts = ranks.gather(len(batches))
    offset = sum(counts[: ranks.rank])
    train_count, _ = settings.split(sum(counts))
    mine = {offset + local: local for local in range(len(batches))}  # global batch -> this rank's
    train = [global_index for global_index in mine if global_index < train_count]
    held = [mine[global_index] for global_index in mine if global_index >= train_count]
    dtype = next(block.parameters()).dtype
    block.float()
    objective = _Objective(settings.loss, [targets[mine[g]] for g in train], ranks, device)
    zeros = {id(layer.weight): layer.weight.detach() == 0 for layer in layers}
    parameters = [parameter for parameter in block.parameters() if parameter.is_floating_point()]
    trainable = [parameter.requires_grad for parameter in parameters]  # a disk-offloaded block's are off
    for parameter in parameters:
        parameter.requires_grad_(True)
    original = [parameter.detach().clone() for parameter in parameters]
    held_batches, held_targets = [batches[i] for i in held], [targets[i] for i in held]
    before = _held_out_error(block, held_batches, held_targets, objective, ranks, device)
    for parameter in parameters:  # ranks that do not hold a step's batch sum zeros with the one that does
        parameter.grad = torch.zeros_like(parameter)
    total_steps = train_count * settings.epochs
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    order = torch.Generator().manual_seed(index)
    losses: list[float] = []
    bar = tqdm(total=total_steps, desc=f"Reconstructing block {index}", unit="step", leave=False, disable=not progress)
    for _ in range(settings.epochs):
        for global_index in torch.randperm(train_count, generator=order).tolist():
            optimizer.zero_grad(set_to_none=False)
            summed = torch.zeros(2, dtype=torch.float64, device=device)  # this step's loss and tokens
            if global_index in mine:
                local = mine[global_index]
                with torch.enable_grad():
                    output = _float32(batches[local]).run(block, device)
                    loss = objective(output, targets[local].to(device))
                    loss.backward()
                summed += torch.tensor([loss.item(), output.numel() / objective.width], device=device)
            ranks.all_reduce(summed)
            for parameter in parameters:
                ranks.all_reduce(parameter.grad)
                parameter.grad /= summed[1].clamp_min(1).to(parameter.grad.dtype)
                mask = zeros.get(id(parameter))
                if mask is not None:
                    parameter.grad.masked_fill_(mask, 0.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for parameter in parameters:
                    mask = zeros.get(id(parameter))
                    if mask is not None:
                        parameter.masked_fill_(mask, 0.0)  # Adam's moments must not move a pruned weight
            losses.append((summed[0] / summed[1].clamp_min(1)).item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    bar.close()
    after = _held_out_error(block, held_batches, held_targets, objective, ranks, device)
    kept = math.isfinite(after) and after < before
    if not kept:
        with torch.no_grad():
            for parameter, value in zip(parameters, original, strict=True):
                parameter.copy_(value)
    block.to(dtype)
    for parameter, flag in zip(parameters, trainable, strict=True):
        parameter.grad = None
        parameter.requires_grad_(flag)
    return BlockReconstruction(
        index, before, after, losses[0], losses[-1], settings.epochs, time.perf_counter() - start, kept
    )
