"""Export a (pruned) causal LM to ONNX with ``torch.onnx.export(dynamo=True)`` and optimum's decoder I/O names.

Inputs are ``input_ids``, ``attention_mask``, ``position_ids`` and, with
``with_past``, ``past_key_values.{i}.key/value``; outputs are ``logits`` and ``present.{i}.key/value``. Weights
stay ordinary dense initializers named after their parameters, so the pruned zeros are exactly where
sparse-aware engines (DeepSparse, for example) look for them. Linear weights are stored as the ``(in, out)``
right-hand side of their ``MatMul`` (or as they are, for a ``Gemm`` with ``transB=1``). The pruning metadata goes
into the model's ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..core.auto import is_vision_language
from ..core.layers import is_fused_experts
from ..errors import InputError
from ..method_settings import GPTQ_BITS
from .files import atomic_directory, check_writable, write_model_files
from .metadata import METADATA_KEY, read_metadata
from .quantize import check_quantization, quantize_onnx

logger = logging.getLogger(__name__)
QUANTIZATION_KEY = "optimum_prune_quantization"  # metadata_props entry of a quantized export
# transformers 5 renamed the cache argument and output field `past_key_values` to `cache` (the old name warns)
CACHE_ARGUMENT = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf cannot hold a model of 2 GB or more
MAX_OPSET_FOR_IR_9 = 20
_PREFIX = "decoder."


class _Decoder(nn.Module):
    """Flat tensors in, flat tensors out: the signature ``torch.onnx.export`` turns into named graph I/O."""

    def __init__(self, model: PreTrainedModel, with_past: bool) -> None:
        super().__init__()
        self.decoder = model
        self.with_past = with_past

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if not self.with_past:
            return self.decoder(**inputs, use_cache=False).logits
        cache = DynamicCache(config=self.decoder.config)
        for index in range(len(past) // 2):
            cache.update(past[2 * index], past[2 * index + 1], index)
        output = self.decoder(**inputs, **{CACHE_ARGUMENT: cache}, use_cache=True)
        present = [tensor for layer in getattr(output, CACHE_ARGUMENT).layers for tensor in (layer.keys, layer.values)]
        return (output.logits, *present)


@contextmanager
def _in_float32(model: nn.Module) -> Iterator[None]:
    """Export half-precision models in float32: onnxruntime's CPU kernels have no bfloat16 (and few float16)
    implementations, so a bf16 graph does not load ("Could not find an implementation for Mul"). The model is
    cast in place and cast back afterwards (exact: float32 holds every bf16 and fp16 value)."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    logger.info("Exporting the %s model in float32, the dtype onnxruntime runs everywhere.", dtype)
    model.float()
    try:
        yield
    finally:
        model.to(dtype)


@contextmanager
def _exportable_experts(model: PreTrainedModel) -> Iterator[None]:
    """Run fused mixture-of-experts modules through transformers' ``batched_mm`` implementation while exporting:
    the default grouped kernels do not convert to ONNX and the eager loop depends on the routing (``nonzero``),
    while ``batched_mm`` gathers each token's expert weights, a fixed graph."""
    previous = getattr(model.config, "_experts_implementation", None)
    if previous in (None, "batched_mm") or not any(is_fused_experts(module) for module in model.modules()):
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(previous)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's own chatter (progress lines printed to stdout, info logs) out of the user's output."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


VISION_LANGUAGE_REFUSAL = (
    "ONNX export writes a text causal LM's graph: a vision-language model needs its vision encoder, embedding and "
    "decoder graphs (as onnxruntime-genai builds them), which optimum-prune does not export. Save it as "
    "safetensors (or --export compressed) and convert that folder with onnxruntime-genai's model builder."
)


def check_exportable(model: nn.Module) -> None:
    """Refuse a vision-language model (`VISION_LANGUAGE_REFUSAL`) and a model whose weights are not all
    materialized on one device (accelerate offload, meta tensors)."""
    if is_vision_language(model.config):
        raise InputError(VISION_LANGUAGE_REFUSAL)
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
        raise InputError(
            "The model carries accelerate offload hooks (it was loaded with device_map or offload): ONNX export "
            "needs every weight in memory. Reload it without device_map/offload, or move its weights to the CPU "
            "and call accelerate.hooks.remove_hook_from_module(model, recurse=True) first."
        )
    devices = {tensor.device for tensor in [*model.parameters(), *model.buffers()]}
    if any(device.type == "meta" for device in devices):
        raise InputError("The model has weights on the meta device (not loaded): load its weights before exporting.")
    if len(devices) > 1:
        raise InputError(f"The model's weights are spread over {sorted(map(str, devices))}: move it to one device.")


