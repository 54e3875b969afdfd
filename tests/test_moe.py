"""Mixtures of experts: the fused 3-D experts of transformers 5 are pruned like linear layers, each expert from
the tokens routed to it, in the layout its model declares, and the reports count what is in the weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MOE_ARCHITECTURES, killed_at_block, random_ids, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_prune import Pruner, PruningConfig, load_masks, load_pruned
from optimum_prune.core.experts import RoutingRecord
from optimum_prune.core.layers import find_target_layers, is_fused_experts
from optimum_prune.core.masks import unpack_mask
from optimum_prune.export import METADATA_KEY
from optimum_prune.export.masks import Masks
from optimum_prune.recovery import SparsityCallback, check_masks_hold

ARCHITECTURES = sorted(MOE_ARCHITECTURES)


def _experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if is_fused_experts(module)}


def prune(model: nn.Module, method: str, **kwargs) -> Pruner:
    config = PruningConfig(method=method, num_samples=8, seq_len=32, batch_size=4, **kwargs)
    pruner = Pruner.from_pretrained(model, config, progress=False)
    pruner.prune(random_ids(8, 32))
    return pruner


class UnfusedExperts(nn.Module):
    """The reference: one experts module unfused into a ``nn.Linear`` per expert and parameter, with the same
    routing, bias and gating, as llm-compressor unfuses them."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        first = "gate_up_proj" if fused.has_gate else "up_proj"
        self.first = nn.ModuleList(self._linears(fused, first))
        self.down = nn.ModuleList(self._linears(fused, "down_proj"))
        self.gate = fused._apply_gate if fused.has_gate else fused.act_fn

    @staticmethod
    def _linears(fused: nn.Module, name: str) -> list[nn.Linear]:
        linears = []
        for expert, weight in enumerate(getattr(fused, name).detach()):
            matrix = weight.T if fused.is_transposed else weight
            linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=fused.has_bias)
            linear.weight.data.copy_(matrix)
            if fused.has_bias:
                linear.bias.data.copy_(getattr(fused, f"{name}_bias")[expert])
            linears.append(linear)
        return linears

    def forward(self, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden)
        for expert, (first, down) in enumerate(zip(self.first, self.down, strict=True)):
            tokens, slots = (experts == expert).nonzero(as_tuple=True)
            inner = self.gate(first(hidden[tokens]))
            output.index_add_(0, tokens, down(inner) * weights[tokens, slots, None])
        return output


