"""OWL: block sparsities average to the target, stay within +-lambda, follow the outlier ratios, and the pruned
model reaches the target globally, for every method and architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, random_ids, tiny_model
from torch import nn

from optimum_prune import PruningConfig
from optimum_prune.allocation import outlier_ratio, owl_sparsities
from optimum_prune.core.layers import TargetLayer, find_target_layers
from optimum_prune.core.statistics import InputNorms
from optimum_prune.engine.blockwise import BlockwiseEngine
from optimum_prune.export import build_metadata
from optimum_prune.methods import get_method
from optimum_prune.report import PruningReport

RATIOS = [0.010, 0.052, 0.021, 0.033, 0.004]
PARAMETERS = [10, 20, 30, 40, 25]


def weighted_mean(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def test_mean_is_the_target_and_every_block_within_lambda():
    sparsities = owl_sparsities(RATIOS, PARAMETERS, 0.7, 0.08)
    assert weighted_mean(sparsities, PARAMETERS) == pytest.approx(0.7, abs=1e-12)
    assert all(0.62 - 1e-12 <= s <= 0.78 + 1e-12 for s in sparsities)
    # The farthest block sits exactly at the edge of the band.
    assert max(abs(s - 0.7) for s in sparsities) == pytest.approx(0.08, abs=1e-12)


def test_more_outliers_means_lower_sparsity():
    sparsities = owl_sparsities(RATIOS, PARAMETERS, 0.6, 0.1)
    by_ratio = [s for _, s in sorted(zip(RATIOS, sparsities, strict=True))]
    assert all(later < earlier for earlier, later in zip(by_ratio, by_ratio[1:], strict=False))


def test_symmetric_ratios_match_the_reference_allocation():
    # The OWL reference maps the outlier ratios linearly onto [S - lambda, S + lambda] around the mean;
    # for ratios symmetric about their mean both agree exactly.
    assert owl_sparsities([0.0, 0.01, 0.02], [5, 5, 5], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4], abs=1e-12)


def test_equal_ratios_give_uniform_sparsity():
    assert owl_sparsities([0.02, 0.02, 0.02], [1, 2, 3], 0.7, 0.08) == pytest.approx([0.7] * 3)


def test_outlier_ratio_counts_scores_above_m_times_the_block_mean():
    first, second = nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        first.weight.fill_(1.0)
        second.weight.fill_(1.0)
        first.weight[0, 0] = 100.0
        second.weight[1, 3] = -8.0
    layers = [TargetLayer("a", first, 0), TargetLayer("b", second, 0)]
    statistics = {name: InputNorms(4, torch.device("cpu")) for name in ("a", "b")}
    for statistic in statistics.values():
        statistic.update(torch.ones(4, 4))  # ||X_j|| = 2 for every input
    # Scores: 2 everywhere except 200 and 16; mean = (18 * 2 + 200 + 16) / 20 = 12.6.
    assert outlier_ratio(layers, statistics, m=1.0) == pytest.approx(2 / 20)  # 200 and 16 > 12.6
    assert outlier_ratio(layers, statistics, m=5.0) == pytest.approx(1 / 20)  # only 200 > 63
    assert outlier_ratio(layers, statistics, m=20.0) == 0.0


def test_owl_with_nm_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="unstructured"):
        PruningConfig(method="wanda", pattern="2:4", allocation="owl")


def add_outliers(model: nn.Module, block: int) -> None:
    """Scale every 40th weight of the block's layers by 40: Wanda-score outliers."""
    with torch.no_grad():
        for layer in find_target_layers(model)[block]:
            layer.module.weight.view(-1)[::40] *= 40.0


def prune_with_owl(architecture: str, method: str, outlier_block: int) -> tuple[PruningReport, dict]:
    model = tiny_model(architecture)
    add_outliers(model, outlier_block)  # the last block: earlier ones would also change its inputs
    config = PruningConfig(
        method=method,
        sparsity=0.6,
        allocation="owl",
        owl_lambda=0.1,
        settings={"iterations": 2} if method == "sparsellm" else None,
        num_samples=4,
        seq_len=16,
        batch_size=4,
    )
    engine = BlockwiseEngine(model, config, get_method(config.method, config.settings), progress=False)
    report = engine.run(random_ids(4, 16))
    return report, build_metadata(config, report)


def assert_global_target(report: PruningReport, target: float) -> None:
    pruned = sum(layer.sparsity * layer.numel for layer in report.layers)
    total = sum(layer.numel for layer in report.layers)
    # Each layer rounds its own count: the model is within half a weight per layer of the target.
    assert abs(pruned - target * total) <= 0.5 * len(report.layers) + 1e-6


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparsellm"])
def test_every_method_spares_the_block_with_outliers(method):
    report, metadata = prune_with_owl("llama", method, outlier_block=1)
    assert report.block_sparsities == pytest.approx([0.7, 0.5], abs=1e-9)
    assert_global_target(report, 0.6)
    for layer in report.layers:
        assert layer.target_sparsity == report.block_sparsities[layer.block]
        assert layer.sparsity == pytest.approx(layer.target_sparsity, abs=1.0 / layer.numel)
    assert metadata["allocation"] == "owl"
    assert metadata["block_sparsity"] == pytest.approx(report.block_sparsities, abs=1e-6)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_architecture(architecture):
    report, _ = prune_with_owl(architecture, "wanda", outlier_block=1)
    assert report.block_sparsities == pytest.approx([0.7, 0.5], abs=1e-9)
    assert_global_target(report, 0.6)
