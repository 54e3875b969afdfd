"""The block-by-block engine: prune one decoder block at a time on the execution device.

For each block: move it to the device, gather the statistics its method needs from hooks on the target
layers over every calibration batch, prune, run the pruned block to make the next block's inputs (errors
propagate as in the SparseGPT and Wanda references), and move it back. Everything else stays where it is.
With a `DiskOffload` the model lives on the meta device and each block is read from the checkpoint just
before it is processed and emptied right after; with a `WorkFolder` every finished block is saved so
that an interrupted run resumes from the first unfinished one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import outlier_ratio, owl_sparsities
from ..config import PruningConfig
from ..core.experts import RoutingRecord
from ..core.layers import (
    TargetLayer,
    expert_parameters,
    find_decoder_blocks,
    find_target_layers,
    group_experts,
    outside_language_model,
    untargeted_matrices,
)
from ..core.masks import pack_mask
from ..core.memory import map_large_allocations, peak_memory
from ..core.statistics import InputNorms, LayerStatistic
from ..errors import InputError
from ..methods import BlockContext, PruningMethod
from ..report import LayerReport, PruningReport
from .activations import ActivationStore
from .capture import CalibrationBatch, CalibrationInputs, capture_block_inputs, outside_blocks_loaded
from .dispatch import AccelerateDispatch
from .distributed import Ranks
from .offload import DiskOffload
from .reconstruct import reconstruct_block
from .work_folder import Progress, WorkFolder

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised once the last target layer of a block has its inputs: the rest of a statistics pass is unused."""


