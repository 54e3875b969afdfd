"""Evaluation of pruned models."""

from .perplexity import Perplexity, evaluate_perplexity, perplexity

__all__ = ["Perplexity", "evaluate_perplexity", "perplexity"]
