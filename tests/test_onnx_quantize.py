"""Quantized ONNX exports (int8, int4 and int8-dynamic through onnxruntime's tools): pruned zeros exact after dequantization,
the head left float, what was done recorded, decoding close to the float export's, perplexity of ONNX folders by
the same protocol as models, and bad input refused before any export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import STORIES_260K, TINYSTORIES_VAL
from onnx import numpy_helper
from test_cli import run_main
from test_onnx import Session

from optimum_prune import Pruner, export_onnx, perplexity
from optimum_prune.errors import InputError
from optimum_prune.export.onnx import ONNX_FILE
from optimum_prune.export.quantize import QUANTIZATIONS
from optimum_prune.method_settings import NBITS_BLOCK

TEXT = TINYSTORIES_VAL.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pruned(magnitude_stories: Pruner) -> Pruner:
    return magnitude_stories


@pytest.fixture(scope="module")
def exports(pruned: Pruner, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quantized")
    return {
        name: export_onnx(pruned.model, folder / name, tokenizer=pruned.tokenizer, quantize=quantize)
        for name, quantize in (("fp32", None), *((name, name) for name in QUANTIZATIONS))
    }


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    model = onnx.load(folder / ONNX_FILE)
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _nbits_weight(packed: np.ndarray, scales: np.ndarray, bits: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' ``(N, blocks, NBITS_BLOCK * bits / 8)`` bytes (int4: low nibble first; implicit zero point
    ``2**(bits - 1)``) as ``(N, K)`` codes and dequantized floats."""
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1) if bits == 4 else packed
    codes = codes.reshape(packed.shape[0], -1)
    values = (codes.astype(np.float32) - 2 ** (bits - 1)) * np.repeat(scales, NBITS_BLOCK, axis=1)
    return codes[:, :columns], values[:, :columns]


def test_pruned_zeros_are_exact_after_quantization(exports: dict[str, Path], pruned: Pruner) -> None:
    dynamic = _initializers(exports["int8-dynamic"])
    for layer in pruned.report.layers:
        weight = pruned.model.get_submodule(layer.name).weight.detach().numpy()  # (out, in)
        zeros = weight == 0
        assert zeros.sum() == round(layer.sparsity * weight.size) > 0
        quantized = dynamic[f"{layer.name}.weight_quantized"]  # (in, out), symmetric: zero point 0
        assert not dynamic[f"{layer.name}.weight_zero_point"].any()
        assert (quantized.T[zeros] == 0).all()
        for bits in (8, 4):
            stored = _initializers(exports[f"int{bits}"])
            packed, scales = stored[f"{layer.name}.weight_Q{bits}"], stored[f"{layer.name}.weight_scales"]
            codes, values = _nbits_weight(packed, scales, bits, weight.shape[1])
            assert (codes[zeros] == 2 ** (bits - 1)).all() and (values[zeros] == 0).all()
            largest_code = 2 ** (bits - 1) - 1
            assert np.abs(values - weight).max() <= np.abs(weight).max() / largest_code + 1e-6


def test_the_head_stays_float_and_the_quantization_is_recorded(exports: dict[str, Path]) -> None:
    for name in QUANTIZATIONS:
        model = onnx.load(exports[name] / ONNX_FILE, load_external_data=False)
        props = {prop.key: prop.value for prop in model.metadata_props}
        info = json.loads(props["optimum_prune_quantization"])
        assert info["quantize"] == name and info["float_nodes"]
        head = next(node for node in model.graph.node if node.name == info["float_nodes"][0])
        assert head.op_type == "MatMul"
        config = json.loads((exports[name] / "config.json").read_text())
        assert config["optimum_prune"]["onnx"] == info and config["optimum_prune"]["method"] == "magnitude"


