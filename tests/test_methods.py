"""Single-layer behaviour of the pruning methods, checked against direct computations from the papers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimum_prune import PruningConfig
from optimum_prune.core.layers import TargetLayer
from optimum_prune.core.masks import NMPattern
from optimum_prune.core.statistics import Hessian, InputNorms, inverse_hessian_cholesky
from optimum_prune.methods import METHODS, get_method

PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)]


def layer_inputs(rows: int, cols: int, tokens: int, seed: int, outliers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs where a few input channels are 20-50x larger, as in LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) / cols**0.5
    mixing = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=generator) / cols**0.5
    inputs = torch.randn(tokens, cols, generator=generator) @ mixing
    channels = torch.randperm(cols, generator=generator)[:outliers]
    inputs[:, channels] *= 20 + 30 * torch.rand(outliers, generator=generator)
    return weight, inputs


def prune(
    method: str, weight: torch.Tensor, inputs: torch.Tensor, pattern: str = "unstructured", sparsity=None, **settings
):
    """Prune one ``(out, in)`` weight with ``method`` (and its ``settings``) calibrated on ``inputs``; return
    (pruned weight, mask)."""
    config = PruningConfig(method=method, pattern=pattern, sparsity=sparsity, settings=settings or None)
    pruner = get_method(config.method, config.settings)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer = TargetLayer("layer", linear, 0)
    statistic = pruner.make_statistic(layer, torch.device("cpu"))
    if statistic is not None:
        for batch in inputs.split(100):  # several updates, as over calibration batches
            statistic.update(batch)
    pruned = weight.clone()
    mask = pruner.prune_matrix(pruned, statistic, config.sparsity, config.nm_pattern)
    pruned[mask] = 0.0
    return pruned, mask


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    return ((inputs @ (weight - pruned).T).norm() / (inputs @ weight.T).norm()).item()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(("pattern", "sparsity"), PATTERNS)
def test_exact_sparsity_and_nm_structure(method, pattern, sparsity):
    weight, inputs = layer_inputs(24, 64, 256, seed=0)
    kwargs = {"sparsity": sparsity} if pattern == "unstructured" else {}
    pruned, mask = prune(method, weight, inputs, pattern, **kwargs)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert mask.sum().item() == round(weight.numel() * sparsity)
    assert (pruned[mask] == 0).all()
    assert (pruned == 0).sum().item() == mask.sum().item()  # kept weights stay non-zero
    nm = NMPattern.parse(pattern)
    if nm is not None:
        per_group = mask.view(24, -1, nm.m).sum(dim=2)
        assert (per_group == nm.m - nm.n).all()


@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.5), ("2:4", 0.5)])
def test_reconstruction_error_ordering_with_outlier_channels(pattern, sparsity):
    """SparseGPT reconstructs ``WX`` best, then Wanda, then magnitude, on every seed."""
    for seed in range(5):
        weight, inputs = layer_inputs(64, 128, 512, seed=seed)
        errors = {
            method: relative_error(weight, prune(method, weight, inputs, pattern)[0], inputs)
            for method in ("magnitude", "wanda", "sparsegpt")
        }
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], (seed, errors)
        assert errors["wanda"] < 0.8 * errors["magnitude"], (seed, errors)  # outliers matter


def test_magnitude_uses_one_threshold_per_matrix():
    weight, inputs = layer_inputs(32, 64, 128, seed=1)
    weight[:4] *= 5  # rows of large weights keep most of them under a global threshold
    _, mask = prune("magnitude", weight, inputs, sparsity=0.5)
    magnitudes = weight.abs()
    assert magnitudes[mask].max() < magnitudes[~mask].min()
    assert mask[:4].float().mean() < 0.2 and mask[4:].float().mean() > 0.5


def test_wanda_matches_direct_per_row_computation():
    weight, inputs = layer_inputs(32, 64, 300, seed=2)
    _, mask = prune("wanda", weight, inputs, sparsity=0.5)
    scores = weight.abs() * inputs.pow(2).sum(dim=0).sqrt()  # |W_ij| * ||X_j||_2
    expected = torch.zeros_like(mask)
    expected.scatter_(1, scores.argsort(dim=1)[:, :32], True)  # the 32 lowest of every output row
    assert torch.equal(mask, expected)
    global_threshold = scores.flatten().kthvalue(scores.numel() // 2).values
    assert not torch.equal(mask, scores <= global_threshold)  # per-row differs from one global threshold


def test_wanda_nm_matches_direct_group_computation():
    weight, inputs = layer_inputs(16, 64, 300, seed=3)
    _, mask = prune("wanda", weight, inputs, pattern="2:4")
    scores = (weight.abs() * inputs.pow(2).sum(dim=0).sqrt()).view(16, 16, 4)
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected.scatter_(2, scores.argsort(dim=2)[:, :, :2], True)
    assert torch.equal(mask, expected.view(16, 64))


def test_statistics_accumulate_over_batches():
    inputs = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    hessian, norms = Hessian(16, torch.device("cpu")), InputNorms(16, torch.device("cpu"))
    for batch in inputs.split([1, 1]):
        hessian.update(batch)
        norms.update(batch)
    x = inputs.reshape(-1, 16).double()
    torch.testing.assert_close(hessian.matrix.double(), 2 * x.T @ x / 100, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms.squared_norms.double(), x.pow(2).sum(dim=0), rtol=1e-5, atol=1e-6)
    assert hessian.matrix.dtype == norms.squared_norms.dtype == torch.float32
    assert hessian.tokens == norms.tokens == 100


def test_inverse_hessian_cholesky_is_dampened_upper_factor():
    _, inputs = layer_inputs(8, 32, 200, seed=5)
    hessian = 2 * inputs.T @ inputs / 200
    factor = inverse_hessian_cholesky(hessian, 0.01)
    assert torch.equal(factor, factor.triu())
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(32)
    torch.testing.assert_close(factor.T @ factor, torch.linalg.inv(damped), rtol=1e-3, atol=1e-6)


def test_inverse_hessian_cholesky_in_place_matches_copy_and_retries():
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    hessian = 2 * inputs.T @ inputs - 1e-3 * torch.eye(16)  # indefinite: positive only after a few retries
    original = hessian.clone()
    expected = inverse_hessian_cholesky(hessian, 0.0)
    assert torch.equal(hessian, original)  # the copy leaves its input alone
    torch.testing.assert_close(inverse_hessian_cholesky(hessian, 0.0, in_place=True), expected)
    assert not torch.equal(hessian, original)
    assert torch.linalg.cholesky_ex(original + 1e-7 * original.diagonal().mean() * torch.eye(16)).info > 0


def test_hessian_inverse_is_computed_once_in_place_for_layers_sharing_it():
    inputs = torch.randn(64, 24, generator=torch.Generator().manual_seed(8))
    hessian = Hessian(24, torch.device("cpu"))
    hessian.update(inputs)
    matrix = hessian.matrix
    expected = inverse_hessian_cholesky(matrix, 0.01)
    factor = hessian.inverse_cholesky(0.01)
    torch.testing.assert_close(factor, expected)
    assert hessian.inverse_cholesky(0.01) is factor  # q, k and v share one factorisation
    with pytest.raises(RuntimeError, match="turned into"):
        _ = hessian.matrix
    with pytest.raises(RuntimeError, match="no more inputs"):
        hessian.update(inputs)


def test_inverse_hessian_cholesky_handles_dead_and_singular_inputs():
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(6))  # rank 8 < 16
    inputs[:, 3] = 0.0  # a dead input channel
    factor = inverse_hessian_cholesky(2 * inputs.T @ inputs, 0.0)
    assert torch.isfinite(factor).all()
    assert (factor.diagonal() > 0).all()


def reference_sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: NMPattern | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow OBS in float64 straight from the paper: no Cholesky trick, no lazy batching.

    Column ``j`` is pruned with the inverse of the Hessian restricted to the columns not yet visited,
    ``H_j^-1 = (H[j:, j:])^-1`` (obtained from ``H_(j-1)^-1`` by Gaussian elimination); each pruned weight's error ``w / [H_j^-1]_00`` is spread at once over
    every later column along ``[H_j^-1]_0,:``. Masks use the saliency ``w^2 / [H_j^-1]_00``: per block of
    ``block_size`` columns at its start (unstructured), per group of ``M`` at its start (N:M).
    """
    weight, hessian = weight.double().clone(), hessian.double().clone()
    rows, cols = weight.shape
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    inverses = [torch.linalg.inv(hessian)]
    for _ in range(cols - 1):  # OBS eq. (3): drop the visited column from the inverse by Gaussian elimination
        previous = inverses[-1]
        inverses.append(previous[1:, 1:] - previous[1:, :1] @ previous[:1, 1:] / previous[0, 0])
    diagonal = torch.stack([inverse[0, 0] for inverse in inverses])
    total = round(weight.numel() * sparsity)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for j in range(cols):
        if pattern is None and j % block_size == 0:
            end = min(j + block_size, cols)
            saliency = (weight[:, j:end].pow(2) / diagonal[j:end]).flatten()
            count = round(total * end / cols) - round(total * j / cols)
            block = torch.zeros(saliency.numel(), dtype=torch.bool)
            block[saliency.argsort()[:count]] = True
            mask[:, j:end] = block.view(rows, end - j)
        if pattern is not None and j % pattern.m == 0:
            saliency = weight[:, j : j + pattern.m].pow(2) / diagonal[j : j + pattern.m]
            lowest = saliency.argsort(dim=1)[:, : pattern.m - pattern.n]
            mask[:, j : j + pattern.m].scatter_(1, lowest, True)
        error = torch.where(mask[:, j], weight[:, j], 0.0) / inverses[j][0, 0]
        weight[:, j:] -= error.unsqueeze(1) * inverses[j][0].unsqueeze(0)
    weight[mask] = 0.0
    return weight.float(), mask