def unfused_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    for name in _experts_modules(reference):
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, UnfusedExperts(reference.get_submodule(name)))
    return reference


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_unfused_reference_computes_the_same_model(architecture):
    """The reference used below is the same function as the fused model."""
    model = tiny_model(architecture)
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(unfused_copy(model)(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_expert_masks_equal_those_of_unfused_linear_experts(architecture, method):
    """Each expert's slice is pruned as its own (out, in) matrix with statistics from the tokens routed to it:
    the same masks as the same model with its experts unfused into nn.Linear modules."""
    model = tiny_model(architecture)
    reference = unfused_copy(model)
    pruner = prune(model, method, sparsity=0.5, min_expert_tokens=0)
    # routers are never pruned; the reference's experts are not fused, so its router-like linear is named
    reference_pruner = prune(reference, method, sparsity=0.5, ignore=["*.shared_expert_gate"])
    masks = pruner.masks
    compared = 0
    for name, module in _experts_modules(model).items():
        unfused = reference.get_submodule(name)
        first = "gate_up_proj" if module.has_gate else "up_proj"
        for parameter, linears in ((first, unfused.first), ("down_proj", unfused.down)):
            for expert in range(len(linears)):
                ours = unpack_mask(masks[f"{name}.{parameter}.{expert}"], linears[expert].weight.shape)
                theirs = unpack_mask(
                    reference_pruner.masks[f"{name}.{'first' if parameter == first else 'down'}.{expert}"],
                    linears[expert].weight.shape,
                )
                assert torch.equal(ours, theirs), f"{name}.{parameter}[{expert}]"
                compared += 1
    assert compared == 8 * len(_experts_modules(model))


@pytest.mark.parametrize(("method", "pattern"), [("magnitude", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "4:8")])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_expert_weights_reach_the_target_in_their_layout(architecture, method, pattern):
    """The zeros are in the 3-D parameters themselves: exactly the target, N:M groups valid along each
    expert's input dimension (gpt-oss stores its experts transposed), routers untouched; the report counts
    them and routers are all that it leaves dense."""
    model = tiny_model(architecture)
    routers = {n: p.clone() for n, p in model.named_parameters() if n.endswith(("gate.weight", "router.weight"))}
    routers |= {n: p.clone() for n, p in model.named_parameters() if "shared_expert_gate" in n}
    pruner = prune(model, method, pattern=pattern, sparsity=0.6 if pattern == "unstructured" else None)
    target = pruner.config.sparsity
    for name, module in _experts_modules(model).items():
        for parameter in ("gate_up_proj", "down_proj"):
            weight = getattr(module, parameter).detach()
            per_expert = (weight == 0).flatten(1).sum(1)  # each expert is its own matrix, rounded alone
            assert (per_expert == round(weight[0].numel() * target)).all(), f"{name}.{parameter}"
            if pattern != "unstructured":
                n, m = map(int, pattern.split(":"))
                matrices = weight.transpose(1, 2) if module.is_transposed else weight  # (experts, out, in)
                groups = (matrices == 0).reshape(weight.shape[0], matrices.shape[1], -1, m).sum(-1)
                assert (groups == m - n).all(), f"{name}.{parameter}"
    for name, value in routers.items():
        assert torch.equal(model.get_parameter(name), value), name
    matrices = [layer.matrix() for block in find_target_layers(model) for layer in block]
    zeros = sum((matrix == 0).sum().item() for matrix in matrices) / sum(matrix.numel() for matrix in matrices)
    assert pruner.report.global_sparsity == pytest.approx(zeros, abs=1e-9)
    assert zeros == pytest.approx(target, abs=1e-3)
    expert_rows = [layer for layer in pruner.report.layers if layer.expert is not None]
    assert len(expert_rows) == 8 * len(_experts_modules(model))
    in_blocks = {n: p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.") and p.dim() >= 2}
    assert pruner.report.left_dense_parameters == sum(v for n, v in in_blocks.items() if n in routers)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_calibration_leaves_the_forward_unchanged(architecture):
    """Recording what the router decides does not change what the model computes, and counts every routed
    token: top_k per token."""
    model = tiny_model(architecture)
    ids = random_ids(2, 16, seed=4)
    with torch.no_grad():
        plain = model(ids).logits
        records = [RoutingRecord(module, lambda tensor: tensor) for module in _experts_modules(model).values()]
        handles = [
            r.module.register_forward_pre_hook(lambda m, a, k, r=r: r.observe(a, k), with_kwargs=True) for r in records
        ]
        hooked = model(ids).logits
        for handle in handles:
            handle.remove()
    assert torch.equal(plain, hooked)
    for record in records:
        assert sum(record.tokens_per_expert()) == 2 * 16 * model.config.num_experts_per_tok


def test_expert_token_counts_and_the_fallback():
    """The report gives each expert's routed tokens; an expert below `min_expert_tokens` is calibrated on every
    token, so a threshold above every count gives the masks of expert_calibration='all'; 'weighted' scales by
    the gate and chooses other masks."""
    runs = {
        key: prune(tiny_model("qwen3_moe"), "sparsegpt", sparsity=0.5, **kwargs)
        for key, kwargs in {
            "routed": {"min_expert_tokens": 0},
            "threshold": {"min_expert_tokens": 10**6},
            "all": {"expert_calibration": "all"},
            "weighted": {"expert_calibration": "weighted", "min_expert_tokens": 0},
        }.items()
    }
    counts = runs["routed"].report.expert_tokens
    assert set(counts) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(sum(tokens) == 8 * 32 * 2 and len(tokens) == 4 for tokens in counts.values())
    experts = [name for name in runs["routed"].masks if ".experts." in name]
    same = lambda a, b: all(torch.equal(runs[a].masks[n], runs[b].masks[n]) for n in experts)  # noqa: E731
    assert same("threshold", "all")
    assert not same("routed", "all") and not same("routed", "weighted")


def test_pruned_experts_save_reload_and_compress(tmp_path):
    """The zeros of 3-D parameters survive save_pretrained, the masks file (3-D masks) and the compressed
    format."""
    model = tiny_model("gpt_oss")
    pruner = prune(model, "wanda", pattern="2:4")
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner.save_pretrained(tmp_path / "dense", save_masks=True)
    pruner.save_pretrained(tmp_path / "compressed", format="compressed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    decompressed = load_pruned(tmp_path / "compressed")
    for loaded in (reloaded, decompressed):
        for name, parameter in loaded.named_parameters():
            assert torch.equal(parameter, expected[name]), name
    masks = load_masks(tmp_path / "dense")
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert masks[gate_up].shape == expected[gate_up].shape
    assert torch.equal(masks[gate_up], expected[gate_up] == 0)


def test_owl_allocates_over_expert_layers():
    pruner = prune(tiny_model("mixtral"), "wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1)
    assert pruner.report.global_sparsity == pytest.approx(0.5, abs=0.01)
    assert len(set(pruner.report.block_sparsities)) == 2


def test_targets_and_ignore_match_the_experts_parameter_names():
    model = tiny_model("qwen3_moe")
    only_down = find_target_layers(model, targets=["down_proj"])
    assert {layer.parameter_name.rsplit(".", 1)[-1] for block in only_down for layer in block} == {"down_proj"}
    no_experts = find_target_layers(model, ignore=["*.experts.*"])
    assert all(layer.expert is None for block in no_experts for layer in block)


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral", "granitemoe", "gpt_oss"])
def test_disk_offload_reads_experts_in_the_saved_layout(architecture, tmp_path):
    """Checkpoints keep experts in their own layout (one tensor per expert for Qwen-MoE and Mixtral, renamed
    3-D tensors for Granite-MoE): offload='disk' assembles each block's fused experts from it, and prunes the
    same weights as the in-memory model."""
    model = tiny_model(architecture)
    model.save_pretrained(tmp_path / "dense")
    in_memory = prune(model, "sparsegpt", sparsity=0.5)
    config = PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=32, batch_size=4)
    pruner = Pruner.from_pretrained(tmp_path / "dense", config, offload="disk", progress=False)
    report = pruner.prune(random_ids(8, 32), output_dir=tmp_path / "pruned")
    assert report.expert_tokens == in_memory.report.expert_tokens
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for name, parameter in reloaded.named_parameters():
        torch.testing.assert_close(parameter, model.get_parameter(name), rtol=0, atol=1e-6, msg=name)


def test_metadata_card_and_table_count_every_expert(tmp_path):
    pruner = prune(tiny_model("qwen3_moe"), "wanda", sparsity=0.5)
    pruner.save_pretrained(tmp_path / "pruned")
    metadata = json.loads((tmp_path / "pruned" / "config.json").read_text())[METADATA_KEY]
    assert metadata["layers"]["model.layers.0.mlp.experts.down_proj"] == [0.5] * 4
    assert metadata["expert_tokens"] == pruner.report.expert_tokens
    table = pruner.report.table()
    assert "model.layers.1.mlp.experts.gate_up_proj[4 experts]       4x64x64" in table
    assert "calibration tokens per expert: min" in table
    assert "`model.layers.0.mlp.experts.down_proj[4 experts]` | 4x64x32" in str(pruner.model_card("user/tiny-moe"))


def test_training_keeps_expert_zeros_and_gradual_pruning_refuses_experts(tmp_path):
    """Fine-tuning with the SparsityCallback keeps every pruned expert weight at zero (its 3-D masks) while the
    kept ones train; gradual pruning, which would choose one mask for all the experts of a tensor, says so."""
    pruner = prune(tiny_model("qwen3_moe"), "wanda", sparsity=0.5)
    masks = Masks.from_pruner(pruner.model, pruner.masks)
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    before = pruner.model.get_parameter(gate_up).detach().clone()
    ids = random_ids(32, 32, seed=7)
    windows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    Trainer(model=pruner.model, args=args, train_dataset=windows, callbacks=[SparsityCallback(masks)]).train()
    check_masks_hold(pruner.model, masks)
    after = pruner.model.get_parameter(gate_up).detach()
    assert (after[masks[gate_up]] == 0).all() and not torch.equal(after, before)
    gradual = Pruner.from_pretrained(tiny_model("qwen3_moe"), PruningConfig(method="magnitude"), progress=False)
    with pytest.raises(ValueError, match="fused mixture-of-experts"):
        gradual.prune_while_training(["some text"] * 8, max_steps=2, distill=False, work_dir=tmp_path / "gradual")


@pytest.mark.parametrize("architecture", ["gpt_oss", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_onnx_export_keeps_the_zeros_of_3d_experts(architecture, tmp_path):
    """The experts export through transformers' batched_mm implementation (the default grouped kernels do not
    convert): the graph computes the model's logits and stores every expert parameter with its zeros."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    from optimum_prune.export.onnx import export_onnx

    model = tiny_model(architecture)
    prune(model, "wanda", pattern="2:4")
    implementation = model.config._experts_implementation
    folder = export_onnx(model, tmp_path / "onnx", with_past=False)
    assert model.config._experts_implementation == implementation
    stored = [numpy_helper.to_array(init) for init in onnx.load(folder / "model.onnx").graph.initializer]
    for name, parameter in model.named_parameters():
        if ".experts." in name and parameter.dim() == 3:
            assert any(np.array_equal(array, parameter.detach().numpy()) for array in stored), name
    ids = random_ids(2, 16, seed=5)
    session = onnxruntime.InferenceSession(folder / "model.onnx")
    feeds = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((2, 16), np.int64),
        "position_ids": np.tile(np.arange(16), (2, 1)),
    }
    logits = session.run(None, feeds)[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(ids).logits.numpy(), atol=2e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dropping_experts_gives_a_smaller_model_stock_transformers_loads(architecture, tmp_path):
    """structure={"experts": 0.5} removes half the routed experts of every MoE block, with their router rows; the
    config gets the new count and the saved folder loads with AutoModelForCausalLM, computing the same logits."""
    model = tiny_model(architecture)
    pruner = prune(model, "wanda", structure={"experts": 0.5})
    experts = pruner.report.structure["experts"]
    assert (experts["original"], experts["kept"]) == (4, 2)
    assert all(len(removed) == 2 for removed in experts["removed"].values())
    pruner.save_pretrained(tmp_path / "smaller")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smaller").eval()
    assert {m.down_proj.shape[0] for m in _experts_modules(reloaded).values()} == {2}
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_experts_that_contribute_least_are_dropped():
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        for module in _experts_modules(model).values():
            module.down_proj[1].zero_()  # expert 1 adds nothing to the output, however often it is picked
    pruner = prune(model, "magnitude", structure={"experts": 0.25, "compensate": False})
    assert all(1 in removed for removed in pruner.report.structure["experts"]["removed"].values())
    with pytest.raises(ValueError, match=r"keeps 1 of 4 experts, but every token picks 2 .* experts=0.500 keeps 2"):
        prune(tiny_model("qwen3_moe"), "wanda", structure={"experts": 0.75})
    with pytest.raises(ValueError, match="has no fused experts"):
        prune(tiny_model("llama"), "wanda", structure={"experts": 0.5})


def test_dropping_experts_then_pruning_the_rest():
    model = tiny_model("qwen3_moe")
    pruner = prune(model, "wanda", structure={"experts": 0.5}, sparsity=0.5)
    gate_up = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    assert gate_up.shape[0] == 2 and (gate_up == 0).float().mean().item() == 0.5
    assert pruner.report.global_sparsity == pytest.approx(0.5, abs=1e-6)


def test_an_interrupted_expert_drop_resumes_to_the_same_model(tmp_path):
    """Killed after the first of two blocks, the rerun drops the saved experts of block 0 again (shapes, router
    rows) and loads its weights, then finishes like an uninterrupted run."""
    from optimum_prune.engine.structured import StructuredEngine

    config = PruningConfig(method="wanda", structure={"experts": 0.5}, num_samples=8, seq_len=32, batch_size=4)
    ids = random_ids(8, 32)

    def run(output, resume=False) -> Pruner:
        pruner = Pruner.from_pretrained(tiny_model("qwen3_moe"), config, progress=False)
        pruner.prune(ids, output_dir=output, resume=resume)
        return pruner

    expected = run(tmp_path / "straight")
    with killed_at_block(StructuredEngine, "_prune_block_structure", 1), pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed.report.structure == expected.report.structure
    for name, tensor in expected.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral"])
def test_dropping_experts_with_disk_offload_writes_the_in_memory_model(architecture, tmp_path):
    model = tiny_model(architecture)
    model.save_pretrained(tmp_path / "dense")
    in_memory = prune(model, "wanda", structure={"experts": 0.5})
    config = PruningConfig(method="wanda", structure={"experts": 0.5}, num_samples=8, seq_len=32, batch_size=4)
    pruner = Pruner.from_pretrained(tmp_path / "dense", config, offload="disk", progress=False)
    report = pruner.prune(random_ids(8, 32), output_dir=tmp_path / "smaller")
    assert report.structure == in_memory.report.structure
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smaller")
    for name, parameter in reloaded.named_parameters():
        torch.testing.assert_close(parameter, model.get_parameter(name), rtol=0, atol=0, msg=name)