def _cache_shapes(model: PreTrainedModel, input_ids: torch.Tensor) -> list[tuple[int, ...]]:
    """The per-layer key and value shapes the model's own cache produces for ``input_ids``."""
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    return [
        tuple(tensor.shape) for layer in getattr(output, CACHE_ARGUMENT).layers for tensor in (layer.keys, layer.values)
    ]


def _example(model: PreTrainedModel, with_past: bool) -> tuple[tuple[Any, ...], list[str], list[str], tuple[Any, ...]]:
    """Example inputs (batch 2, 3 new tokens after 4 cached ones), the I/O names and the dynamic shapes."""
    parameter = next(model.parameters())
    batch, new, cached = 2, 3, 4 if with_past else 0
    vocab = model.config.get_text_config().vocab_size
    input_ids = torch.randint(0, vocab, (batch, new), device=parameter.device)
    attention_mask = torch.ones(batch, cached + new, dtype=torch.long, device=parameter.device)
    position_ids = torch.arange(cached, cached + new, device=parameter.device).expand(batch, new)
    batch_dim, new_dim = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    total_dim = torch.export.Dim("total_sequence_length")
    args: list[Any] = [input_ids, attention_mask, position_ids]
    dynamic: list[Any] = [{0: batch_dim, 1: new_dim}, {0: batch_dim, 1: total_dim}, {0: batch_dim, 1: new_dim}]
    input_names, output_names = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    if with_past:
        shapes = _cache_shapes(model, input_ids[:, :cached].contiguous())
        args.append([torch.randn(shape, dtype=parameter.dtype, device=parameter.device) for shape in shapes])
        past_dim = torch.export.Dim("past_sequence_length")
        dynamic.append([{0: batch_dim, 2: past_dim} for _ in shapes])
        for index in range(len(shapes) // 2):
            input_names += [f"past_key_values.{index}.key", f"past_key_values.{index}.value"]
            output_names += [f"present.{index}.key", f"present.{index}.value"]
    return tuple(args), input_names, output_names, tuple(dynamic)


def _name_weights(graph: Any) -> None:
    """Give initializers their parameter names and fold ``Transpose(weight)`` into the stored weight.

    The exporter feeds ``MatMul`` with ``Transpose(W)``; the optimizer would fold that into an anonymous
    ``val_N`` constant. Folding it here keeps the parameter name (and every zero) on the weight ``MatMul`` reads.
    """
    import onnx_ir as ir

    for name, value in list(graph.initializers.items()):
        if name.startswith(_PREFIX):
            value.name = name[len(_PREFIX) :]
    for node in list(graph):
        if node.op_type != "Transpose" or not node.inputs[0].is_initializer():
            continue
        weight = node.inputs[0]
        perm = node.attributes.get("perm")
        if weight.const_value is None or len(weight.shape) != 2 or (perm is not None and list(perm.value) != [1, 0]):
            continue
        data = weight.const_value.numpy().T.copy()
        name = weight.name
        sole_use = len(weight.uses()) == 1
        if sole_use:
            graph.initializers.pop(name)
            weight.name = f"{name}.original"
        folded = ir.Value(name=name if sole_use else f"{name}.transposed", const_value=ir.tensor(data, name=None))
        folded.const_value.name = folded.name
        graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)


