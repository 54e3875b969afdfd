"""Load what `Pruner.save_pretrained` wrote: the model (dense or compressed) and its pruning masks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from ..core.auto import auto_model_class, is_vision_language
from ..errors import InputError
from .compressed import INDEX_NAME, is_compressed, load_compressed_state_dict, read_compressed_masks
from .masks import MASKS_NAME, Masks, read_masks
from .metadata import read_metadata

logger = logging.getLogger(__name__)


def _local_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} is not a local folder: load_pruned reads a folder written by "
            "Pruner.save_pretrained; download a Hub repository first with huggingface_hub.snapshot_download."
        )
    return folder


def load_pruned(
    path: str | os.PathLike, *, allow_unsafe_weights: bool = False, **from_pretrained_kwargs: Any
) -> PreTrainedModel:
    """Load a pruned model saved in the dense or the compressed format; compressed weights are decoded bit-exactly.

    Keyword arguments go to ``from_pretrained`` (``dtype``, ``device_map``...). A folder without pruning
    metadata still loads, as a plain model, with a warning. Weights load only from safetensors unless
    ``allow_unsafe_weights=True``; ``trust_remote_code`` stays off unless passed.
    """
    folder = _local_folder(path)
    if read_metadata(folder) is None:
        logger.warning("%s has no optimum-prune metadata in its config.json: loading it as a plain model.", folder)
    trust_remote_code = from_pretrained_kwargs.pop("trust_remote_code", False)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if not is_compressed(folder):
        if not allow_unsafe_weights:
            from_pretrained_kwargs.setdefault("use_safetensors", True)
        return auto_model_class(config).from_pretrained(
            folder, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
        )
    mapping = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING if is_vision_language(config) else MODEL_FOR_CAUSAL_LM_MAPPING
    model_class = mapping.get(type(config), None)
    if model_class is None:
        raise InputError(
            f"{folder} holds a {type(config).__name__}, which is not a built-in transformers causal LM: write it "
            "back as dense safetensors with optimum_prune.decompress and load that with AutoModelForCausalLM."
        )
    state_dict = load_compressed_state_dict(folder)
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **from_pretrained_kwargs)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config.name_or_path = os.fspath(folder)
    return model


def load_masks(path: str | os.PathLike) -> Masks:
    """The pruning masks of a saved model: ``{parameter name: bool tensor}`` (``True`` = pruned).

    Reads ``sparsity_masks.safetensors`` (written with ``save_masks=True``), else the sparse encodings of a
    compressed folder; ``path`` may also be the masks file itself. Re-apply them with
    `optimum_prune.apply_masks` to keep a fine-tuned model sparse.
    """
    path = Path(path)
    if path.is_file():
        return read_masks(path)
    folder = _local_folder(path)
    if (folder / MASKS_NAME).is_file():
        return read_masks(folder / MASKS_NAME)
    if is_compressed(folder):
        return read_compressed_masks(folder)
    raise FileNotFoundError(
        f"{folder} has no pruning masks: it has neither {MASKS_NAME} nor {INDEX_NAME}. Save the model with "
        "Pruner.save_pretrained(..., save_masks=True) or format='compressed' to keep them; zeros in dense "
        "weights do not tell pruned weights from kept ones that happen to be zero."
    )
