"""SparseLLM: joint pruning of the feed-forward chain beats layer-wise SparseGPT, hits the exact sparsity,
converges, and runs on every architecture (falling back to SparseGPT where no chain is found)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ARCHITECTURES, random_ids, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig
from optimum_prune.core.layers import TargetLayer
from optimum_prune.core.masks import NMPattern, prune_count
from optimum_prune.core.statistics import inverse_hessian_cholesky
from optimum_prune.engine.blockwise import BlockwiseEngine
from optimum_prune.methods import get_method
from optimum_prune.methods.sparsegpt import sparsegpt_prune
from optimum_prune.methods.sparsellm import FeedForwardChain, SparseLLMPruning, sparsellm_prune
from optimum_prune.report import PruningReport

HIDDEN, INTERMEDIATE, TOKENS = 32, 64, 1024


def correlated_inputs(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(HIDDEN, HIDDEN, generator=generator) / HIDDEN**0.5
    return torch.randn(TOKENS, HIDDEN, generator=generator) @ mixing + 0.2 * torch.randn(
        TOKENS, HIDDEN, generator=generator
    )


def make_chain(gated: bool, seed: int = 1, activation: nn.Module | None = None) -> tuple[FeedForwardChain, nn.Module]:
    torch.manual_seed(seed)
    up, output = nn.Linear(HIDDEN, INTERMEDIATE), nn.Linear(INTERMEDIATE, HIDDEN)
    gate = nn.Linear(HIDDEN, INTERMEDIATE, bias=False) if gated else None
    activation = activation or (nn.SiLU() if gated else nn.ReLU())
    chain = FeedForwardChain(
        TargetLayer("mlp.up", up, 0),
        TargetLayer("mlp.down", output, 0),
        activation,
        TargetLayer("mlp.gate", gate, 0) if gated else None,
    )
    return chain, nn.ModuleList([m for m in (gate, up, output) if m is not None])


@torch.no_grad()
def forward(chain: FeedForwardChain, x: torch.Tensor) -> torch.Tensor:
    gate = chain.gate.module(x) if chain.gate is not None else None
    return chain.output.module(chain.hidden(chain.up.module(x), gate))


@torch.no_grad()
def relative_error(chain: FeedForwardChain, x: torch.Tensor, target: torch.Tensor) -> float:
    return float((forward(chain, x) - target).pow(2).sum() / target.pow(2).sum())


@torch.no_grad()
def sparsegpt_baseline(chain: FeedForwardChain, x: torch.Tensor, sparsity: float) -> None:
    """Layer-wise SparseGPT with the dense block's Hessians, as the engine runs it."""
    gate = chain.gate.module(x) if chain.gate is not None else None
    hidden = chain.hidden(chain.up.module(x), gate)
    for layer, inputs in [(chain.gate, x), (chain.up, x), (chain.output, hidden)]:
        if layer is None:
            continue
        weight = layer.matrix()
        sparsegpt_prune(weight, inverse_hessian_cholesky(inputs.T @ inputs, 0.01), sparsity, None, 128)
        layer.write(weight)


def run_sparsellm(
    chain: FeedForwardChain, x: torch.Tensor, sparsity: float, iterations: int, pattern=None, chunk: int = 512
):
    with torch.no_grad():
        gate = chain.gate.module(x) if chain.gate is not None else None
        hidden = chain.hidden(chain.up.module(x), gate)
    return sparsellm_prune(
        chain,
        list(x.split(chunk)),
        list(hidden.split(chunk)),
        sparsity,
        pattern,
        iterations=iterations,
        alpha=5.0,
        beta=5.0,
        gamma=5.0,
    )


@pytest.mark.parametrize(
    ("gated", "activation"),
    [(False, None), (True, None), (False, nn.GELU(approximate="tanh"))],
    ids=["relu", "gated-silu", "gelu-numeric"],
)
def test_beats_sparsegpt_at_70_percent_with_exact_sparsity(gated, activation):
    x = correlated_inputs()
    chain, _ = make_chain(gated, activation=activation)
    target = forward(chain, x)
    baseline, _ = make_chain(gated, activation=activation)
    sparsegpt_baseline(baseline, x, 0.7)
    sparsegpt_error = relative_error(baseline, x, target)

    result = run_sparsellm(chain, x, 0.7, iterations=4)
    sparsellm_error = relative_error(chain, x, target)

    assert sparsellm_error < 0.95 * sparsegpt_error, (sparsellm_error, sparsegpt_error)
    assert sparsellm_error == pytest.approx(min(result.errors), rel=1e-4)
    for layer in chain.layers:
        mask = result.masks[layer.name]
        assert int(mask.sum()) == prune_count(mask.numel(), 0.7)
        assert torch.equal(layer.matrix() == 0, mask)  # zeros exactly where the mask says


