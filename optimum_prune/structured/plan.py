"""The sizes a structure asks for, checked before any work against a meta-device model of the new config: the
result must be a config that stock transformers builds with exactly the shapes pruning will produce."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from accelerate import init_empty_weights
from torch import nn
from transformers import PretrainedConfig

from ..core.auto import auto_model_class
from ..core.layers import LINEAR_TYPES, TargetLayer, find_decoder_blocks
from ..errors import InputError
from .experts import EXPERTS, expert_count_fields, experts_modules
from .groups import ATTENTION, MLP, ChannelGroup, attention_group, mlp_group
from .spec import Structure

# Config attributes that hold an MLP width, in the spellings of transformers' configs.
_WIDTH_ATTRIBUTES = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size")


@dataclass
class StructurePlan:
    """Units kept per block for each group kind, the number of blocks to remove, and the new config's values."""

    keep: dict[str, int]
    units: dict[str, int]
    remove_blocks: int
    updates: dict[str, object] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        """Original -> new sizes, for the report and the metadata."""
        return {kind: {"original": self.units[kind], "kept": self.keep[kind]} for kind in self.keep}


def text_config(model: nn.Module) -> PretrainedConfig:
    return model.config.get_text_config()


def block_groups(model: nn.Module, layers: list[list[TargetLayer]], kinds: list[str]) -> list[dict[str, ChannelGroup]]:
    """The channel groups of every block; a clear error when a block lacks one that is asked for."""
    config = text_config(model)
    prefix, blocks = find_decoder_blocks(model)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    found = []
    for index, (block, all_layers) in enumerate(zip(blocks, layers, strict=True)):
        groups: dict[str, ChannelGroup] = {}
        block_prefix = f"{prefix}.{index}"
        block_layers = [layer for layer in all_layers if layer.expert is None]
        if MLP in kinds:
            group = mlp_group(block, block_prefix, block_layers, hidden)
            if group is None:
                experts = (
                    " (the channels of fused experts are not pruned structurally)" if all_layers != block_layers else ""
                )
                raise InputError(
                    f"No MLP channels found in {block_prefix} (its target layers: "
                    f"{', '.join(layer.name for layer in block_layers)}): structure mlp= cannot apply here{experts}."
                )
            groups[MLP] = group
        if ATTENTION in kinds:
            group = attention_group(block, block_prefix, block_layers, hidden, heads, kv_heads)
            if group is None and attention_group(
                block, block_prefix, _all_linear(block, block_prefix), hidden, heads, kv_heads
            ):
                targeted = {layer.name for layer in block_layers}
                left_out = [layer.name for layer in _all_linear(block, block_prefix) if layer.name not in targeted]
                raise InputError(
                    f"structure attention= removes KV groups from the query, key, value and output projections "
                    f"together, but targets/ignore leave out {', '.join(left_out)}: drop them from ignore (or from "
                    "the targets), or drop attention=."
                )
            if group is None:
                raise InputError(
                    f"{type(model).__name__} has no separate query, key and value projections with "
                    f"{heads} heads in {block_prefix}: structure attention= cannot apply to it (mlp= and "
                    "layers= can)."
                )
            groups[ATTENTION] = group
        found.append(groups)
    return found


def _all_linear(block: nn.Module, prefix: str) -> list[TargetLayer]:
    """Every linear layer of a block, targeted or not."""
    return [
        TargetLayer(f"{prefix}.{name}", module, -1)
        for name, module in block.named_modules()
        if isinstance(module, LINEAR_TYPES)
    ]


def _kept_channels(width: int, fraction: float, align: int) -> int:
    kept = round(width * (1 - fraction) / align) * align if width >= align else round(width * (1 - fraction))
    return min(max(kept, min(align, width)), width)


