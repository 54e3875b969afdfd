"""Which transformers auto class builds a model: a vision-language model (a config with a vision tower that
``AutoModelForImageTextToText`` maps) loads whole, vision tower and projector included; every other model
loads as a causal LM."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether ``config`` describes an image-text-to-text model with its own vision tower."""
    return (
        getattr(config, "vision_config", None) is not None
        and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def auto_model_class(config: PretrainedConfig) -> type:
    """``AutoModelForImageTextToText`` for a vision-language config, else ``AutoModelForCausalLM``."""
    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
