"""Calibration data: texts from any source, turned into fixed-length token windows."""

from .sampling import calibration_ids
from .sources import load_texts

__all__ = ["calibration_ids", "load_texts"]