def test_error_non_increasing_over_iterations():
    x = correlated_inputs(seed=3)
    chain, _ = make_chain(gated=False, seed=4)
    errors = run_sparsellm(chain, x, 0.7, iterations=5).errors
    assert len(errors) == 5
    assert all(later <= earlier * (1 + 1e-4) for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.8 * errors[0]


def test_iterate_is_chosen_on_held_out_chunks():
    x = correlated_inputs(seed=5)  # 8 chunks of 128 tokens: the last one is held out
    chain, _ = make_chain(gated=True, seed=6)
    target = forward(chain, x)
    result = run_sparsellm(chain, x, 0.7, iterations=4, chunk=128)
    assert len(result.errors) == len(result.held_out_errors) == 4
    assert result.chosen == min(range(4), key=result.held_out_errors.__getitem__)
    held = slice(7 * 128, None)
    assert relative_error(chain, x[held], target[held]) == pytest.approx(
        result.held_out_errors[result.chosen], rel=1e-4
    )


def test_sparsegpt_on_every_token_when_no_refit_does_better_on_held_out_chunks():
    x = correlated_inputs(seed=5)
    chain, _ = make_chain(gated=True, seed=6)
    target = forward(chain, x)
    baseline, _ = make_chain(gated=True, seed=6)
    sparsegpt_baseline(baseline, x, 0.7)
    result = run_sparsellm(chain, x, 0.7, iterations=1, chunk=128)
    assert result.chosen == 0
    assert relative_error(chain, x, target) == pytest.approx(relative_error(baseline, x, target), rel=1e-3)


def test_nm_pattern_holds_for_every_chain_layer():
    x = correlated_inputs()
    chain, _ = make_chain(gated=True)
    result = run_sparsellm(chain, x, 0.5, iterations=2, pattern=NMPattern(2, 4))
    for layer in chain.layers:
        groups = result.masks[layer.name].reshape(layer.shape[0], -1, 4)
        assert bool((groups.sum(dim=2) == 2).all())


def prune_tiny(architecture: str, **overrides) -> tuple[BlockwiseEngine, PruningReport, SparseLLMPruning]:
    config = PruningConfig(
        method="sparsellm",
        sparsity=0.7,
        settings={"iterations": 2},
        num_samples=4,
        seq_len=16,
        batch_size=4,
        **overrides,
    )
    method = get_method(config.method, config.settings)
    engine = BlockwiseEngine(tiny_model(architecture), config, method, progress=False)
    return engine, engine.run(random_ids(4, 16)), method


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_runs_on_every_architecture(architecture):
    engine, report, method = prune_tiny(architecture)
    # The feed-forward chain of every block was found and optimised jointly.
    assert sorted(method.errors) == [0, 1]
    for layer in report.layers:
        numel = layer.shape[0] * layer.shape[1]
        assert round(layer.sparsity * numel) == prune_count(numel, 0.7), layer.name
    output = engine.model(input_ids=random_ids(1, 8)).logits
    assert torch.isfinite(output).all()


def test_falls_back_to_sparsegpt_without_a_chain(caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_prune.methods.sparsellm"):
        _, report, method = prune_tiny("llama", ignore=["*down_proj"])
    assert method.errors == {}
    assert "no feed-forward chain" in caplog.text
    assert not any(layer.name.endswith("down_proj") for layer in report.layers)
    assert report.global_sparsity == pytest.approx(0.7, abs=1e-3)


def test_owl_allocation_with_sparsellm():
    _, report, method = prune_tiny("opt", allocation="owl", owl_lambda=0.05)
    blocks = report.block_sparsities
    assert sorted(method.errors) == [0, 1]
    assert max(blocks) - min(blocks) == pytest.approx(0.1, abs=1e-9)
    assert report.global_sparsity == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma"])
def test_penalties_must_be_positive(name):
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        PruningConfig(method="sparsellm", settings={name: 0.0})


def test_disk_offload_matches_in_memory_run(tmp_path):
    source = tmp_path / "source"
    tiny_model("qwen2").save_pretrained(source)
    config = dict(method="sparsellm", sparsity=0.7, settings={"iterations": 2}, num_samples=4, seq_len=16, batch_size=4)
    ids = random_ids(4, 16)
    memory = Pruner.from_pretrained(source, PruningConfig(**config), device="cpu", progress=False)
    memory.prune(ids)
    memory.save_pretrained(tmp_path / "memory")
    disk = Pruner.from_pretrained(source, PruningConfig(**config), device="cpu", offload="disk", progress=False)
    disk.prune(ids, output_dir=tmp_path / "disk")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    actual = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
