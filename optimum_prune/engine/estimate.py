"""A dry-run estimate of a pruning run's peak memory, disk use and time, from the model's config alone.

The model is built on the meta device (no weight is read), so the estimate knows every block's layers,
their shapes and the load dtype; the checkpoint contributes only its safetensors headers. Memory terms
are upper bounds of what the engine holds at once; time is the run's floating-point work divided by a
matmul throughput measured on the device in a fraction of a second, plus disk traffic at `DISK_BYTES_PER_S`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import PruningConfig
from ..core.layers import TargetLayer, find_decoder_blocks, find_target_layers, group_experts
from ..core.memory import current_rss, format_bytes
from ..core.safetensors import SafetensorsCheckpoint
from ..errors import InputError
from ..methods import PruningMethod, get_method
from .activations import DISK
from .offload import OFFLOAD_MODES, resolve_dtype

DISK_BYTES_PER_S = 500e6
OUTPUT_FILES_SECONDS = 1.0  # config, tokenizer, sparsity.png (matplotlib's import and drawing: 0.7 s of CPU)
"""Assumed read and write speed of the checkpoint, output and work folders."""


@dataclass
class RunEstimate:
    """Estimated resources of a pruning run (bytes and seconds)."""

    parameters: int
    weights_bytes: int
    block_bytes: int
    outside_bytes: int
    activations_bytes: int
    statistics_bytes: int
    working_bytes: int
    masks_bytes: int
    baseline_bytes: int
    device_peak_bytes: int
    host_peak_bytes: int
    disk_bytes: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.parameters / 1e6:.1f}M parameters, {format_bytes(self.weights_bytes)} of weights, largest block "
            f"{format_bytes(self.block_bytes)}, calibration activations {format_bytes(self.activations_bytes)}; estimated peak "
            f"memory: device {format_bytes(self.device_peak_bytes)}, host {format_bytes(self.host_peak_bytes)}; disk "
            f"{format_bytes(self.disk_bytes)}; time {self.seconds / 60:.1f} min"
        )


def matmul_flops_per_second(device: torch.device, size: int = 512, repeats: int = 8) -> float:
    """Measured float32 matmul throughput of ``device`` (a fraction of a second)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / max(time.perf_counter() - start, 1e-9)


# A structured group's float32 matrices of the consumer's input width: the Gram of the fitted and of the
# held-out sequences, their sum, the dampened copy and its inverse (`structured.prune`, `structured.select`).
STRUCTURE_GRAMS = 5


def _statistics_bytes(method: PruningMethod, layers: list[TargetLayer]) -> int:
    """The statistics held at once while pruning a block: every linear layer's, and one expert's."""
    linear = sum(method.statistic_bytes(*layer.shape) for layer in layers if layer.expert is None)
    experts = group_experts(layers).values()
    return linear + max((sum(method.statistic_bytes(*layer.shape) for layer in group) for group in experts), default=0)


