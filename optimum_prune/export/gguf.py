"""GGUF files for llama.cpp and Ollama, written with the ``gguf`` package (llama.cpp's own Python library).

A saved model folder becomes one ``.gguf`` file: the architecture's metadata under llama.cpp's keys, the tokenizer
(byte-level BPE or Llama's SentencePiece-style BPE, from ``tokenizer.json``, through ``gguf.vocab``), and every
tensor under llama.cpp's name (``gguf.get_tensor_name_map``). Weight matrices are stored as ``f32``, ``f16``,
``q8_0`` or ``q4_0`` (``gguf.quants``: 32 weights a block with one fp16 scale; Q8_0 ``w = d * q``, Q4_0
``w = d * (q - 8)``); norms and biases stay f32, and a q4_0 file keeps the head (or the tied embedding that serves
as one) in q8_0, as llama.cpp's own quantizer keeps it above the rest. A model pruned with ``gptq="q4_0"`` (or ``"q8_0"``) already holds
weights on exactly that grid, fp16 scales included, so the file stores exactly the compensated weights.

What llama.cpp's converter would otherwise get wrong for a pruned model is written explicitly: the head size
(``attention.key_length``/``value_length``, which it infers as hidden/heads when ``head_dim`` is not in
config.json: wrong after KV groups go) and blocks numbered 0..L-1. For the ``llama`` architecture, llama.cpp
rotates query and key features in adjacent pairs where transformers rotates halves, so their rows are permuted as
the converter permutes them (transformers undoes it when it loads a GGUF).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..method_settings import NBITS_BLOCK

if TYPE_CHECKING:  # numpy and torch load when a file is written: the CLI reads GGUF_TYPES at start-up
    import numpy as np

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
GGUF_INSTALL = 'GGUF export needs the gguf package: pip install "optimum-prune[gguf]".'


@dataclass(frozen=True)
class Architecture:
    """How a transformers model type is written: llama.cpp's architecture name, and whether query and key rows are
    permuted for its pairwise rotary embedding."""

    name: str
    permute_qk: bool


ARCHITECTURES = {  # transformers model_type -> how llama.cpp reads it
    "llama": Architecture("llama", permute_qk=True),
    "mistral": Architecture("llama", permute_qk=True),
    "qwen2": Architecture("qwen2", permute_qk=False),
    "qwen3": Architecture("qwen3", permute_qk=False),
}


# The head (the output matrix, or the tied embedding that computes the logits) of a q4_0 file, at the precision
# llama.cpp's llama-quantize gives it (Q6_K there; the gguf package writes no K-quant, so Q8_0).
HEAD_TYPE = {"q4_0": "q8_0"}
FULL_WIDTH_ATTENTION = ("qwen2",)  # llama.cpp loads their query projection as hidden x hidden: no removed heads


def check_gguf_export(config: dict, quantize: str) -> None:
    """Refuse, before any work, a GGUF type outside our list, a model this writer cannot express, or widths the
    type's 32-weight blocks do not divide (``config``: the model's config.json)."""
    if quantize not in GGUF_TYPES:
        raise InputError(f"Unknown GGUF type {quantize!r}: choose one of {', '.join(GGUF_TYPES)}.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(GGUF_INSTALL)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise InputError(
            f"GGUF export writes {', '.join(sorted(ARCHITECTURES))} models; this one is {model_type!r}: convert it "
            "with llama.cpp's convert_hf_to_gguf.py (it may lose the pruned shapes' head size: write head_dim into "
            "config.json first)."
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise InputError(
            f"GGUF export writes rotary embeddings without scaling; this model uses {rope.get('rope_type')!r}: "
            "convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if model_type in FULL_WIDTH_ATTENTION and config["num_attention_heads"] * head_dim != config["hidden_size"]:
        raise InputError(
            f"llama.cpp's {model_type} loader expects the attention as wide as the hidden state "
            f"({config['hidden_size']}), and this model's is {config['num_attention_heads'] * head_dim} (KV groups "
            "were removed): prune its MLP channels and blocks for GGUF, not its attention."
        )
    if quantize in ("q8_0", "q4_0"):
        widths = {
            "hidden_size": config["hidden_size"],
            "intermediate_size": config["intermediate_size"],
            "attention width (heads x head_dim)": config["num_attention_heads"] * head_dim,
        }
        odd = {name: width for name, width in widths.items() if width % NBITS_BLOCK}
        if odd:
            named = ", ".join(f"{name} {width}" for name, width in odd.items())
            raise InputError(
                f"{quantize} stores blocks of {NBITS_BLOCK} input weights, and this model's {named} is not a multiple "
                f"of {NBITS_BLOCK}: llama.cpp would fall back to another type. Prune its MLP with --structure mlp=... "
                f"(the kept width is a multiple of align, {NBITS_BLOCK} by default), or export f16 or f32."
            )


def _tokenizer(folder: Path):
    """The tokenizer of ``folder`` as gguf's vocab: GPT-2 style byte-level BPE, else Llama's BPE with byte fallback."""
    from gguf.vocab import BpeVocab, LlamaHfVocab

    with suppress(FileNotFoundError, ValueError):  # not byte-level BPE: try Llama's
        return BpeVocab(folder)
    try:
        return LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError) as error:
        raise InputError(
            f"{folder} has no tokenizer.json that GGUF can hold (byte-level BPE, or BPE with byte fallback): {error}."
        ) from None


def _write_vocab(writer, folder: Path, vocab_size: int) -> None:
    """Tokens, scores and types (padded to the model's vocabulary as llama.cpp's converter pads), merges and the
    special tokens."""
    import gguf

    # gguf's readers warn about the separators of a tokenizer's pair template, which a GGUF does not use
    reader_log = logging.getLogger("gguf.vocab")
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)
    try:
        vocab = _tokenizer(folder)
        special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
    finally:
        reader_log.setLevel(level)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    special.add_to_gguf(writer)


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query or key projection from transformers' rotate-half order to llama.cpp's pairwise order (as
    llama.cpp's converter does)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def export_gguf(
    folder: str | os.PathLike, output: str | os.PathLike, *, quantize: str = "f32", overwrite: bool = False
) -> Path:
    """Write the saved model in ``folder`` (config.json, safetensors, tokenizer.json) to the GGUF file ``output``
    with its weight matrices in ``quantize`` (`GGUF_TYPES`); the file is written beside its place and moved there
    once complete, and an existing one is kept unless ``overwrite``. Returns the file's path."""
    folder, output = Path(folder), Path(output)
    if not (folder / "config.json").is_file():
        raise InputError(f"No saved model in {folder}: export_gguf reads a folder written by save_pretrained.")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    check_gguf_export(config, quantize)
    if output.is_dir() or output.suffix != ".gguf":
        raise InputError(f"{output} must be a file path ending in .gguf, e.g. {folder.name}-{quantize}.gguf.")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists: choose another file or pass overwrite=True (--overwrite).")
    output.parent.mkdir(parents=True, exist_ok=True)
    import gguf
    import torch

    from ..core.safetensors import SafetensorsCheckpoint
    from .files import current_umask

    checkpoint = SafetensorsCheckpoint(folder)  # one file or shards; each tensor read when it is written
    architecture = ARCHITECTURES[config["model_type"]]
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture.name)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, blocks)
    handle, staging = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staging, architecture.name)
        writer.add_name(config.get("_name_or_path") or folder.name)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(blocks)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)  # always: llama.cpp infers hidden/heads otherwise
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        rope = config.get("rope_parameters") or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(
            {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quantize]
        )  # fmt: skip
        _write_vocab(writer, folder, config["vocab_size"])
        head = "output.weight" if "lm_head.weight" in checkpoint.tensors else "token_embd.weight"  # the logits
        for key in checkpoint.tensors:
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise InputError(f"{key} of {folder} has no llama.cpp name for {architecture.name}.")
            data = checkpoint.read([key])[key].to(torch.float32).numpy()
            if architecture.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
                data = _permute(data, heads if name.endswith("attn_q.weight") else kv_heads)
            kind = HEAD_TYPE.get(quantize, quantize) if name == head else quantize
            _add_tensor(writer, name, data, getattr(gguf.GGMLQuantizationType, kind.upper()), gguf)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(staging, 0o666 & ~current_umask())  # as an ordinary new file (mkstemp's is private)
        os.replace(staging, output)
    finally:
        Path(staging).unlink(missing_ok=True)
    return output


def _add_tensor(writer, name: str, data: np.ndarray, qtype, gguf) -> None:
    """A weight matrix in ``qtype``; a vector (norm, bias) in f32, as llama.cpp's converter keeps them."""
    import numpy as np

    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
