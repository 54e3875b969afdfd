"""Sharing pruned models on the Hugging Face Hub: model cards and one-commit uploads."""

from .model_card import build_model_card
from .push import push_to_hub

__all__ = ["build_model_card", "push_to_hub"]
