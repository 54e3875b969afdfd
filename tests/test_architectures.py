"""Every supported architecture, pruned end to end on tiny random-init models (see conftest.ARCHITECTURES)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHITECTURES, random_ids, tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig
from optimum_prune.core.layers import find_decoder_blocks, find_target_layers
from optimum_prune.core.masks import unpack_mask
from optimum_prune.core.statistics import Hessian
from optimum_prune.engine.activations import ActivationStore
from optimum_prune.engine.blockwise import _StatisticsCollector
from optimum_prune.engine.capture import capture_block_inputs
from optimum_prune.export import METADATA_KEY

# Each method once, unstructured and both N:M patterns covered (SparseGPT unstructured: bf16 and targets tests).
RUNS = [("magnitude", "unstructured", 0.6), ("wanda", "2:4", None), ("sparsegpt", "4:8", None)]


def prune_tiny(
    architecture: str, method: str, pattern: str = "unstructured", sparsity: float | None = None, **kwargs
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Pruner]:
    """Prune a tiny model; return it, a copy of its state dict before pruning, and the pruner."""
    model = tiny_model(architecture)
    dtype = kwargs.pop("dtype", None)
    if dtype is not None:
        model = model.to(dtype)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity, batch_size=4, **kwargs)
    pruner = Pruner.from_pretrained(model, config, device="cpu", progress=False)
    pruner.prune(random_ids(8, 32))
    return model, before, pruner


def check_layers(model, pruner: Pruner, sparsity: float, pattern: str) -> list[str]:
    """Every target layer holds exactly the requested zeros (and N:M groups); return the pruned names."""
    names = []
    for layer in (layer for block in find_target_layers(model) for layer in block):
        matrix = layer.matrix()  # (out, in), GPT-2 Conv1D transposed back
        zeros = matrix == 0
        assert zeros.sum().item() == round(matrix.numel() * sparsity), layer.name
        assert torch.equal(unpack_mask(pruner.masks[layer.name], matrix.shape), zeros), layer.name
        if pattern != "unstructured":
            n, m = map(int, pattern.split(":"))
            assert (zeros.view(matrix.shape[0], -1, m).sum(dim=2) == m - n).all(), layer.name
        names.append(layer.name)
    return names


@pytest.mark.parametrize(("method", "pattern", "sparsity"), RUNS)
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_prune_every_architecture(architecture, method, pattern, sparsity):
    model, before, pruner = prune_tiny(architecture, method, pattern, sparsity)
    target = pruner.config.sparsity
    names = check_layers(model, pruner, target, pattern)
    assert [layer.name for layer in pruner.report.layers] == names
    assert pruner.report.global_sparsity == pytest.approx(target, abs=1e-3)
    pruned = {f"{name}.weight" for name in names}
    for name, tensor in model.state_dict().items():
        if name not in pruned:  # embeddings, lm_head, norms, biases: untouched
            assert torch.equal(tensor, before[name]), name
    logits = model(random_ids(2, 16, seed=1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_saved_folder_reloads_with_same_logits(architecture, tmp_path):
    model, _, pruner = prune_tiny(architecture, "wanda", sparsity=0.5)
    pruner.save_pretrained(tmp_path / "pruned")
    metadata = json.loads((tmp_path / "pruned" / "config.json").read_text())[METADATA_KEY]
    assert metadata["method"] == "wanda" and metadata["target_sparsity"] == 0.5
    assert set(metadata["layers"]) == {layer.name for layer in pruner.report.layers}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = random_ids(2, 16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    check_layers(reloaded, pruner, 0.5, "unstructured")


def test_targets_and_ignore_select_layers():
    model, before, pruner = prune_tiny(
        "llama", "sparsegpt", sparsity=0.5, targets=["mlp.*"], ignore=["model.layers.1.mlp.down_proj"]
    )
    pruned = [layer.name for layer in pruner.report.layers]
    assert pruned == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    for name, tensor in model.state_dict().items():
        if name.removesuffix(".weight") in pruned:
            assert (tensor == 0).float().mean().item() == 0.5, name
        else:
            assert torch.equal(tensor, before[name]), name


def test_ignore_by_trailing_name():
    _, _, pruner = prune_tiny("opt", "wanda", sparsity=0.5, ignore=["q_proj", "k_proj", "fc2"])
    names = {layer.name.split(".", 4)[-1] for layer in pruner.report.layers}
    assert names == {"self_attn.v_proj", "self_attn.out_proj", "fc1"}


@pytest.mark.parametrize(
    ("method", "dtype"),
    [
        ("magnitude", torch.bfloat16),
        ("wanda", torch.bfloat16),
        ("sparsegpt", torch.bfloat16),
        ("sparsegpt", torch.float16),
    ],
)
def test_half_precision_models(method, dtype):
    """Statistics and updates run in float32; the weights stay in the model dtype with exact sparsity."""
    model, _, pruner = prune_tiny("llama", method, sparsity=0.5, dtype=dtype)
    assert all(parameter.dtype == dtype for parameter in model.parameters())
    check_layers(model, pruner, 0.5, "unstructured")
    logits = model(random_ids(2, 16, seed=3)).logits
    assert torch.isfinite(logits).all()


def test_half_precision_close_to_float32():
    """A bf16 model pruned with SparseGPT picks nearly the same masks as its float32 copy."""
    model32, _, pruner32 = prune_tiny("llama", "sparsegpt", sparsity=0.5)
    model16, _, pruner16 = prune_tiny("llama", "sparsegpt", sparsity=0.5, dtype=torch.bfloat16)
    for name, packed in pruner32.masks.items():
        agreement = (packed == pruner16.masks[name]).float().mean().item()
        assert agreement > 0.5, name  # bytes of 8 mask bits: identical in most places


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@torch.no_grad()
def test_each_layer_statistic_comes_from_its_own_inputs(architecture):
    """Layers share a Hessian only when fed the same tensor (q/k/v; Phi's parallel attention and MLP), never
    because a later activation reused a freed one's memory (GPT-2's ln_2 output, GPT-NeoX's second norm)."""
    model = tiny_model(architecture)
    for parameter in model.parameters():
        if parameter.dim() == 1:  # distinct norm weights, so that every norm has its own output
            parameter.add_(0.2 * torch.randn_like(parameter))
    cpu = torch.device("cpu")
    _, blocks = find_decoder_blocks(model)
    layers = find_target_layers(model)[0]
    batches = capture_block_inputs(model, blocks, random_ids(8, 32), 4, cpu, ActivationStore(cpu))
    seen: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = [  # registered first, so they see every call the collector's own pre-hooks see
        layer.module.register_forward_pre_hook(lambda module, args, name=layer.name: seen[name].append(args[0].clone()))
        for layer in layers
    ]
    collector = _StatisticsCollector(layers, lambda layer: Hessian(layer.in_features, cpu))
    try:
        for batch in batches:
            collector.run(batch, blocks[0], cpu)
    finally:
        collector.remove()
        for handle in handles:
            handle.remove()
    for layer in layers:
        inputs = torch.cat(seen[layer.name]).reshape(-1, layer.in_features)
        expected = 2 * inputs.T @ inputs / len(inputs)
        torch.testing.assert_close(collector.statistics[layer.name].matrix, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_layers_fed_the_same_tensor_share_one_statistic():
    model = tiny_model("llama")
    cpu = torch.device("cpu")
    _, blocks = find_decoder_blocks(model)
    layers = find_target_layers(model)[0]
    batches = capture_block_inputs(model, blocks, random_ids(8, 32), 4, cpu, ActivationStore(cpu))
    collector = _StatisticsCollector(layers, lambda layer: Hessian(layer.in_features, cpu))
    try:
        for batch in batches:
            collector.run(batch, blocks[0], cpu)
    finally:
        collector.remove()
    groups: dict[int, list[str]] = {}
    for name, statistic in collector.statistics.items():
        groups.setdefault(id(statistic), []).append(name.rsplit(".", 1)[-1])
    assert sorted(groups.values()) == [
        ["down_proj"],
        ["gate_proj", "up_proj"],
        ["o_proj"],
        ["q_proj", "k_proj", "v_proj"],
    ]
