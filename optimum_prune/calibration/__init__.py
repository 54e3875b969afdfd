"""Calibration data: texts from any source, turned into fixed-length token windows."""

from .sampling import bos_token_id, calibration_ids, calibration_tokens
from .sources import load_texts

__all__ = ["bos_token_id", "calibration_ids", "calibration_tokens", "load_texts"]