def plan_structure(model: nn.Module, structure: Structure, layers: list[list[TargetLayer]]) -> StructurePlan:
    """The plan for ``structure`` on ``model``; raises before any work when the result cannot be built by the
    model's own config class with the shapes pruning produces, naming the nearest setting that can."""
    kinds = [kind for kind in (MLP, ATTENTION) if getattr(structure, kind) > 0]
    groups = block_groups(model, layers, kinds)
    config = text_config(model)
    keep: dict[str, int] = {}
    units: dict[str, int] = {}
    for kind in kinds:
        sizes = {group[kind].units for group in groups}
        if len(sizes) != 1:
            raise InputError(f"The blocks have {kind} groups of different sizes {sorted(sizes)}: not supported.")
        units[kind] = sizes.pop()
    if MLP in kinds:
        keep[MLP] = _kept_channels(units[MLP], structure.mlp, structure.align)
        if keep[MLP] == units[MLP]:
            raise InputError(
                f"structure mlp={structure.mlp} keeps all {units[MLP]} channels once rounded to a multiple of "
                f"align={structure.align}: ask for more, or a smaller align."
            )
    if ATTENTION in kinds:
        keep[ATTENTION] = units[ATTENTION] - round(units[ATTENTION] * structure.attention)
        if units[ATTENTION] == 1:
            raise InputError(
                "structure attention= removes KV groups, and this model has a single one (multi-query attention): "
                "none can be removed; drop attention= and use mlp= or layers=."
            )
        if keep[ATTENTION] in (0, units[ATTENTION]):
            raise InputError(
                f"structure attention={structure.attention} would keep {keep[ATTENTION]} of "
                f"{units[ATTENTION]} KV groups: remove at least one and keep at least one "
                f"(attention={1 / units[ATTENTION]:.3f} removes one)."
            )
    num_blocks = len(layers)
    remove_blocks = round(num_blocks * structure.layers)
    if structure.layers and not 0 < remove_blocks < num_blocks:
        raise InputError(
            f"structure layers={structure.layers} removes {remove_blocks} of {num_blocks} blocks: remove at "
            f"least one ({1 / num_blocks:.3f}) and keep at least one."
        )
    if structure.experts:
        units[EXPERTS], keep[EXPERTS] = _kept_experts(model, structure.experts)
    plan = StructurePlan(keep, units, remove_blocks)
    plan.updates = _config_updates(config, plan, groups[0] if groups else {}, num_blocks)
    _check_buildable(model, plan, groups[0] if groups else {}, structure)
    return plan


def _kept_experts(model: nn.Module, fraction: float) -> tuple[int, int]:
    """The routed experts per mixture-of-experts block, and how many ``fraction`` keeps (checked against the
    experts each token picks and DeepSeek's expert groups)."""
    _, blocks = find_decoder_blocks(model)
    counts = {experts.down_proj.shape[0] for block in blocks for _, experts in experts_modules(block)}
    if len(counts) != 1:
        found = "no fused experts" if not counts else f"blocks with {sorted(counts)} experts"
        raise InputError(f"structure experts= drops routed experts, but {type(model).__name__} has {found}.")
    count = counts.pop()
    kept = count - round(count * fraction)
    config = text_config(model)
    per_token = getattr(config, "num_experts_per_tok", 1) or 1
    groups = getattr(config, "n_group", None) or 1
    valid = [k for k in range(max(per_token, 1), count) if k % groups == 0]
    if kept not in valid:
        nearest = min(valid, key=lambda k: abs(k - kept), default=None)
        hint = f"experts={(count - nearest) / count:.3f} keeps {nearest}" if nearest else "no count can"
        raise InputError(
            f"structure experts={fraction} keeps {kept} of {count} experts, but every token picks {per_token} of "
            f"them{f' from {groups} groups' if groups > 1 else ''} and at least one must go: {hint}."
        )
    return count, kept


def _config_updates(
    config: PretrainedConfig, plan: StructurePlan, groups: dict[str, ChannelGroup], num_blocks: int
) -> dict[str, object]:
    updates: dict[str, object] = {}
    if MLP in plan.keep:
        width = plan.units[MLP]
        names = [name for name in _WIDTH_ATTRIBUTES if getattr(config, name, None) == width]
        if not names and getattr(config, "n_inner", 0) is None and width == 4 * config.hidden_size:
            names = ["n_inner"]  # GPT-2: None means 4 x hidden
        if not names:
            raise InputError(f"{type(config).__name__} has no config field holding the MLP width {width}.")
        updates[names[0]] = plan.keep[MLP]
    if ATTENTION in plan.keep:
        group = groups[ATTENTION]
        heads, groups_count = config.num_attention_heads, plan.units[ATTENTION]
        per_group = heads // groups_count
        updates["num_attention_heads"] = plan.keep[ATTENTION] * per_group
        if hasattr(config, "num_key_value_heads"):
            updates["num_key_value_heads"] = plan.keep[ATTENTION]
        updates["head_dim"] = group.consumer.in_features // heads
    if plan.remove_blocks:
        updates["num_hidden_layers"] = num_blocks - plan.remove_blocks
    if EXPERTS in plan.keep:
        fields = expert_count_fields(config, plan.units[EXPERTS])
        if not fields:
            raise InputError(f"{type(config).__name__} has no config field holding its {plan.units[EXPERTS]} experts.")
        updates.update(dict.fromkeys(fields, plan.keep[EXPERTS]))
    return updates


