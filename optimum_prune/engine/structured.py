"""The block loop for structured pruning: the same capture, placement and statistics as `BlockwiseEngine`, but
blocks lose whole blocks, KV groups and MLP channels, so the model gets smaller as it goes.

First, with ``layers``, a dense pass measures each block's Block Influence (``1 - cos(h_in, h_out)`` averaged
over the calibration tokens, ShortGPT) and the blocks that change their input least are removed. Then, block
by block: the attention's output projection sees the calibration inputs (its Gram matrix), KV groups are
removed; then the MLP's consumer sees the inputs of the block with its smaller attention, channels are
removed; the pruned block makes the next block's inputs. The new sizes go into the model's config at the end.

With a `WorkFolder`, every finished block is saved with what it kept (units of each group, experts), and a
resumed run removes the same blocks, gives the finished blocks their new shapes and loads their saved weights.
With a `DiskOffload` (which needs the work folder) each block is read from the checkpoint when it is processed
and emptied again; the output is then assembled from the work folder's blocks, as in an unstructured run.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import PruningConfig
from ..core.layers import TargetLayer, find_target_layers, outside_language_model
from ..core.memory import map_large_allocations, peak_memory
from ..core.statistics import InputGram
from ..methods import PruningMethod
from ..report import LayerReport, PruningReport
from ..structured.experts import EXPERTS, drop_experts, expert_scores, experts_modules
from ..structured.groups import ATTENTION, MLP, ChannelGroup
from ..structured.plan import StructurePlan, apply_new_config, block_groups
from ..structured.prune import prune_group, shrink_group
from .blockwise import BlockwiseEngine
from .capture import CalibrationBatch, capture_block_inputs, loss_after_blocks, outside_blocks_loaded
from .offload import DiskOffload
from .streaming import tied_names
from .work_folder import Progress, WorkFolder

HELD_OUT_EVERY = 8  # every 8th calibration sequence judges whether compensation generalises
LOSS_SEQUENCES = 8  # calibration sequences on which blocks are chosen by loss (whole batches, at least this many)


class StructuredEngine(BlockwiseEngine):
    """Prunes a model structurally with a `StructurePlan` (checked beforehand by `plan_structure`)."""

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig,
        method: PruningMethod,
        plan: StructurePlan,
        device: str | torch.device = "cpu",
        activations_device: str | torch.device | None = None,
        progress: bool = True,
        work_folder: WorkFolder | None = None,
        disk: DiskOffload | None = None,
    ) -> None:
        super().__init__(
            model, config, method, device=device, activations_device=activations_device, progress=progress,
            disk=disk, work_folder=work_folder,
            activations_folder=work_folder.folder if work_folder is not None else None,
        )  # fmt: skip
        self.plan = plan

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor | None) -> PruningReport:
        """Prune every block structurally; the report lists every target layer of the smaller model, measured."""
        start = time.perf_counter()
        map_large_allocations()
        parameters = self._parameter_count()
        batches = None  # magnitude scores without compensation read no activations
        if input_ids is not None:
            with outside_blocks_loaded(self.model, self.blocks, self.disk):
                batches = capture_block_inputs(
                    self.model, self.blocks, input_ids, self.config.batch_size, self.device, self.activations
                )
        state = self.work.load() if self.work is not None else None
        if state is None:
            removal = self._remove_blocks(batches, input_ids) if self.plan.remove_blocks else {"removed": []}
            if self._keeps_dense_stream:  # the dense model's stream through the blocks that stay
                self._dense_batches = batches
            structure = {**removal, "kept": [], "dropped": {}}
            state = Progress(0, [], [], [], 0.0, structure=structure)
        else:
            self._delete_blocks(state.structure["removed"])
        removed = state.structure["removed"]
        self.layers = find_target_layers(self.model, self.config.targets, self.config.ignore)
        groups = block_groups(self.model, self.layers, list(self.plan.keep))
        if state.next_block:
            self._restore(state, groups)
            batches = self._resumed_batches(state, batches)
        bar = tqdm(
            range(state.next_block, len(self.blocks)),
            desc="Structured pruning",
            unit="block",
            initial=state.next_block,
            total=len(self.blocks),
            disable=not self.progress,
        )
        for index in bar:
            batches = self._prune_block_structure(index, groups[index], batches, state)
        apply_new_config(self.model, self.plan.updates, removed)
        structure = {
            **self.plan.describe(),
            "parameters": {"original": parameters, "kept": self._parameter_count()},
        }
        if state.structure["dropped"]:
            structure[EXPERTS]["removed"] = state.structure["dropped"]
        if removed:
            structure["layers"] = {
                "original": len(self.blocks) + len(removed),
                "removed": removed,
                "criterion": self.config.structure.layer_criterion,
            }
            for key in ("block_influence", "removal_order", "loss_after_removal", "dense_loss"):
                if key in state.structure:
                    structure["layers"][key] = state.structure[key]
        return PruningReport(
            method=self.config.method,
            pattern="structured",
            target_sparsity=0.0,
            allocation="uniform",
            layers=state.layers,
            block_seconds=state.block_seconds,
            total_seconds=time.perf_counter() - start,
            peak_memory_bytes=peak_memory(self.device),
            structure=structure,
            vision_parameters=sum(p.numel() for p in outside_language_model(self.model)),
            reconstruction=state.reconstruction or None,
        )

    def _prune_block_structure(
        self, index: int, groups: dict[str, ChannelGroup], batches: list[CalibrationBatch] | None, state: Progress
    ) -> list[CalibrationBatch] | None:
        """Remove block ``index``'s KV groups, experts and MLP channels; record what it kept in ``state`` (and
        the work folder); return the next block's inputs."""
        block_start = time.perf_counter()
        kept: dict = {}
        with self._block(index) as block:
            reconstructs = self.config.reconstruct is not None and batches is not None
            targets = self._dense_targets(block, batches) if reconstructs else None
            if ATTENTION in self.plan.keep:
                kept[ATTENTION] = self._prune_kind(block, groups[ATTENTION], self.plan.keep[ATTENTION], batches)
            if EXPERTS in self.plan.keep:
                kept[EXPERTS], dropped = self._drop_experts(block, self.layers[index], batches)
                state.structure["dropped"].update(dropped)
            if MLP in self.plan.keep:
                kept[MLP] = self._prune_kind(block, groups[MLP], self.plan.keep[MLP], batches)
            layers = find_target_layers(self.model, self.config.targets, self.config.ignore)[index]  # the smaller ones
            if reconstructs:
                self._reconstruct(index, block, layers, batches, targets, state)
                del targets
            if batches is not None and index + 1 < len(self.blocks):
                batches = self._propagate(block, batches)
            state.layers += [  # measured while the block is loaded
                LayerReport(layer.name, index, layer.shape, 0.0, (layer.matrix() == 0).float().mean().item())
                for layer in layers
            ]
            state.structure["kept"].append(kept)
            state.block_seconds.append(time.perf_counter() - block_start)
            state.next_block = index + 1
            if self.work is not None:
                state.elapsed_seconds += state.block_seconds[-1]
                hidden = self._saved_hidden(batches, index)
                self.work.save_block(index, block, f"{self.blocks_name}.{index}", {}, hidden, state)
        return batches

    def _restore(self, state: Progress, groups: list[dict[str, ChannelGroup]]) -> None:
        """Give the finished blocks of an interrupted run the shapes of what they kept, then their weights
        (with disk offload they stay empty: the output is assembled from the work folder)."""
        for index, kept in enumerate(state.structure["kept"]):
            for kind in (ATTENTION, MLP):
                if kind in kept:
                    shrink_group(groups[index][kind], kept[kind])
            for name, experts in kept.get(EXPERTS, {}).items():
                parent = self.model.get_submodule(name.rpartition(".")[0])
                drop_experts(parent, self.model.get_submodule(name), torch.tensor(experts))
            if self.disk is None:
                self.work.restore_block(self.blocks[index], index, f"{self.blocks_name}.{index}")

    def _prune_kind(
        self, block: nn.Module, group: ChannelGroup, keep: int, batches: list[CalibrationBatch] | None
    ) -> list[int]:
        statistics, _ = self._collect(
            block, [group.consumer], batches, lambda layer, device: InputGram(layer.in_features, device, HELD_OUT_EVERY)
        )
        dampening = getattr(self.method.settings, "dampening", 0.01)
        compensate = self.config.structure.compensate
        return prune_group(group, statistics.get(group.consumer.name), self.method, keep, compensate, dampening)

    def _drop_experts(
        self, block: nn.Module, layers: list[TargetLayer], batches: list[CalibrationBatch] | None
    ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Drop each experts module's least contributing experts (`structured.experts`); return the kept and
        the dropped experts by module."""
        _, routing = self._collect(block, layers, batches, lambda layer, device: None)
        kept, dropped = {}, {}
        for name, record in routing.items():
            scores = expert_scores(record)
            keep = scores.argsort(descending=True)[: self.plan.keep[EXPERTS]].sort().values
            parent = next(parent for parent, experts in experts_modules(block) if experts is record.module)
            kept[name] = keep.tolist()
            dropped[name] = sorted(set(range(len(scores))) - set(kept[name]))
            drop_experts(parent, record.module, keep)
        return kept, dropped

    def _remove_blocks(self, batches: list[CalibrationBatch], input_ids: torch.Tensor) -> dict:
        """Choose the blocks to remove by the structure's criterion, delete them, and say what was measured."""
        if self.config.structure.layer_criterion == "loss":
            removal = self._blocks_by_loss(batches, input_ids)
        else:
            removal = self._blocks_by_influence(batches)
        self._delete_blocks(removal["removed"])
        return removal

    def _blocks_by_influence(self, batches: list[CalibrationBatch]) -> dict:
        """The blocks with the lowest Block Influence on the dense model (``1 - cos(h_in, h_out)``)."""
        influence = []
        current = batches
        bar = tqdm(range(len(self.blocks)), desc="Block influence", unit="block", disable=not self.progress)
        for index in bar:
            with self._block(index) as block:
                outputs = self._propagate(block, current)
            similarity = [
                F.cosine_similarity(before.hidden.float(), after.hidden.float(), dim=-1).mean().item()
                for before, after in zip(current, outputs, strict=True)
            ]
            influence.append(1.0 - sum(similarity) / len(similarity))
            current = outputs
        removed = sorted(sorted(range(len(self.blocks)), key=influence.__getitem__)[: self.plan.remove_blocks])
        return {"removed": removed, "block_influence": [round(value, 6) for value in influence]}

    def _blocks_by_loss(self, batches: list[CalibrationBatch], input_ids: torch.Tensor) -> dict:
        """SLEB (Song et al., 2024): remove one block at a time, each time the one whose removal gives the lowest
        calibration loss, measured again after every removal on the first `LOSS_SEQUENCES` calibration
        sequences. Each removal step is one pass over the blocks: the hidden states that skip block ``j`` run
        through the blocks after ``j`` only, every candidate advancing through a block while it is loaded."""
        scoring, count = [], 0
        for batch in batches:
            if count >= LOSS_SEQUENCES:
                break
            scoring.append(batch)
            count += batch.hidden.shape[0]
        ids = input_ids[:count]
        kept, order, losses = list(range(len(self.blocks))), [], []
        bar = tqdm(total=self.plan.remove_blocks, desc="Blocks by loss", unit="block", disable=not self.progress)
        dense_loss = None
        for _ in range(self.plan.remove_blocks):
            base = [batch.hidden for batch in scoring]
            skipping: list[list[torch.Tensor]] = []  # skipping[p]: the hidden states with block kept[p] skipped
            for index in kept:
                with self._block(index) as block:
                    skipping = [self._through(block, scoring, hidden) for hidden in skipping]
                    skipping.append(base)
                    base = self._through(block, scoring, base)
            with loss_after_blocks(self.model, self.blocks, self.device, self.disk, self.dispatch is not None) as loss:
                dense_loss = loss(base, ids) if dense_loss is None else dense_loss
                candidates = [loss(hidden, ids) for hidden in skipping]
            best = min(range(len(kept)), key=candidates.__getitem__)
            order.append(kept.pop(best))
            losses.append(round(candidates[best], 6))
            bar.update()
        bar.close()
        return {
            "removed": sorted(order),
            "removal_order": order,
            "loss_after_removal": losses,
            "dense_loss": round(dense_loss, 6),
        }

    def _through(
        self, block: nn.Module, batches: list[CalibrationBatch], hidden: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``hidden`` (one tensor per batch of ``batches``, whose other arguments it takes) run through ``block``."""
        return [
            CalibrationBatch(states, batch.args, batch.kwargs).run(block, self.device)
            for batch, states in zip(batches, hidden, strict=True)
        ]

    def _parameter_count(self) -> int:
        """The model's parameters, a tied weight once (a disk-offloaded model's meta tensors are not tied)."""
        tied = tied_names(self.model)
        return sum(p.numel() for name, p in self.model.named_parameters() if name not in tied)

    def _delete_blocks(self, removed: list[int]) -> None:
        """Delete the blocks ``removed`` and number the others again."""
        for index in reversed(removed):
            del self.blocks[index]
            del self.checkpoint_blocks[index]
        for index, block in enumerate(self.blocks):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = index