def estimate_run(
    model: nn.Module,
    config: PruningConfig,
    *,
    device: str | torch.device = "cpu",
    offload: str = "cpu",
    activations_device: str | torch.device | None = None,
    write_output: bool = True,
    flops_per_second: float | None = None,
    baseline_bytes: int | None = None,
    measure_time: bool = True,
) -> RunEstimate:
    """Estimate a run on ``model`` (real or on the meta device: only shapes and dtypes are read). The time
    divides the run's FLOPs by ``flops_per_second`` (default: measured on the device); without
    ``measure_time`` it is left out (NaN) and nothing is measured.

    Longer than most functions on purpose: the memory, disk and time terms are one formula sheet, read and
    checked together against `benchmarks/memory.py`.
    """
    if offload not in OFFLOAD_MODES:
        raise InputError(f"Unknown offload {offload!r}: choose one of {', '.join(OFFLOAD_MODES)}.")
    device = torch.device(device)
    on_disk = activations_device == DISK  # memory-mapped files: neither device nor host memory
    storage = (
        torch.device("cpu" if on_disk else activations_device)
        if activations_device
        else (device if offload == "cpu" else torch.device("cpu"))
    )
    blocks_name, blocks = find_decoder_blocks(model)
    layers = find_target_layers(model, config.targets, config.ignore)
    parameters = {id(p): p for p in model.parameters()}.values()
    itemsize = next(iter(parameters)).dtype.itemsize
    weights = sum(p.numel() * p.dtype.itemsize for p in parameters)
    block_bytes = max(sum(p.numel() * p.dtype.itemsize for p in block.parameters()) for block in blocks)
    output = model.get_output_embeddings()
    output_bytes = output.weight.numel() * output.weight.dtype.itemsize if output is not None else 0
    outside = weights - sum(sum(p.numel() * p.dtype.itemsize for p in block.parameters()) for block in blocks)
    capture_outside = outside - output_bytes if offload == "disk" else 0

    hidden = model.config.get_text_config().hidden_size
    heads = getattr(model.config.get_text_config(), "num_attention_heads", 1)
    calibrated = config.needs_calibration
    tokens = config.num_samples * config.seq_len if calibrated else 0
    activations = tokens * hidden * itemsize
    widest = max((layer.shape[0] for block in layers for layer in block), default=hidden)
    batch_tokens = min(config.batch_size, config.num_samples) * config.seq_len if calibrated else 0
    forward = batch_tokens * (6 * hidden + 3 * widest) * 4 + 2 * batch_tokens * config.seq_len * heads * 4

    method = get_method(config.method, config.settings, config.refit, config.gptq)
    statistics = max((_statistics_bytes(method, block) for block in layers if block), default=0) if calibrated else 0
    if config.structure is not None and calibrated:  # one consumer's Gram matrices while its group is pruned
        widest_input = max(layer.in_features for block in layers for layer in block)
        statistics = max(statistics, STRUCTURE_GRAMS * widest_input**2 * 4)
    routing = activations if any(layer.expert is not None for block in layers for layer in block) else 0
    work = max(method.working_bytes(*layer.shape) for block in layers for layer in block)
    masks = 0 if offload == "disk" else sum(layer.shape[0] * layer.shape[1] for block in layers for layer in block) // 8
    baseline = current_rss() if baseline_bytes is None else baseline_bytes
    chain_bytes, chain_flops = method.block_costs(layers, tokens)

    reconstruct = config.reconstruct
    if reconstruct is not None:  # the targets (and the dense stream), the block trained in float32 with Adam
        routing += activations * (2 if reconstruct.inputs == "dense" else 1)
        block_parameters = max(sum(p.numel() for p in block.parameters()) for block in blocks)
        work = max(work, RECONSTRUCTION_COPIES * block_parameters * 4 + 2 * forward)
    on_device_activations = 2 * activations + routing if storage.type == device.type and not on_disk else 0
    block_phase = block_bytes + statistics + work + forward + on_device_activations
    capture_phase = capture_outside + forward + on_device_activations // 2
    device_peak = max(block_phase, capture_phase)
    resident = weights if offload == "cpu" else block_bytes  # weights held in host memory at the busiest moment
    host_activations = (
        0 if on_disk or (storage.type == device.type and device.type != "cpu") else 2 * activations + routing
    )
    if device.type == "cpu":
        # in RAM: all weights (cpu), or the block being processed plus its copy while read from disk (disk)
        others = weights - block_bytes if offload == "cpu" else block_bytes
        host_peak = baseline + masks + max(block_phase + others, capture_phase + (weights if offload == "cpu" else 0))
    else:
        host_peak = baseline + masks + resident + host_activations + capture_outside
    host_peak += chain_bytes  # what a method pruning layers jointly keeps in host RAM (SparseLLM's chain inputs)

    disk = ((weights + activations) if write_output else 0) + (2 * activations if on_disk else 0)
    passes = (2 if calibrated else 0) * (2 if config.allocation == "owl" else 1)
    flops = chain_flops
    routed = getattr(model.config.get_text_config(), "num_experts_per_tok", 1)
    block_forwards = []
    for block_layers in layers:  # an expert sees its share of the tokens
        linear = sum(
            layer.shape[0] * layer.shape[1] * (1 if layer.expert is None else routed / layer.weight.shape[0])
            for layer in block_layers
        )
        block_forwards.append(2 * linear * tokens + 4 * tokens * config.seq_len * hidden)
        flops += passes * block_forwards[-1]
        flops += sum(method.pruning_flops(*layer.shape, tokens) for layer in block_layers)
        if reconstruct is not None:  # targets, then a forward and a backward per epoch, the held-out error twice
            train, held = reconstruct.split(math.ceil(config.num_samples / config.batch_size))
            share = train / (train + held)
            flops += block_forwards[-1] * (1 + 3 * reconstruct.epochs * share + 2 * (1 - share))
    if config.structure is not None and config.structure.is_budget:  # every mix pruned on a share of the calibration
        from ..structured.budget import MAX_MIXES
        from .budget import SEARCH_SEQUENCES

        flops *= 1 + MAX_MIXES * min(SEARCH_SEQUENCES, config.num_samples) / config.num_samples
    if config.structure is not None and config.structure.layers and config.structure.layer_criterion == "loss":
        flops += _blocks_by_loss_flops(model, config, sum(block_forwards) / len(block_forwards), tokens)
    traffic = (weights if offload == "disk" else 0) + disk
    traffic += activations * len(blocks) * (int(write_output) + 2 * int(on_disk))
    seconds = math.nan
    if measure_time:
        seconds = flops / (flops_per_second or matmul_flops_per_second(device)) + traffic / DISK_BYTES_PER_S
        seconds += OUTPUT_FILES_SECONDS if write_output else 0.0
    return RunEstimate(
        parameters=sum(p.numel() for p in parameters),
        weights_bytes=weights,
        block_bytes=block_bytes,
        outside_bytes=outside,
        activations_bytes=activations,
        statistics_bytes=statistics,
        working_bytes=work,
        masks_bytes=masks,
        baseline_bytes=baseline,
        device_peak_bytes=device_peak,
        host_peak_bytes=host_peak,
        disk_bytes=disk,
        seconds=seconds,
    )


