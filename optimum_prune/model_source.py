"""What a model argument names, a local folder or a Hub id: checked before any weight is read, then loaded
(with its tokenizer) for pruning."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from .core.auto import auto_model_class, is_vision_language
from .core.safetensors import read_header
from .engine.offload import DiskOffload, load_empty_model
from .errors import InputError

logger = logging.getLogger(__name__)

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def looks_like_path(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local path rather than a Hub id (``"name"`` or ``"owner/name"``): it exists,
    is absolute, starts with ``.`` or ``~``, or has more than one ``/``."""
    text = os.fspath(source)
    return os.path.exists(text) or os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1


def _is_causal_lm_class(name: str) -> bool:
    """A decoder-only causal LM class, or a vision-language model's (its decoder generates the text)."""
    generative = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()
    )
    return name in generative or name.endswith(("ForCausalLM", "LMHeadModel"))


def check_causal_lm(config: PretrainedConfig, source: str) -> None:
    """Refuse a config that is not a decoder-only causal LM or a vision-language model around one (an encoder
    such as ``BertModel``, a seq2seq model)."""
    architectures = getattr(config, "architectures", None) or []
    if is_vision_language(config):
        causal = True
    elif architectures:
        causal = any(_is_causal_lm_class(name) for name in architectures)
    else:
        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.is_encoder_decoder
    if not causal:
        kind = ", ".join(architectures) or config.model_type
        raise InputError(
            f"{source} is a {kind} model, not a causal language model: optimum-prune prunes decoder-only models "
            "that AutoModelForCausalLM loads (Llama, Mistral, Qwen2, Gemma, Phi, OPT, GPT-NeoX, GPT-2...) and the "
            "language models of vision-language models (AutoModelForImageTextToText: Qwen2-VL, Gemma 3, LLaVA...)."
        )


def check_causal_lm_module(model: nn.Module) -> None:
    """The same check for a model that is already loaded."""
    check_no_adapters(model)
    name = type(model).__name__
    if not _is_causal_lm_class(name):
        raise InputError(
            f"{name} is not a causal language model: load it with AutoModelForCausalLM.from_pretrained, which "
            "adds the language-model head that pruning and evaluation need."
        )


def check_no_adapters(model: nn.Module) -> None:
    """Refuse a model carrying PEFT adapters: their matrices would be pruned as layers, and the base weights
    under them are not what the model computes."""
    adapters = [
        name for name, module in model.named_modules() if hasattr(module, "lora_A") or hasattr(module, "base_layer")
    ]
    if hasattr(model, "peft_config") or adapters:
        where = f" ({adapters[0]}, ...)" if adapters else ""
        raise InputError(
            f"The model carries PEFT adapters{where}: merge them into its weights first (model = "
            "model.merge_and_unload()), or prune the base model and train adapters afterwards (recover(lora=True))."
        )


def load_model_config(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> PretrainedConfig:
    """The config of a local folder or Hub repository, checked to be a causal LM; errors name the fix."""
    text = os.fspath(source)
    if looks_like_path(text) and not os.path.isdir(text):
        raise FileNotFoundError(
            f"No model folder at {text}: pass an existing folder, or a Hub id such as 'HuggingFaceTB/SmolLM2-135M'."
        )
    if os.path.isdir(text) and gguf_file is None and not os.path.isfile(os.path.join(text, "config.json")):
        raise FileNotFoundError(
            f"{text} has no config.json: pass a model folder written by save_pretrained (config.json and "
            "*.safetensors weights)."
        )
    kwargs: dict[str, Any] = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(text, **kwargs)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise InputError(
                f"{text} needs its own code to load (a custom architecture): pass trust_remote_code=True "
                "(--trust-remote-code) if you trust that repository."
            ) from error
        raise
    except OSError as error:
        where = "folder" if os.path.isdir(text) else "Hub repository (no local folder has that name)"
        raise OSError(f"Could not read a model config from the {where} {text!r}: {error}") from error
    check_causal_lm(config, text)
    return config


def check_local_weights(folder: str | os.PathLike, allow_unsafe_weights: bool = False) -> None:
    """Before loading a local folder: every safetensors file is whole (a truncated one is named), and a folder
    that holds only pickled weights is refused unless ``allow_unsafe_weights``."""
    folder = Path(folder)
    safetensors = sorted(folder.glob("*.safetensors"))
    for path in safetensors:
        read_header(path)
    if safetensors:
        return
    pickled = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLED_SUFFIXES)
    if not pickled:
        raise FileNotFoundError(f"{folder} holds no model weights: expected *.safetensors files.")
    if not allow_unsafe_weights:
        raise OSError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}), which can run code when loaded: pass "
            "allow_unsafe_weights=True (--allow-unsafe-weights) if you trust them, or convert them to safetensors."
        )


