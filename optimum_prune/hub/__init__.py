"""Sharing pruned models on the Hugging Face Hub: model cards and one-commit uploads of saved folders."""

from .model_card import build_model_card
from .push import check_can_push, push_folder

__all__ = ["build_model_card", "check_can_push", "push_folder"]