RECONSTRUCTION_COPIES = 5  # float32 copies of a block while it is trained: weights, gradients, Adam's two, original


def _blocks_by_loss_flops(model: nn.Module, config: PruningConfig, block_flops: float, tokens: int) -> float:
    """Choosing blocks by loss (`StructuredEngine._blocks_by_loss`): per removal, every remaining block applied to
    the hidden states of each candidate that reaches it, and the head for every candidate, on its sequences."""
    from .structured import LOSS_SEQUENCES

    share = min(LOSS_SEQUENCES, config.num_samples) / config.num_samples
    num_blocks = len(find_decoder_blocks(model)[1])
    vocab = model.config.get_text_config().vocab_size
    hidden = model.config.get_text_config().hidden_size
    total = 0.0
    for step in range(round(num_blocks * config.structure.layers)):
        remaining = num_blocks - step
        applications = remaining + remaining * (remaining - 1) / 2
        total += share * (applications * block_flops + remaining * 2 * hidden * vocab * tokens)
    return total


def estimate(
    model_or_path: str | os.PathLike,
    config: PruningConfig | None = None,
    *,
    device: str | torch.device | None = None,
    offload: str | None = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    write_output: bool = True,
    offload_activations: bool = False,
) -> RunEstimate:
    """Estimate a run on a local model folder from its config.json and safetensors headers, loading no weight.

    Raises the errors a run would raise before starting (missing shards, an unknown dtype, no blocks).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..core.auto import auto_model_class

    folder = Path(model_or_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: estimate() reads a local model folder.")
    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    checkpoint = SafetensorsCheckpoint(folder)
    resolved = resolve_dtype(dtype, getattr(model_config, "dtype", None), checkpoint)
    with init_empty_weights():
        model = auto_model_class(model_config).from_config(
            model_config, dtype=resolved, trust_remote_code=trust_remote_code
        )
    device = (
        torch.device(device) if device is not None else torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    )
    return estimate_run(
        model,
        config or PruningConfig(),
        device=device,
        offload=offload or "cpu",
        activations_device=DISK if offload_activations else None,
        write_output=write_output,
    )
