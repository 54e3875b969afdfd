"""Low-bit weights for an exported ONNX model, through onnxruntime's own quantization tools.

- ``"int8"`` and ``"int4"``: `MatMulNBitsQuantizer`, symmetric 8- or 4-bit weights in blocks of ``NBITS_BLOCK``
  input rows with one float scale each (the ``MatMulNBits`` contrib op of onnxruntime's generative-AI stack),
  weight-only, run with ``accuracy_level=4`` as onnxruntime-genai builds CPU models: each block of activations is
  rounded to int8 at run time with its own scale, so activation outliers stay local to their block.
- ``"int8-dynamic"``: `onnxruntime.quantization.quantize_dynamic`, symmetric int8 weights per output channel and
  activations quantized on the fly with one scale per tensor (``MatMulInteger``): the fastest prefill, but a model
  with massive activation outliers loses its quality (it warns).

All are symmetric, so a pruned weight quantizes to exactly the implicit zero point (int8-dynamic: 0; ``MatMulNBits``:
``2**(bits - 1)``) and dequantizes to exactly zero. The language-model head (the last ``MatMul`` before the
logits) stays float by default: it is where low-bit weights cost the most quality for the least size.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..method_settings import NBITS_BLOCK

logger = logging.getLogger(__name__)
QUANTIZATIONS = ("int8", "int4", "int8-dynamic")
ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations, one scale per block


def check_quantization(quantize: str | None) -> None:
    """Refuse, before any export, a quantization name outside our list, or one onnxruntime's tools cannot run."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise InputError(f"Unknown ONNX quantization {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}.")
    if importlib.util.find_spec("onnxruntime") is None:
        raise ImportError('Quantizing ONNX weights needs onnxruntime\'s tools: pip install "optimum-prune[onnx]".')
    if (
        quantize != "int8-dynamic"
        and importlib.util.find_spec("onnxruntime.quantization.matmul_nbits_quantizer") is None
    ):
        raise ImportError(f"{quantize} ONNX weights need onnxruntime's MatMulNBitsQuantizer: upgrade onnxruntime.")


@contextmanager
def _no_preprocessing_advice() -> Iterator[None]:
    """onnxruntime's quantizer logs, on the root logger, advice to run its shape pre-processing first: advice for
    static quantization of vision models, noise here."""

    def advice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _nbits_quantizer_class() -> type:
    """`MatMulNBitsQuantizer`, imported without the side effects of its module: it calls ``logging.basicConfig`` at
    INFO on the root logger (then logs every node it visits); the root logger is put back as it was, and the
    module's own logger keeps to warnings."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer.MatMulNBitsQuantizer


def head_nodes(path: str | os.PathLike) -> list[str]:
    """The name of the ``MatMul`` (or ``Gemm``) that computes the logits: the first one met walking back from the
    ``logits`` output."""
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    pending, seen = ["logits"], set()
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            return [node.name]
        pending.extend(node.input)
    return []


def quantize_onnx(
    source: str | os.PathLike,
    target: str | os.PathLike,
    quantize: str,
    *,
    quantize_head: bool = False,
    external_data: bool = False,
) -> dict[str, Any]:
    """Write ``source``'s model with ``quantize`` weights to ``target``; return what was done (for the metadata)."""
    import onnx
    import onnxruntime

    check_quantization(quantize)
    excluded = [] if quantize_head else head_nodes(source)
    if quantize == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logger.warning(
            "int8-dynamic quantizes activations with one scale per tensor at run time: a model with massive "
            "activation outliers loses its quality (SmolLM2-135M: WikiText-2 perplexity 34.1 -> 3.4 million). "
            "Measure the export (--eval, or perplexity(folder, ...)), or use int8, which keeps them local."
        )
        with _no_preprocessing_advice():
            quantize_dynamic(
                Path(source), Path(target), per_channel=True, weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded, use_external_data_format=external_data,
                extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True},
            )  # fmt: skip
        scheme = "dynamic int8, symmetric per output channel (MatMulInteger), activations per tensor at run time"
    else:
        bits = int(quantize.removeprefix("int"))
        quantizer = _nbits_quantizer_class()(
            onnx.load(os.fspath(source)), bits=bits, block_size=NBITS_BLOCK, is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=excluded,
        )  # fmt: skip
        quantizer.process()
        quantizer.model.save_model_to_file(os.fspath(target), use_external_data_format=external_data)
        scheme = (
            f"weight-only {quantize}, symmetric, blocks of {NBITS_BLOCK} (MatMulNBits, int8 activations per block: "
            f"accuracy_level {ACCURACY_LEVEL})"
        )
    left_float = [name for name in float_weight_nodes(target) if name not in excluded]
    quantized = len(float_weight_nodes(source)) - len(excluded) - len(left_float)
    if quantized == 0:
        raise InputError(
            f"onnxruntime's {quantize} quantizer found no weight it quantizes in this model ({len(left_float)} "
            "weights stay float: its layers export as Gemm or fused experts, e.g. GPT-2's Conv1D, which it does not "
            "take): export it in float (drop quantize=), or use quantize='int8-dynamic'."
        )
    if left_float:
        logger.warning(
            "%d of %d weight matrices stay float in this %s export (%s%s): onnxruntime's quantizer takes MatMul "
            "weights only, and these export as Gemm or as fused experts.",
            len(left_float), quantized + len(left_float), quantize, ", ".join(left_float[:4]),
            " ..." if len(left_float) > 4 else "",
        )  # fmt: skip
    return {
        "quantize": quantize,
        "scheme": scheme,
        "float_nodes": excluded + left_float,
        "onnxruntime": onnxruntime.__version__,
    }


def float_weight_nodes(path: str | os.PathLike) -> list[str]:
    """The ``MatMul``/``Gemm`` nodes of a saved ONNX model that multiply by a float weight stored in the file (an
    initializer, possibly through a Transpose or Cast): what weight-only quantization would make low-bit."""
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}

    def stored(name: str) -> bool:
        node = producers.get(name)
        if node is not None and node.op_type in ("Transpose", "Cast", "Identity"):
            return stored(node.input[0])
        return name in initializers

    return [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm") and stored(node.input[1])]
