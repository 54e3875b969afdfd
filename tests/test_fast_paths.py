"""The performance paths give the same results as the direct computations they replace."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from test_methods import layer_inputs, reference_sparsegpt
from torch import nn

from optimum_prune.core.layers import find_decoder_blocks, find_target_layers
from optimum_prune.core.masks import NMPattern, lowest_mask, prune_count, row_lowest_mask, split_count
from optimum_prune.core.statistics import Hessian, inverse_hessian_cholesky
from optimum_prune.engine.activations import ActivationStore
from optimum_prune.engine.blockwise import _StatisticsCollector
from optimum_prune.engine.capture import capture_block_inputs
from optimum_prune.methods.sparsegpt import sparsegpt_prune
from optimum_prune.methods.sparsellm import _NUMERIC_STEPS, _descend


@pytest.mark.parametrize("features", [16, 300, 1100])  # one panel, uneven panels, eight panels
def test_hessian_upper_triangle_panels_match_full_product(features):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(tokens, features, generator=generator) for tokens in (70, 130, 1)]
    hessian = Hessian(features, torch.device("cpu"))
    for batch in batches:
        hessian.update(batch)
    x = torch.cat(batches).double()
    matrix = hessian.matrix
    assert torch.equal(matrix, matrix.T)
    torch.testing.assert_close(matrix.double(), 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-5)


def test_lowest_mask_exact_count_with_ties():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 5.0]])
    for count in range(scores.numel() + 1):
        mask = lowest_mask(scores, count)
        assert mask.sum().item() == count
        if 0 < count < scores.numel():
            assert scores[mask].max() <= scores[~mask].min()


@pytest.mark.parametrize(("pattern", "block_size"), [("3:5", 40), ("unstructured", 100), ("16:40", 80)])
def test_sparsegpt_panels_match_reference_on_uneven_shapes(pattern, block_size):
    """Panels of 32 columns that do not divide the block (3:5 uses panels of 30, 16:40 one panel of 40)."""
    weight, inputs = layer_inputs(24, 200, 800, seed=3)
    hessian = 2 * inputs.T @ inputs / len(inputs)
    nm = NMPattern.parse(pattern)
    sparsity = 0.6 if nm is None else nm.sparsity
    pruned = weight.clone()
    mask = sparsegpt_prune(pruned, inverse_hessian_cholesky(hessian, 0.01), sparsity, nm, block_size)
    expected, expected_mask = reference_sparsegpt(weight, hessian, sparsity, nm, block_size)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-5)


def test_statistics_pass_stops_at_last_layer_with_identical_statistics():
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    layers = find_target_layers(model)[0]
    cpu = torch.device("cpu")
    batches = capture_block_inputs(model, blocks, random_ids(12, 16), 4, cpu, ActivationStore(cpu))
    down_calls = []
    handle = blocks[0].mlp.down_proj.register_forward_hook(lambda *args: down_calls.append(1))
    collected = []
    for stop in (True, False):
        collector = _StatisticsCollector(layers, lambda layer: Hessian(layer.in_features, cpu))
        for batch in batches:
            collector.run(batch, blocks[0], cpu)
            if not stop:
                collector._last = None
        collector.remove()
        collected.append(collector.statistics)
    handle.remove()
    assert len(down_calls) == 1 + len(batches)  # computed on the first batch only when stopping, always otherwise
    assert set(collected[0]) == {layer.name for layer in layers}
    for name, statistic in collected[0].items():
        assert torch.equal(statistic.matrix, collected[1][name].matrix), name


def test_row_lowest_mask_exact_counts_with_ties():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    for sparsity in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0):
        mask = row_lowest_mask(scores, sparsity)
        counts = split_count(prune_count(scores.numel(), sparsity), scores.shape[0])
        assert mask.sum(dim=1).tolist() == counts.tolist()
        for row in range(scores.shape[0]):
            if 0 < counts[row] < scores.shape[1]:
                assert scores[row][mask[row]].max() <= scores[row][~mask[row]].min()


@pytest.mark.parametrize("activation", [nn.functional.silu, nn.functional.gelu, torch.sigmoid])
@pytest.mark.parametrize("gated", [False, True])
def test_sparsellm_descent_matches_autograd_of_the_objective(activation, gated):
    generator = torch.Generator().manual_seed(4)
    value, target, hidden = (torch.randn(64, 48, generator=generator) for _ in range(3))
    scale = torch.randn(64, 48, generator=generator) if gated else None
    alpha, gamma = 5.0, 3.0
    expected = value.clone()
    weight = 1.0 if scale is None else scale.pow(2)
    for _ in range(_NUMERIC_STEPS):
        variable = expected.clone().requires_grad_(True)
        produced = activation(variable) if scale is None else activation(variable) * scale
        loss = alpha * (variable - target).pow(2).sum() + gamma * (hidden - produced).pow(2).sum()
        (gradient,) = torch.autograd.grad(loss, variable)
        expected = expected - gradient / (2.0 * (alpha + gamma * 1.25 * weight))
    torch.testing.assert_close(_descend(value, target, hidden, scale, activation, alpha, gamma), expected)
