"""Evaluation of pruned models."""

from .perplexity import perplexity

__all__ = ["perplexity"]
