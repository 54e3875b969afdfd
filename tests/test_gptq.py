"""GPTQ onto the grid of the int4/int8 ONNX export (`optimum_prune.methods.gptq`): the weights land on
onnxruntime's MatMulNBits grid, which quantizes them to exactly themselves; pruned zeros stay zero; the layer error
is lower than rounding each weight on its own; bad input refused. (Its perplexity gain is measured on SmolLM2 in
benchmarks/deploy_speed.py: the asset models, 64 wide, gain or lose about 1% either way.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import C4_SAMPLE, STORIES_260K
from test_cli import run_main
from test_onnx_quantize import _initializers, _nbits_weight

from optimum_prune import Pruner, PruningConfig, export_onnx
from optimum_prune.core.statistics import Hessian
from optimum_prune.errors import InputError
from optimum_prune.method_settings import GPTQ_BITS, NBITS_BLOCK
from optimum_prune.methods.gptq import GRIDS, gptq_round


def _grid_steps(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight over its block's MatMulNBits scale (the block's largest-magnitude weight over ``-2**(bits-1)``),
    and that scale per weight."""
    rows, cols = weight.shape
    blocks = torch.nn.functional.pad(weight, (0, -cols % NBITS_BLOCK)).view(rows, -1, NBITS_BLOCK)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    scale = (extreme / -(2 ** (bits - 1))).expand_as(blocks).reshape(rows, -1)[:, :cols]
    return torch.where(scale != 0, weight / torch.where(scale != 0, scale, 1.0), 0.0), scale


def _rounded_one_by_one(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """What the export does to a float weight: each weight to its nearest point of its block's grid."""
    steps, scale = _grid_steps(weight, bits)
    return steps.round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_lands_on_the_grid_keeps_zeros_and_lowers_the_layer_error(bits: int) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2048, 100, generator=generator) @ torch.randn(100, 100, generator=generator)
    statistic = Hessian(100, torch.device("cpu"))
    statistic.update(inputs)
    hessian = statistic.matrix.clone()
    pruned = torch.rand(24, 100, generator=generator) < 0.5
    dense = torch.randn(24, 100, generator=generator).masked_fill(pruned, 0.0)
    weight = dense.clone()
    gptq_round(weight, hessian, pruned, GRIDS[f"int{bits}"])
    assert torch.equal(hessian, statistic.matrix)  # left unchanged
    assert (weight[pruned] == 0).all()
    steps, _ = _grid_steps(weight, bits)
    assert (steps - steps.round()).abs().max() < 1e-4  # on the grid, up to float32 rounding of steps * scale
    assert steps.round().min() >= -(2 ** (bits - 1)) and steps.round().max() <= 2 ** (bits - 1) - 1

    def error(candidate: torch.Tensor) -> float:
        difference = candidate - dense
        return float(((difference @ hessian) * difference).sum())

    assert error(weight) < 0.9 * error(_rounded_one_by_one(dense, bits))


@pytest.mark.parametrize(
    ("quantize", "settings"),
    [("int4", {"method": "wanda", "sparsity": 0.5}), ("int8", {"method": "sparsegpt", "structure": {"mlp": 0.25}})],
)
def test_onnxruntime_quantizes_the_rounded_weights_to_exactly_themselves(
    quantize: str, settings: dict, tmp_path: Path
) -> None:
    """Unstructured (zeros kept) and structured (the smaller model rounded after it is pruned): every linear
    weight's MatMulNBits codes dequantize to exactly the saved float weight; the metadata says what was done."""
    config = PruningConfig(**settings, num_samples=16, seq_len=128, gptq=quantize)
    pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu")
    pruner.progress = False
    pruner.prune(C4_SAMPLE)
    pruner.save_pretrained(tmp_path / "model")
    folder = export_onnx(tmp_path / "model", tmp_path / "onnx", quantize=quantize)
    stored = _initializers(folder)
    bits = GPTQ_BITS[quantize]
    for layer in pruner.report.layers:
        weight = pruner.model.get_submodule(layer.name).weight.detach().numpy()
        packed, scales = stored[f"{layer.name}.weight_Q{bits}"], stored[f"{layer.name}.weight_scales"]
        _, values = _nbits_weight(packed, scales, bits, weight.shape[1])
        np.testing.assert_array_equal(values, weight)
    if "sparsity" in settings:
        assert pruner.report.global_sparsity >= 0.5
    metadata = json.loads((folder / "config.json").read_text())["optimum_prune"]
    assert metadata["gptq"] == quantize and metadata["onnx"]["gptq"] is True
    assert f"kept weights rounded onto the {quantize} grid" in str(pruner.model_card("user/model"))


def test_gptq_bad_input_and_the_cli(tmp_path: Path, caplog, capsys) -> None:
    with pytest.raises(InputError, match="gptq='int3': choose one of int4, int8"):
        PruningConfig(gptq="int3")
    with pytest.raises(InputError, match="prunes the layers of a block jointly: drop gptq"):
        PruningConfig(method="sparsellm", gptq="int4")
    assert PruningConfig(method="magnitude", gptq="int4").needs_calibration
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--gptq", "int8", "--num-samples", "8"]
    flags += ["--seq-len", "64", "--dataset", str(C4_SAMPLE), "--output", str(tmp_path / "out"), "--export", "onnx"]
    assert run_main(*flags, "--onnx-quantize", "int4") == 0
    assert "rounds them during pruning" not in capsys.readouterr().out  # it was, onto another grid: warned instead
    assert "rounded by GPTQ onto the int8 grid, but the export quantizes them to int4" in caplog.text
    onnx_metadata = json.loads((tmp_path / "out" / "onnx" / "config.json").read_text())["optimum_prune"]
    assert onnx_metadata["gptq"] == "int8" and onnx_metadata["onnx"]["gptq"] is False
    assert run_main("--model", str(STORIES_260K), "--gptq", "int2") == 2
    assert "invalid choice: 'int2'" in capsys.readouterr().err
    assert run_main("--model", str(STORIES_260K), "--gptq", "int4", "--recover-steps", "5") == 2
    assert "--recover-steps: gptq='int4' rounds the kept weights onto the int4 grid" in capsys.readouterr().err
    config = PruningConfig(method="magnitude", gptq="int4", num_samples=8, seq_len=64)
    pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu")
    pruner.progress = False
    pruner.prune(C4_SAMPLE)
    with pytest.raises(InputError, match="training would move them off it: recover without gptq"):
        pruner.recover(max_steps=1)