def new_config(config: PretrainedConfig, updates: dict[str, object], removed_blocks: list[int]) -> PretrainedConfig:
    """``config`` with the new sizes (validated by its own class); per-layer lists lose the removed blocks."""
    values = copy.deepcopy(config.to_dict())
    layers = config.num_hidden_layers
    for name, value in list(values.items()):
        if isinstance(value, list) and len(value) == layers and removed_blocks:
            values[name] = [item for index, item in enumerate(value) if index not in set(removed_blocks)]
    values.update(updates)
    return type(config)(**values)


def apply_new_config(model: nn.Module, updates: dict[str, object], removed_blocks: list[int]) -> None:
    """Write the new sizes into the model's config, validated by its own class (`new_config`)."""
    config = text_config(model)
    for name, value in new_config(config, updates, removed_blocks).to_dict().items():
        if getattr(config, name, None) != value and name != "transformers_version":
            setattr(config, name, value)


def _meta_model(model: nn.Module, plan: StructurePlan) -> nn.Module:
    """A meta-device model of the config the plan writes (refused, naming the nearest valid setting, when the
    config class rejects the new sizes)."""
    config = text_config(model)
    try:
        target = new_config(config, plan.updates, list(range(plan.remove_blocks)))
    except Exception as error:  # transformers raises its own validation errors
        hint = _nearest_attention(config, plan) if ATTENTION in plan.keep else ""
        raise InputError(
            f"{type(config).__name__} cannot hold the pruned sizes {plan.updates}: {error}{hint}"
        ) from error
    whole = target
    if config is not model.config:  # a vision-language model: the new text config inside a copy of its own
        whole = copy.deepcopy(model.config)
        whole.text_config = target
    with init_empty_weights():
        return auto_model_class(whole).from_config(whole)


def kept_parameters(model: nn.Module, plan: StructurePlan) -> int:
    """The parameters of the model the plan makes (a tied weight once), as its saved checkpoint holds them."""
    meta = _meta_model(model, plan)
    tied = set(getattr(meta, "all_tied_weights_keys", None) or {})  # not tied on the meta device: counted once
    return sum(parameter.numel() for name, parameter in meta.named_parameters() if name not in tied)


def _check_buildable(
    model: nn.Module, plan: StructurePlan, groups: dict[str, ChannelGroup], structure: Structure
) -> None:
    """Build the new config and a meta-device model of it; compare the group layers' shapes with the plan."""
    meta = _meta_model(model, plan)
    prefix, _ = find_decoder_blocks(model)
    if EXPERTS in plan.keep:
        _, meta_blocks = find_decoder_blocks(meta)
        sizes = {experts.down_proj.shape[0] for block in meta_blocks for _, experts in experts_modules(block)}
        if sizes != {plan.keep[EXPERTS]}:
            raise InputError(
                f"{type(model).__name__} cannot express structure experts={structure.experts}: a model built from "
                f"the new config has {sorted(sizes)} experts per block, pruning would leave {plan.keep[EXPERTS]}."
            )
    for kind, group in groups.items():
        keep = plan.keep[kind]
        expected = {group.consumer.name: (group.consumer.shape[0], keep * group.columns)}
        expected.update({layer.name: (keep * rows, layer.shape[1]) for layer, rows in group.producers})
        for name, shape in expected.items():
            module = meta.get_submodule(name)
            actual = tuple(module.weight.shape)
            actual = actual[::-1] if not isinstance(module, nn.Linear) else actual
            if actual != shape:
                raise InputError(
                    f"{type(model).__name__} cannot express structure {kind}={getattr(structure, kind)}: its config "
                    f"does not size {name.removeprefix(prefix + '.0.')} from the new values (a model built from "
                    f"them has {actual}, pruning would give {shape}). Use the other kinds of structure."
                )


def _nearest_attention(config: PretrainedConfig, plan: StructurePlan) -> str:
    """The closest number of KV groups the config class accepts, as a hint."""
    total, per_group = plan.units[ATTENTION], config.num_attention_heads // plan.units[ATTENTION]
    valid = []
    for kept in range(1, total):
        updates = {**plan.updates, "num_attention_heads": kept * per_group}
        if "num_key_value_heads" in updates:
            updates["num_key_value_heads"] = kept
        try:
            new_config(config, updates, [])
        except Exception:  # transformers raises its own validation errors: this count is not valid
            continue
        valid.append(kept)
    if not valid:
        return " No number of KV groups is valid for this config class: prune mlp= or layers= instead."
    kept = min(valid, key=lambda value: abs(value - plan.keep[ATTENTION]))
    return f" Nearest valid setting: attention={(total - kept) / total:.3f} (keeps {kept} of {total} KV groups)."