class _StatisticsCollector:
    """Forward pre-hooks that feed each target layer's inputs to its statistic, and each experts module's calls
    to its `RoutingRecord`.

    Layers that receive the very same input tensor object (q/k/v, gate/up) share one statistic, computed
    once. Identity is checked through weak references: a data pointer alone can be reused by a later
    activation of the same shape once the first is freed (GPT-2's ``ln_2`` output lands where ``ln_1``'s was).
    When the first batch calls every hooked module exactly once (a dense block), later batches stop at the
    last of them, before it computes: its output and everything after it in the block are never used.
    """

    def __init__(
        self,
        layers: list[TargetLayer],
        make: Callable[[TargetLayer], LayerStatistic | None],
        routing: dict[str, RoutingRecord] | None = None,
        whole: bool = False,
    ):
        routing = routing or {}
        self._whole = whole  # every batch runs through the whole block (its output is wanted)
        self.statistics: dict[str, LayerStatistic] = {}
        self._owners: set[str] = set()
        self._make = make
        self._names = [layer.name for layer in layers] + list(routing)
        self._seen: list[tuple[weakref.ref, type, str]] = []
        self._calls: list[str] = []
        self._last: str | None = None
        self._handles = [layer.module.register_forward_pre_hook(self._hook(layer)) for layer in layers]
        self._handles += [
            record.module.register_forward_pre_hook(self._routing_hook(name, record), with_kwargs=True)
            for name, record in routing.items()
        ]

    def run(self, batch: CalibrationBatch, block: nn.Module, device: torch.device) -> torch.Tensor | None:
        """Run ``batch`` through ``block`` as far as the statistics need (all of it when ``whole``); return the
        block's output when it was computed."""
        self._calls = []
        output = None
        with suppress(_StopForward):
            output = batch.run(block, device)
        if not self._whole and self._last is None and sorted(self._calls) == sorted(self._names):
            self._last = self._calls[-1]
        return output

    def _called(self, name: str) -> None:
        self._calls.append(name)
        if name == self._last:
            raise _StopForward

    def _routing_hook(self, name: str, record: RoutingRecord):
        def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
            record.observe(args, kwargs)
            self._called(name)

        return observe

    def _hook(self, layer: TargetLayer):
        def observe(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if layer.name not in self.statistics:
                statistic = self._make(layer)
                if statistic is None:
                    self._called(layer.name)
                    return
                kind = type(statistic)
                owner = next((name for ref, k, name in self._seen if ref() is inputs and k is kind), None)
                if owner is None:
                    self._seen.append((weakref.ref(inputs), kind, layer.name))
                    self._owners.add(layer.name)
                else:
                    statistic = self.statistics[owner]
                self.statistics[layer.name] = statistic
            if layer.name in self._owners:
                self.statistics[layer.name].update(inputs)
            self._called(layer.name)

        return observe

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _input_norms(layer: TargetLayer, device: torch.device) -> InputNorms:
    return InputNorms(layer.in_features, device)


@contextmanager
def _on_device(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


class BlockwiseEngine:
    """Prunes a model block by block with a `PruningMethod`.

    Args:
        model: a transformers causal LM (weights on CPU).
        config: the pruning config.
        method: the method choosing the masks.
        device: where each block is processed (``"cuda:0"``, ``"cpu"``).
        activations_device: where calibration activations are kept between blocks (default: ``device``), or
            ``"disk"``: memory-mapped files in ``activations_folder`` (default: the system's temporary folder).
        progress: show a tqdm bar per block.
        disk: read each block from the checkpoint when it is processed (the model is on the meta device).
        work_folder: save every finished block there and resume from it.
        dispatch: the model was placed by accelerate (``device_map``): each block is loaded through its hooks
            and written back where accelerate keeps it.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig,
        method: PruningMethod,
        device: str | torch.device = "cpu",
        activations_device: str | torch.device | None = None,
        progress: bool = True,
        disk: DiskOffload | None = None,
        work_folder: WorkFolder | None = None,
        activations_folder: str | os.PathLike | None = None,
        dispatch: AccelerateDispatch | None = None,
    ) -> None:
        self.model = model
        self.dispatch = dispatch
        self.config = config
        self.method = method
        self.device = torch.device(device)
        self.activations = ActivationStore(activations_device or self.device, activations_folder)
        self.progress = progress
        self.disk = disk
        self.work = work_folder
        self.blocks_name, self.blocks = find_decoder_blocks(model)
        self.checkpoint_blocks = list(range(len(self.blocks)))  # the checkpoint's number of each block
        self.layers = find_target_layers(model, config.targets, config.ignore)
        self.masks: dict[str, torch.Tensor] = {}
        self.left_dense = untargeted_matrices(model, self.layers)
        self.ranks = Ranks.current()
        # the calibration inputs move on from block to block: for the method's statistics or for reconstruction
        self._needs_inputs = method.needs_statistics or config.reconstruct is not None
        self._dense_batches: list[CalibrationBatch] | None = None  # the dense model's stream (reconstruct inputs)
        self._check_pattern()
        self._warn_left_dense()

    def _warn_left_dense(self) -> None:
        """Say, before any work, which large weights inside the blocks this run will not prune."""
        total = sum(self.left_dense.values())
        in_blocks = sum(p.numel() for p in self.blocks.parameters())
        if total < 0.01 * in_blocks:
            return
        names = sorted({name.split(".", 2)[-1].split(".", 1)[-1] for name in self.left_dense})
        logger.warning(
            "%s parameters inside the decoder blocks (%.0f%% of them) are not pruned: %s. optimum-prune prunes "
            "linear layers (nn.Linear, Conv1D) and fused experts; routers, other parameters and ignored layers "
            "stay dense, and the global sparsity counts the target layers only.",
            f"{total:,}",
            100 * total / in_blocks,
            ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""),
        )

    def _warn_sparser_than_asked(self, state: Progress) -> None:
        """Say so when the weights hold more zeros than asked: the model was sparse before (pruned already).
        GPTQ rounds some kept weights to zero: expected, not said."""
        if self.config.gptq:
            return
        sparser = [layer for layer in state.layers if layer.sparsity > layer.target_sparsity + 0.005]
        if sparser:
            worst = max(sparser, key=lambda layer: layer.sparsity - layer.target_sparsity)
            logger.warning(
                "%d of %d layers hold more zeros than the %.1f%% asked (%s: %.1f%%): the model was already sparse "
                "before this run (pruned before?); the report counts the zeros in the weights.",
                len(sparser),
                len(state.layers),
                100 * worst.target_sparsity,
                worst.name,
                100 * worst.sparsity,
            )

    def _check_pattern(self) -> None:
        pattern = self.config.nm_pattern
        if pattern is None:
            return
        for layer in (layer for block in self.layers for layer in block):
            if layer.in_features % pattern.m:
                raise InputError(
                    f"Pattern {pattern} needs the input width of every target layer to be a multiple of "
                    f"{pattern.m}, but {layer.name} has {layer.in_features} inputs: add it to `ignore` or "
                    "choose another M."
                )

    @contextmanager
    def _block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` on the execution device (read from disk first when offloaded to disk)."""
        block = self.blocks[index]
        if self.disk is not None:
            self.disk.load(block, f"{self.blocks_name}.{self.checkpoint_blocks[index]}")
        if self.dispatch is not None:
            self.dispatch.load(block)
        try:
            with _on_device(block, self.device):
                yield block
        finally:
            if self.disk is not None:
                self.disk.release(block)
            if self.dispatch is not None:
                self.dispatch.release(block)

    @torch.no_grad()
    def run(self, input_ids: CalibrationInputs | None) -> PruningReport:
        """Prune every block; ``input_ids`` is ``(num_samples, seq_len)`` calibration tokens or one dict of model
        inputs per sample (``None`` for methods that need no calibration). Returns the per-layer report; masks are kept in `masks` (packed),
        except with disk offload, where only the work folder holds them."""
        start = time.perf_counter()
        map_large_allocations()
        batches = None
        if self.config.needs_calibration:
            if input_ids is None:
                raise InputError(
                    f"{self.config.calibration_needed_by} needs calibration data: pass a dataset to prune()."
                )
            with outside_blocks_loaded(self.model, self.blocks, self.disk):
                batches = capture_block_inputs(
                    self.model,
                    self.blocks,
                    self.ranks.shard(input_ids),
                    self.config.batch_size,
                    self.device,
                    self.activations,
                    placed=self.dispatch is not None,
                )
        state = self.work.load() if self.work is not None else None
        if self._keeps_dense_stream:
            self._dense_batches = batches
        if state is None:
            state = Progress(0, self._block_sparsities(batches), [], [], 0.0)
        else:
            batches = self._resume(state, batches)
        sparsities = state.sparsities
        bar = tqdm(
            range(state.next_block, len(self.blocks)),
            desc=f"Pruning ({self.config.method})",
            unit="block",
            initial=state.next_block,
            total=len(self.blocks),
            disable=not self.progress,
        )
        for index in bar:
            batches = self._prune_block(index, sparsities[index], batches, state)
            bar.set_postfix(sparsity=f"{sparsities[index]:.3f}")
        self._warn_sparser_than_asked(state)
        return PruningReport(
            method=self.config.method,
            pattern=self.config.pattern,
            target_sparsity=self.config.sparsity,
            allocation=self.config.allocation,
            layers=state.layers,
            block_seconds=state.block_seconds,
            total_seconds=time.perf_counter() - start,
            peak_memory_bytes=peak_memory(self.device),
            left_dense_parameters=sum(self.left_dense.values()),
            vision_parameters=sum(p.numel() for p in outside_language_model(self.model)),
            expert_tokens=state.expert_tokens,
            reconstruction=state.reconstruction or None,
        )

    @property
    def _keeps_dense_stream(self) -> bool:
        """Whether reconstruction feeds each block the dense model's hidden states (a second stream)."""
        return self.config.reconstruct is not None and self.config.reconstruct.inputs == "dense"

    def _dense_targets(self, block: nn.Module, batches: list[CalibrationBatch] | None) -> list[torch.Tensor]:
        """The dense block's outputs for the hidden states reconstruction trains on (before it is pruned)."""
        stream = self._dense_batches if self._keeps_dense_stream else batches
        return [self.activations.keep(batch.run(block, self.device)) for batch in stream]

    def _reconstruct(
        self,
        index: int,
        block: nn.Module,
        layers: list[TargetLayer],
        batches: list[CalibrationBatch],
        targets: list[torch.Tensor],
        state: Progress,
    ) -> None:
        """Train the pruned block (the zeros of its target ``layers`` frozen) towards the dense block's outputs
        (`engine.reconstruct`), recorded in ``state``; with dense inputs, those outputs are the dense stream's next
        hidden states."""
        inputs = self._dense_batches if self._keeps_dense_stream else batches
        result = reconstruct_block(
            index, block, layers, inputs, targets, self.config.reconstruct, self.device, self.ranks, self.progress
        )
        state.reconstruction.append(result.to_dict())
        if self._keeps_dense_stream:
            for batch in self._dense_batches:
                self.activations.evict(batch.hidden)
            self._dense_batches = [
                CalibrationBatch(target, batch.args, batch.kwargs)
                for target, batch in zip(targets, self._dense_batches, strict=True)
            ]

    def _saved_hidden(self, batches: list[CalibrationBatch] | None, index: int) -> list[torch.Tensor] | None:
        """What the work folder keeps for the next block: its inputs (then the dense stream's, when kept)."""
        if not batches or index + 1 >= len(self.blocks):
            return None
        dense = [batch.hidden for batch in self._dense_batches] if self._keeps_dense_stream else []
        return [batch.hidden for batch in batches] + dense

    def _prune_block(
        self, index: int, sparsity: float, batches: list[CalibrationBatch] | None, state: Progress
    ) -> list[CalibrationBatch] | None:
        """Prune block ``index``, record it in ``state`` (and the work folder); return the next block's inputs.
        Its statistics and masks are freed on return, before the next block is read."""
        block_start = time.perf_counter()
        with self._block(index) as block:
            layers = self.layers[index]
            linear = [layer for layer in layers if layer.expert is None]
            reconstructs = self.config.reconstruct is not None and batches is not None
            same_pass = reconstructs and not self._keeps_dense_stream and self.method.needs_statistics and layers
            targets: list[torch.Tensor] | None = [] if same_pass else None  # recorded by the statistics pass
            statistics, routing = (
                self._collect(block, layers, batches, self.method.make_statistic, targets)
                if self.method.needs_statistics
                else ({}, {})
            )
            if reconstructs and not same_pass:
                targets = self._dense_targets(block, batches)
            pattern = self.config.nm_pattern
            errors: dict[str, tuple[float, float]] = {}
            masks = self._prune(BlockContext(index, block, linear, statistics, sparsity, pattern, errors))
            del statistics
            routed = {name: self._routed_tokens(record) for name, record in routing.items()}
            state.expert_tokens.update(routed)
            expert_statistics = self._expert_statistics(layers, routing, routed, self.method.make_statistic)
            for experts, statistics in expert_statistics:
                masks.update(self._prune(BlockContext(index, block, experts, statistics, sparsity, pattern, errors)))
                del statistics  # one expert's statistics at a time
            del routing
            if reconstructs:
                self._reconstruct(index, block, layers, batches, targets, state)
                del targets
            if self._needs_inputs and index + 1 < len(self.blocks):
                batches = self._propagate(block, batches)
            packed = self._record_masks(index, sparsity, masks, errors, state)
            if self.disk is None:  # a disk-offloaded run keeps them in its work folder only
                self.masks.update(packed)
            state.block_seconds.append(time.perf_counter() - block_start)
            state.next_block = index + 1
            if self.work is not None:
                state.elapsed_seconds = state.elapsed_seconds + state.block_seconds[-1]
                self.work.save_block(
                    index, block, f"{self.blocks_name}.{index}", packed, self._saved_hidden(batches, index), state
                )
        return batches

    def _prune(self, context: BlockContext) -> dict[str, torch.Tensor]:
        """The method's masks of the context's layers. In a distributed run each rank prunes the layers it owns
        (shared out by cost) and broadcasts their pruned weights and masks to the others."""
        if not self.ranks.distributed or not context.layers:
            return self.method.prune_block(context)
        if self.method.joint:  # layers pruned together stay together: a whole block per rank, in turn
            owners = [context.index % self.ranks.world] * len(context.layers)
        else:  # shared out by the cost of the pruning math (the statistics are already summed)
            owners = self.ranks.owners([self.method.pruning_flops(*layer.shape, 0) for layer in context.layers])
        mine = [layer for layer, owner in zip(context.layers, owners, strict=True) if owner == self.ranks.rank]
        masks = self.method.prune_block(dataclasses.replace(context, layers=mine)) if mine else {}
        for layer, owner in zip(context.layers, owners, strict=True):
            ours = owner == self.ranks.rank
            device = layer.weight.device
            weight = layer.matrix() if ours else torch.empty(layer.shape, device=device)
            mask = (
                masks[layer.name].to(device, torch.uint8)
                if ours
                else torch.empty(layer.shape, dtype=torch.uint8, device=device)
            )
            self.ranks.broadcast(weight, owner)
            self.ranks.broadcast(mask, owner)
            if not ours:
                layer.write(weight)
                masks[layer.name] = mask.bool()
        for errors in self.ranks.gather(dict(context.errors)):  # refitted layers' errors, from their owners
            context.errors.update(errors)
        return masks

    def _routed_tokens(self, record: RoutingRecord) -> list[int]:
        """How many calibration tokens the router sent to each expert, over every rank."""
        counts = torch.tensor(record.tokens_per_expert(), dtype=torch.float64, device=self.device)
        self.ranks.all_reduce(counts)
        return [int(count) for count in counts.tolist()]

    def _record_masks(
        self,
        index: int,
        sparsity: float,
        masks: dict[str, torch.Tensor],
        errors: dict[str, tuple[float, float]],
        state: Progress,
    ) -> dict[str, torch.Tensor]:
        """Report block ``index``'s layers (with the errors of refitted ones) in ``state``; return their masks
        packed, by layer name."""
        packed = {}
        for layer in self.layers[index]:
            mask = masks.pop(layer.name)
            packed[layer.name] = pack_mask(mask)
            achieved = (layer.matrix() == 0).sum().item() / mask.numel()  # what the weights hold, zeros before too
            error = errors.get(layer.name)
            state.layers.append(LayerReport(layer.name, index, layer.shape, sparsity, achieved, layer.expert, error))
        return packed

    def _resume(self, state: Progress, batches: list[CalibrationBatch] | None) -> list[CalibrationBatch] | None:
        """Restore an interrupted run: masks, the pruned blocks of an in-memory model, the next block's inputs."""
        if self.disk is None:
            self.masks.update(self.work.load_masks(state.next_block))
            for index in range(state.next_block):
                block = self.blocks[index]
                if self.dispatch is not None:
                    self.dispatch.load(block)
                self.work.restore_block(block, index, f"{self.blocks_name}.{index}")
                if self.dispatch is not None:
                    self.dispatch.release(block)
        return self._resumed_batches(state, batches) if self._needs_inputs else batches

    def _resumed_batches(
        self, state: Progress, batches: list[CalibrationBatch] | None
    ) -> list[CalibrationBatch] | None:
        """The saved inputs of the next unfinished block, with the other arguments of the captured ``batches``."""
        if batches is None or state.next_block >= len(self.blocks):
            return batches
        hidden = self.work.load_activations()
        streams = [
            [
                CalibrationBatch(self.activations.keep(h), batch.args, batch.kwargs)
                for h, batch in zip(part, batches, strict=True)
            ]
            for part in (hidden[: len(batches)], hidden[len(batches) :])
            if part
        ]
        if self._keeps_dense_stream:
            self._dense_batches = streams[1]
        return streams[0]

    def _collect(
        self,
        block: nn.Module,
        layers: list[TargetLayer],
        batches: list[CalibrationBatch] | None,
        make: Callable[[TargetLayer, torch.device], LayerStatistic | None],
        outputs: list[torch.Tensor] | None = None,
    ) -> tuple[dict[str, LayerStatistic], dict[str, RoutingRecord]]:
        """Run the calibration batches through ``block``: each linear layer's statistic, and what the router
        of each experts module decided (see `_expert_statistics`); with ``outputs``, the whole block runs and
        each batch's output is appended there (kept where the activations are)."""
        if batches is None or not layers:
            return {}, {}
        linear = [layer for layer in layers if layer.expert is None]
        experts = {
            layer.parameter_name.rpartition(".")[0]: layer.module for layer in layers if layer.expert is not None
        }
        routing = {name: RoutingRecord(module, self.activations.keep) for name, module in experts.items()}
        collector = _StatisticsCollector(linear, lambda layer: make(layer, self.device), routing, outputs is not None)
        try:
            for batch in batches:
                output = collector.run(batch, block, self.device)
                if outputs is not None:
                    outputs.append(self.activations.keep(output))
                self.activations.evict(batch.hidden)
        finally:
            collector.remove()
        self._sum_over_ranks(collector.statistics)
        return collector.statistics, routing

    def _sum_over_ranks(self, statistics: dict[str, LayerStatistic]) -> None:
        """Make each statistic (a shared one once) that of every rank's tokens; a no-op in one process."""
        if self.ranks.distributed:
            for statistic in {id(s): s for s in statistics.values()}.values():
                statistic.sum_over_ranks(self.ranks)

    def _expert_statistics(
        self,
        layers: list[TargetLayer],
        routing: dict[str, RoutingRecord],
        routed: dict[str, list[int]],
        make: Callable[[TargetLayer, torch.device], LayerStatistic | None],
    ) -> Iterator[tuple[list[TargetLayer], dict[str, LayerStatistic]]]:
        """Each expert's target layers with their statistics, one expert at a time, from the routing records
        (no statistics without records); an expert routed (``routed``: over every rank) fewer than
        ``min_expert_tokens`` tokens is calibrated on every token."""
        for (name, expert), experts in group_experts(layers).items():
            record = routing.get(name)
            if record is None:
                yield experts, {}
                continue
            _, down = expert_parameters(record.module)
            statistics = {layer.name: make(layer, self.device) for layer in experts}
            every_token = routed[name][expert] < max(self.config.min_expert_tokens, 1)
            for hidden, inner in record.expert_inputs(expert, self.config.expert_calibration, every_token):
                for layer in experts:
                    inputs = inner if layer.parameter == down else hidden
                    if statistics[layer.name] is not None and inputs.shape[0]:
                        statistics[layer.name].update(inputs)
            statistics = {key: value for key, value in statistics.items() if value is not None}
            self._sum_over_ranks(statistics)
            yield experts, statistics

    def _propagate(self, block: nn.Module, batches: list[CalibrationBatch]) -> list[CalibrationBatch]:
        """The next block's inputs: every batch run through ``block``."""
        outputs = []
        for batch in batches:
            outputs.append(
                CalibrationBatch(self.activations.keep(batch.run(block, self.device)), batch.args, batch.kwargs)
            )
            self.activations.evict(batch.hidden)
        return outputs

    def _block_sparsities(self, batches: list[CalibrationBatch] | None) -> list[float]:
        """The sparsity of every block: uniform, or OWL from a dense statistics pass."""
        if self.config.allocation == "uniform":
            return [self.config.sparsity] * len(self.blocks)
        ratios = []
        bar = tqdm(range(len(self.blocks)), desc="OWL statistics", unit="block", disable=not self.progress)
        for index in bar:
            with self._block(index) as block:
                layers = self.layers[index]
                statistics, routing = self._collect(block, layers, batches, _input_norms)
                routed = {name: self._routed_tokens(record) for name, record in routing.items()}
                for _, expert_statistics in self._expert_statistics(layers, routing, routed, _input_norms):
                    statistics.update(expert_statistics)
                ratios.append(outlier_ratio(layers, statistics, self.config.owl_m) if layers else 0.0)
                if index + 1 < len(self.blocks):
                    batches = self._propagate(block, batches)
        parameters = [sum(layer.shape[0] * layer.shape[1] for layer in layers) for layers in self.layers]
        return owl_sparsities(ratios, parameters, self.config.sparsity, self.config.owl_lambda)