def _load(model_or_dir: str | os.PathLike | nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The model (a saved dense or compressed folder loads in fp32) and the tokenizer to put beside it."""
    from .loading import load_pruned

    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, tokenizer
    path = Path(model_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass a loaded model or a saved model folder.")
    model = load_pruned(path, dtype=torch.float32)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            logger.warning("No tokenizer in %s (%s): the ONNX folder will have none.", path, error)
    return model.eval(), tokenizer


def export_onnx(
    model_or_dir: str | os.PathLike | nn.Module,
    output_dir: str | os.PathLike,
    *,
    with_past: bool = True,
    opset: int = 18,
    overwrite: bool = False,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    external_data: bool | None = None,
    quantize: str | None = None,
    quantize_head: bool = False,
) -> Path:
    """Export a causal LM (a loaded model or a saved folder) to ``output_dir/model.onnx``.

    The folder also gets ``config.json``, the generation config and the tokenizer. ``external_data=None``
    writes the weights to ``model.onnx_data`` only when they reach 2 GB. The output folder is written
    atomically and a non-empty one is kept unless ``overwrite``. ``quantize="int8"``, ``"int4"`` (weight-only) or
    ``"int8-dynamic"`` stores the linear weights in low bits through onnxruntime's quantization tools
    (`optimum_prune.export.quantize`; pruned zeros stay exactly zero), the language-model head in float unless ``quantize_head``; what was done is
    recorded in ``config.json`` (``optimum_prune.onnx``) and the model's ``metadata_props``.
    """
    import onnx_ir as ir

    check_quantization(quantize)
    sources = () if isinstance(model_or_dir, nn.Module) else (model_or_dir,)
    check_writable(output_dir, overwrite, inputs=sources)
    model, tokenizer = _load(model_or_dir, tokenizer)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"export_onnx needs a transformers causal LM, got {type(model).__name__}.")
    check_exportable(model)
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    with _in_float32(model), _exportable_experts(model):
        args, input_names, output_names, dynamic_shapes = _example(model, with_past)
        wrapper = _Decoder(model, with_past).eval()
        with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=False,
                verbose=False,
            )
        _name_weights(program.model.graph)
        program.optimize()
        onnx_model = program.model
        metadata = read_metadata(model.config)
        if metadata is not None:
            onnx_model.metadata_props[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
        onnx_model.producer_name = "optimum-prune"
        if opset <= MAX_OPSET_FOR_IR_9:
            onnx_model.ir_version = 9  # the newest IR older runtimes (DeepSparse 1.8, onnxruntime < 1.16) read
        initializers = onnx_model.graph.initializers.values()
        size = sum(value.const_value.nbytes for value in initializers if value.const_value)
        if external_data is None:
            external_data = size >= EXTERNAL_DATA_THRESHOLD
        with atomic_directory(output_dir, overwrite) as staging:
            ir.save(onnx_model, staging / ONNX_FILE, external_data=EXTERNAL_DATA_FILE if external_data else None)
            write_model_files(staging, model, tokenizer)
            if quantize is not None:
                _quantize_in_place(staging, quantize, quantize_head, external_data)
    return Path(output_dir)


def _quantize_in_place(folder: Path, quantize: str, quantize_head: bool, external_data: bool) -> None:
    """Replace ``folder``'s float model by its quantized one, and record the quantization beside the pruning
    metadata (``config.json``) and in the model's ``metadata_props``."""
    import onnx

    float_model = folder / "float" / ONNX_FILE
    float_model.parent.mkdir()
    for name in (ONNX_FILE, EXTERNAL_DATA_FILE):
        if (folder / name).exists():
            os.replace(folder / name, float_model.parent / name)
    info = quantize_onnx(
        float_model, folder / ONNX_FILE, quantize, quantize_head=quantize_head, external_data=external_data
    )
    shutil.rmtree(float_model.parent)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    rounded = config.get(METADATA_KEY, {}).get("gptq")
    if rounded and rounded != quantize:
        fix = f"prune with gptq={quantize!r}" if quantize in GPTQ_BITS else f"export with quantize={rounded!r}"
        logger.warning(
            "The weights were rounded by GPTQ onto the %s grid, but the export quantizes them to %s: each weight is "
            "rounded again on its own. For weights that lie on the export's grid, %s.",
            rounded,
            quantize,
            fix,
        )
    info["gptq"] = rounded == quantize  # the weights already lie on this grid: quantized to exactly them
    model = onnx.load(folder / ONNX_FILE, load_external_data=False)
    onnx.helper.set_model_props(
        model, {**{prop.key: prop.value for prop in model.metadata_props}, QUANTIZATION_KEY: json.dumps(info)}
    )
    onnx.save(model, folder / ONNX_FILE)  # the weights stay in the external data file, if any
    config.setdefault(METADATA_KEY, {})["onnx"] = info
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
