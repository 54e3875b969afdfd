"""What a pruning run did: per-layer sparsity, time per block, peak memory; printable as a table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerReport:
    name: str
    block: int
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float
    expert: int | None = None  # one expert's slice of a fused mixture-of-experts parameter
    refit_error: tuple[float, float] | None = None  # refitted: relative reconstruction error before, after

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        """The report `dataclasses.asdict` wrote to JSON (lists back to tuples)."""
        error = data.get("refit_error")
        return cls(**{**data, "shape": tuple(data["shape"]), "refit_error": tuple(error) if error else None})


@dataclass
class PruningReport:
    method: str
    pattern: str
    target_sparsity: float
    allocation: str
    layers: list[LayerReport] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    peak_memory_bytes: int = 0
    structure: dict[str, Any] | None = None  # structured pruning: original -> kept sizes, parameters, blocks
    left_dense_parameters: int = 0  # matrices inside the blocks that no target layer holds (routers, ignored)
    vision_parameters: int = 0  # a vision-language model's vision tower and projector, left dense
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # experts module -> tokens routed to each
    zero_shot: dict[str, Any] | None = None  # lm-eval tasks, dense beside pruned (evaluation.harness.compare)
    speed: dict[str, Any] | None = None  # tokens/s beside the dense model (evaluation.speed.SpeedReport.to_dict)
    reconstruction: list[dict[str, Any]] | None = None  # per block (engine.reconstruct.BlockReconstruction.to_dict)

    @property
    def global_sparsity(self) -> float:
        """Achieved sparsity over all pruned layers, weighted by their size."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.sparsity * layer.numel for layer in self.layers) / total if total else 0.0

    @property
    def block_sparsities(self) -> list[float]:
        """The target sparsity of every block, in order."""
        targets: dict[int, float] = {}
        for layer in self.layers:
            targets.setdefault(layer.block, layer.target_sparsity)
        return [targets[block] for block in sorted(targets)]

    def rows(self) -> list[tuple[str, int, str, float, float]]:
        """``(name, block, shape, target, achieved)`` per layer; the experts of one fused parameter share a row,
        ``name[N experts]``, with their mean sparsity (they are equal in size)."""
        groups: dict[str, list[LayerReport]] = {}
        for layer in self.layers:
            key = layer.name if layer.expert is None else layer.name.rpartition(".")[0]
            groups.setdefault(key, []).append(layer)
        rows = []
        for name, group in groups.items():
            first = group[0]
            shape = f"{first.shape[0]}x{first.shape[1]}"
            if first.expert is not None:
                name, shape = f"{name}[{len(group)} experts]", f"{len(group)}x{shape}"
            achieved = sum(layer.sparsity for layer in group) / len(group)
            rows.append((name, first.block, shape, first.target_sparsity, achieved))
        return rows

    def _refit_errors(self) -> dict[str, str]:
        """``"before -> after"`` relative reconstruction error of each refitted (non-expert) layer, by name."""
        return {
            layer.name: f"{layer.refit_error[0]:.4f} -> {layer.refit_error[1]:.4f}"
            for layer in self.layers
            if layer.refit_error is not None and layer.expert is None
        }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["global_sparsity"] = self.global_sparsity
        return data

    def table(self) -> str:
        """The per-layer table (the experts of a fused parameter on one line) followed by a summary line."""
        rows = self.rows()
        width = max([len("layer"), *(len(row[0]) for row in rows)])
        errors = self._refit_errors()
        error_header = f"  {'refit error':>17}" if errors else ""
        lines = [f"{'layer':<{width}}  {'shape':>12}  {'target':>7}  {'achieved':>8}  {'block s':>8}{error_header}"]
        for name, block, shape, target, achieved in rows:
            timed = block < len(self.block_seconds)  # gradual pruning has no per-block time
            seconds = f"{self.block_seconds[block]:.2f}" if timed else "-"
            error = f"  {errors[name]:>17}" if name in errors else ("  " + " " * 17 if errors else "")
            lines.append(f"{name:<{width}}  {shape:>12}  {target:>7.3f}  {achieved:>8.4f}  {seconds:>8}{error}")
        if self.structure is not None:
            lines.append(_structure_line(self.structure))
        lines.append(
            f"{self.method} {self.pattern} ({self.allocation}): global sparsity {self.global_sparsity:.4f} over "
            f"{len(self.layers)} layers, {self.total_seconds:.1f} s, peak memory {self.peak_memory_bytes / 2**30:.2f} GiB"
        )
        refitted = [layer.refit_error for layer in self.layers if layer.refit_error is not None]
        if refitted:
            before, after = (sum(errors) / len(refitted) for errors in zip(*refitted, strict=True))
            lines.append(
                f"refit: {len(refitted)} of {len(self.layers)} layers, mean relative reconstruction error "
                f"{before:.4f} -> {after:.4f} ({(after - before) / before:+.1%})"
                if before
                else "refit: no error to lower"
            )
        if self.reconstruction:
            lines.append(_reconstruction_line(self.reconstruction))
        if self.left_dense_parameters:
            lines.append(f"left dense inside the blocks (not target layers): {self.left_dense_parameters:,} parameters")
        if self.vision_parameters:
            lines.append(
                f"left dense outside the language model: {self.vision_parameters:,} parameters of the vision tower "
                "and projector (only the language model's blocks are pruned)"
            )
        if self.zero_shot:
            lines.append(comparison_table(self.zero_shot["rows"]))
        if self.expert_tokens:
            counts = sorted(count for tokens in self.expert_tokens.values() for count in tokens)
            lines.append(
                f"calibration tokens per expert: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]} "
                f"over {len(counts)} experts ({sum(c == 0 for c in counts)} received none)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _reconstruction_line(blocks: list[dict[str, Any]]) -> str:
    """``reconstruction: 28 of 30 blocks kept their training, held-out error 0.412 -> 0.251 (mean), 612.3 s;
    kept back: 3, 17``."""
    kept = [block for block in blocks if block["kept"]]
    before = sum(block["held_out_before"] for block in blocks) / len(blocks)
    after = sum(block["held_out_after" if block["kept"] else "held_out_before"] for block in blocks) / len(blocks)
    back = [str(block["block"]) for block in blocks if not block["kept"]]
    return (
        f"reconstruction: {len(kept)} of {len(blocks)} blocks kept their training, held-out error per channel "
        f"{before:.4f} -> {after:.4f} (mean over blocks), {sum(block['seconds'] for block in blocks):.1f} s"
        + (f"; left as pruned (held-out error did not fall): {', '.join(back)}" if back else "")
    )


def _structure_line(structure: dict[str, Any]) -> str:
    """``structured: mlp 1536 -> 1152 channels, attention 3 -> 2 KV groups, 30 -> 27 blocks; 134.5M -> 110.2M
    parameters``."""
    parts = []
    units = {"mlp": "channels", "attention": "KV groups", "experts": "experts"}
    for kind, unit in units.items():
        if kind in structure:
            parts.append(f"{kind} {structure[kind]['original']} -> {structure[kind]['kept']} {unit}")
    if "layers" in structure:
        original = structure["layers"]["original"]
        parts.append(f"{original} -> {original - len(structure['layers']['removed'])} blocks")
    parameters = structure["parameters"]
    line = (
        f"structured: {', '.join(parts)}; {parameters['original'] / 1e6:.2f}M -> {parameters['kept'] / 1e6:.2f}M "
        "parameters"
    )
    if "budget" in structure:
        budget = structure["budget"]
        tried = "; ".join(
            f"{candidate['structure']}: {candidate['parameters'] / 1e6:.2f}M, loss {candidate['loss']:.4f}"
            for candidate in budget["candidates"]
        )
        line += f"\nbudget {budget['budget']}: chose {budget['chosen']} among {tried}"
    layers = structure.get("layers", {})
    if "removal_order" in layers:
        removals = zip(layers["removal_order"], layers["loss_after_removal"], strict=True)
        steps = ", ".join(f"{block} -> {loss:.4f}" for block, loss in removals)
        line += f"\nblocks removed by calibration loss (dense {layers['dense_loss']:.4f}), in order: {steps}"
    elif "block_influence" in layers:
        line += f"\nblocks removed by Block Influence (the least influential): {', '.join(map(str, layers['removed']))}"
    return line


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """``task  metric  dense  pruned  delta`` (values with their standard errors), as printed by the CLI."""
    lines = [f"{'task':<24} {'metric':<10} {'dense':>16} {'pruned':>16} {'delta':>8}"]
    for row in rows:
        dense = format_score(row.get("dense_value"), row.get("dense_stderr"))
        pruned = format_score(row["pruned_value"], row["pruned_stderr"])
        delta = f"{row['pruned_value'] - row['dense_value']:+.4f}" if "dense_value" in row else "-"
        lines.append(f"{row['task']:<24} {row['metric']:<10} {dense:>16} {pruned:>16} {delta:>8}")
    return "\n".join(lines)


def format_score(value: float | None, stderr: float | None) -> str:
    """``0.4123 ± 0.0110`` (``-`` for no value)."""
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
