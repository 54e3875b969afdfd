"""Layerwise sparsity allocation: how the target sparsity is spread over the decoder blocks."""

from .owl import outlier_ratio, owl_sparsities

__all__ = ["outlier_ratio", "owl_sparsities"]
