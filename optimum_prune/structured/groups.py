"""The groups of layers that share removable channels, found from the model (no list of architectures).

An MLP's channels are written by its producers (``gate_proj``/``up_proj``, ``fc1``, ``c_fc``...) and read by
its consumer (``down_proj``, ``fc2``, ``c_proj``...): removing channel ``j`` removes row ``j`` of every producer
and column ``j`` of the consumer. An attention's unit is a KV group: one key/value head and the query heads
that share it, removed from ``q/k/v`` (rows) and the output projection (columns) together.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.layers import TargetLayer

MLP = "mlp"
ATTENTION = "attention"


@dataclass
class ChannelGroup:
    """Layers whose channels are removed together, in units: a unit is ``rows`` rows of each producer and
    ``columns`` columns of the consumer (1 and 1 for an MLP channel; for a KV group, ``heads x head_dim``
    rows of the query projection, ``head_dim`` rows of the key and value projections, and ``heads x head_dim``
    columns of the output projection)."""

    kind: str
    consumer: TargetLayer
    columns: int
    producers: list[tuple[TargetLayer, int]]

    @property
    def units(self) -> int:
        return self.consumer.in_features // self.columns


def _by_parent(layers: list[TargetLayer]) -> dict[str, list[TargetLayer]]:
    parents: dict[str, list[TargetLayer]] = {}
    for layer in layers:
        parents.setdefault(layer.name.rsplit(".", 1)[0], []).append(layer)
    return parents


def _is_attention(block: nn.Module, parent: str, blocks_prefix: str) -> bool:
    """Whether the module holding these layers is an attention (transformers names every one ``*Attention``)."""
    name = parent.removeprefix(blocks_prefix).lstrip(".")
    module = block.get_submodule(name) if name else block
    return "attention" in type(module).__name__.lower()


def mlp_group(block: nn.Module, prefix: str, layers: list[TargetLayer], hidden: int) -> ChannelGroup | None:
    """The MLP of a block: outside the attention, a module whose last layer (the consumer: modules register
    their output projection last) reads a width other than ``hidden``, and the layers writing that width
    from ``hidden`` (the producers)."""
    for parent, members in _by_parent(layers).items():
        consumer = members[-1]
        if _is_attention(block, parent, prefix) or consumer.in_features == hidden:
            continue
        producers = [(layer, 1) for layer in members[:-1] if layer.shape == (consumer.in_features, hidden)]
        if producers:
            return ChannelGroup(MLP, consumer, 1, producers)
    return None


def attention_group(
    block: nn.Module, prefix: str, layers: list[TargetLayer], hidden: int, heads: int, kv_heads: int
) -> ChannelGroup | None:
    """The attention of a block with separate query, key and value projections (``None`` for a fused
    ``qkv`` projection, whose layout differs between architectures); its output projection is registered
    last."""
    for parent, members in _by_parent(layers).items():
        consumer = members[-1]
        if not _is_attention(block, parent, prefix) or consumer.shape[0] != hidden or consumer.in_features % heads:
            continue
        head_dim = consumer.in_features // heads
        per_group = (heads // kv_heads) * head_dim
        rows = {consumer.in_features: per_group, kv_heads * head_dim: head_dim}
        producers = [(layer, rows[layer.shape[0]]) for layer in members[:-1] if layer.shape[0] in rows]
        if len(producers) == 3 and all(layer.in_features == hidden for layer, _ in producers):
            return ChannelGroup(ATTENTION, consumer, per_group, producers)
    return None
