"""Calibration data: texts from any source, turned into fixed-length token windows; image + text pairs, turned
into a vision-language model's inputs by its processor."""

from .images import has_images, image_text_inputs, load_pairs, load_processor
from .sampling import bos_token_id, calibration_ids, calibration_tokens
from .sources import load_texts

__all__ = [
    "bos_token_id",
    "calibration_ids",
    "calibration_tokens",
    "has_images",
    "image_text_inputs",
    "load_pairs",
    "load_processor",
    "load_texts",
]