def dequantized_gguf_model(model: PreTrainedModel) -> PreTrainedModel:
    """A plain copy of a model loaded with ``gguf_file=``.

    transformers dequantizes GGUF weights on load but still marks the model as quantized (its modules may be
    GGUF wrappers, and ``save_pretrained`` refuses it); the copy is built from the same config without
    ``quantization_config`` and holds the dequantized weights in ordinary ``nn.Linear`` layers.
    """
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    state_dict = model.state_dict()
    del config.quantization_config
    plain = auto_model_class(config).from_config(config, dtype=next(iter(state_dict.values())).dtype)
    plain.load_state_dict(state_dict)
    plain.generation_config = model.generation_config
    return plain.eval()


def load_source(
    source: str,
    *,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    dtype: str | torch.dtype = "auto",
    offload: str | None = None,
    trust_remote_code: bool = False,
    allow_unsafe_weights: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, DiskOffload | None]:
    """The checked model of a folder or Hub id and its tokenizer; with ``offload="disk"`` the model is on the
    meta device and the returned `DiskOffload` fills it block by block."""
    hub = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    gguf_file = model_kwargs.get("gguf_file")
    config = load_model_config(source, **hub, gguf_file=gguf_file)
    if os.path.isdir(source) and gguf_file is None:
        check_local_weights(source, allow_unsafe_weights)
    tokenizer_kwargs = dict(hub)
    if gguf_file is not None and tokenizer is None:
        tokenizer_kwargs["gguf_file"] = gguf_file
    tokenizer = load_tokenizer(source if tokenizer is None else tokenizer, **tokenizer_kwargs)
    if offload != "disk":
        model_class = auto_model_class(config)
        return _load_model(source, model_class, dtype, allow_unsafe_weights, hub, model_kwargs), tokenizer, None
    if model_kwargs:
        raise InputError(f"offload='disk' reads safetensors checkpoints only; drop {', '.join(model_kwargs)}.")
    model, disk = load_empty_model(local_snapshot(source, revision, token), dtype, trust_remote_code)
    return model, tokenizer, disk


def _load_model(
    source: str,
    model_class: type,
    dtype: str | torch.dtype,
    allow_unsafe_weights: bool,
    hub: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> PreTrainedModel:
    """The model of a checked source by ``model_class`` (an auto class), in eval mode (GGUF weights dequantized into a plain model)."""
    load_kwargs = dict(hub)
    if not allow_unsafe_weights and "gguf_file" not in model_kwargs:
        load_kwargs["use_safetensors"] = True
    try:
        model = model_class.from_pretrained(source, dtype=dtype, **load_kwargs, **model_kwargs)
    except OSError as error:
        pickled_only = "safetensors" in str(error).replace(source, "").lower() and not os.path.isdir(source)
        hint = (
            " It may ship only pickled weights: pass allow_unsafe_weights=True (--allow-unsafe-weights) if you trust it."
            if pickled_only
            else ""
        )
        raise OSError(f"Could not load a causal LM from {source!r}: {error}{hint}") from error
    if "gguf_file" in model_kwargs:
        model = dequantized_gguf_model(model)
    return model.eval()


def local_snapshot(source: str, revision: str | None, token: str | bool | None) -> str:
    """``source`` if it is a folder, else the local snapshot of that Hub repository's configs and safetensors."""
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            source, revision=revision, token=token, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]
        )
    except Exception as error:
        raise OSError(
            f"offload='disk' needs the checkpoint on disk, but {source!r} is not a folder and could not be "
            f"downloaded ({type(error).__name__}). Download it first (hf download {source})."
        ) from error


def load_tokenizer(tokenizer: PreTrainedTokenizerBase | str | None, **kwargs: Any) -> PreTrainedTokenizerBase | None:
    """A tokenizer object as it is, else the one at a path or Hub id; ``None`` (with a warning) when none loads."""
    if tokenizer is None or isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    except (OSError, ValueError) as error:
        logger.warning(
            "No tokenizer in %s: calibration on text and evaluation need one; pass tokenizer= (--tokenizer).",
            tokenizer,
        )
        logger.info("The tokenizer could not be loaded: %s", error)
        return None


def load_teacher(source: str, like: torch.Tensor) -> PreTrainedModel:
    """The dense model of ``source`` (safetensors only) in the dtype and on the device of ``like``: the teacher
    of distillation, placed beside its student."""
    try:
        teacher_class = auto_model_class(AutoConfig.from_pretrained(source))
        teacher = teacher_class.from_pretrained(source, dtype=like.dtype, use_safetensors=True)
        return teacher.to(like.device).eval()
    except torch.OutOfMemoryError as error:
        raise RuntimeError(
            "The dense teacher does not fit beside the student: train with distill=False (--recover-loss lm), "
            "or with lora=True on a smaller batch."
        ) from error