def _decoded_logits(exports: dict[str, Path], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding with the KV cache, 12 steps from 3 prompts, ``name``'s export fed the float export's
    tokens: the last-position logits of both at every step."""
    sessions = {"fp32": Session(exports["fp32"]), name: Session(exports[name])}
    ids = np.array([[1, 400, 35], [1, 17, 260], [1, 90, 91]], dtype=np.int64)
    step_logits = {name: [] for name in sessions}
    past = {}
    for name, session in sessions.items():
        logits, past[name] = session.run(ids, np.ones_like(ids), np.arange(3)[None].repeat(3, 0))
        step_logits[name].append(logits[:, -1])
    for step in range(12):
        token = step_logits["fp32"][-1].argmax(-1)[:, None]
        length = 3 + step + 1
        for name, session in sessions.items():
            mask, positions = np.ones((3, length), dtype=np.int64), np.full((3, 1), length - 1)
            logits, past[name] = session.run(token, mask, positions, past[name])
            step_logits[name].append(logits[:, -1])
    return np.stack(step_logits["fp32"]), np.stack(step_logits[name])


@pytest.mark.parametrize(
    ("name", "mean", "worst", "agreement"),
    [("int8", 0.01, 0.05, 0.95), ("int4", 0.05, 0.25, 0.75), ("int8-dynamic", 0.05, 0.30, 0.6)],
)
def test_quantized_decoding_with_the_cache_stays_within_its_tolerance(
    exports: dict[str, Path], name: str, mean: float, worst: float, agreement: float
) -> None:
    """On stories260K (260K parameters, whose activations int8-dynamic's per-tensor scales round coarsely) the
    quantized export's logits stay within ``mean`` of the float export's logit range on average and ``worst`` at
    worst, and it picks the float export's token at least ``agreement`` of the time (measured, mean / worst / agreement:
    int8 0.2% / 1.9% / 97%, int4 1.9% / 13% / 90%, int8-dynamic 3.9% / 19% / 72%)."""
    fp32, quantized = _decoded_logits(exports, name)
    spread = np.ptp(fp32, axis=-1, keepdims=True)
    error = np.abs(fp32 - quantized) / spread
    assert error.mean() <= mean and error.max() <= worst
    assert (fp32.argmax(-1) == quantized.argmax(-1)).mean() >= agreement


def test_perplexity_of_onnx_folders_by_the_same_protocol(exports: dict[str, Path], pruned: Pruner) -> None:
    torch_value = perplexity(pruned.model, pruned.tokenizer, TEXT, seq_len=256, max_windows=6)
    values = {name: perplexity(folder, None, TEXT, seq_len=256, max_windows=6) for name, folder in exports.items()}
    assert values["fp32"] == pytest.approx(torch_value, rel=1e-4)
    assert values["int8"] <= 1.01 * values["fp32"]
    assert values["int4"] <= 1.15 * values["fp32"]
    assert values["int8-dynamic"] <= 1.05 * values["fp32"]


def test_bad_quantization_input_is_refused_before_export(pruned: Pruner, tmp_path: Path, monkeypatch, capsys) -> None:
    with pytest.raises(InputError, match="Unknown ONNX quantization 'int2': choose one of int8, int4"):
        export_onnx(pruned.model, tmp_path / "x", quantize="int2")
    assert not (tmp_path / "x").exists()
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    with pytest.raises(ImportError, match=r'pip install "optimum-prune\[onnx\]"'):
        export_onnx(pruned.model, tmp_path / "y", quantize="int8")
    monkeypatch.undo()
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", "--onnx-quantize", "int8") == 2
    assert "argument --onnx-quantize: it quantizes the ONNX export; add --export onnx." in capsys.readouterr().err
    with pytest.raises(InputError, match="No model.onnx in"):
        perplexity(tmp_path, None, TEXT)


def test_cli_exports_int8_and_measures_its_perplexity(tmp_path: Path, capsys) -> None:
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--eval", str(TINYSTORIES_VAL)]
    flags += ["--eval-windows", "2", "--eval-seq-len", "128", "--output", str(tmp_path / "out")]
    assert run_main(*flags, "--export", "onnx", "--onnx-quantize", "int8") == 0
    out = capsys.readouterr().out
    assert "ONNX model (int8 weights) written to" in out
    assert "--gptq int8 rounds them during pruning with the calibration data" in out
    assert "of the ONNX export (int8 weights, onnxruntime): " in out