@pytest.mark.parametrize(
    ("pattern", "sparsity", "block_size"),
    [("unstructured", 0.5, 128), ("unstructured", 0.7, 32), ("2:4", 0.5, 128), ("4:8", 0.5, 64)],
)
def test_sparsegpt_matches_slow_obs_reference(pattern, sparsity, block_size):
    weight, inputs = layer_inputs(16, 256, 1024, seed=7)
    kwargs = {"sparsity": sparsity} if pattern == "unstructured" else {}
    pruned, mask = prune("sparsegpt", weight, inputs, pattern, block_size=block_size, **kwargs)
    expected, expected_mask = reference_sparsegpt(
        weight, 2 * inputs.T @ inputs / len(inputs), sparsity, NMPattern.parse(pattern), block_size
    )
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-5)


def test_sparsegpt_compensates_kept_weights():
    """On strongly correlated inputs the OBS update of the kept weights recovers most of the error."""
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(16, 64, generator=generator)
    inputs = torch.randn(512, 16, generator=generator) @ torch.randn(16, 64, generator=generator)
    inputs += 0.1 * torch.randn(512, 64, generator=generator)
    pruned, mask = prune("sparsegpt", weight, inputs, sparsity=0.5)
    assert not torch.allclose(pruned[~mask], weight[~mask])  # OBS updates the kept weights
    masked_only = weight.masked_fill(mask, 0.0)
    assert relative_error(weight, pruned, inputs) < 0.5 * relative_error(weight, masked_only, inputs)


def test_inverse_retries_when_the_inverse_is_not_positive_definite(monkeypatch):
    _, inputs = layer_inputs(8, 32, 200, seed=5)
    hessian = 2 * inputs.T @ inputs / 200
    expected = inverse_hessian_cholesky(hessian, 0.1)  # what one more factor of 10 of dampening gives
    real, failed = torch.linalg.cholesky_ex, []

    def fail_first_upper(matrix, *, upper=False, **kwargs):
        factor, info = real(matrix, upper=upper, **kwargs)
        if upper and not failed:
            failed.append(True)
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fail_first_upper)
    torch.testing.assert_close(inverse_hessian_cholesky(hessian, 0.01), expected, rtol=1e-3, atol=1e-5)
    assert failed
