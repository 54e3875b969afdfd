"""Recovery after pruning: training that keeps every pruned weight exactly zero."""

from .callback import SparsityCallback, check_masks_hold
from .train import RecoveryConfig, RecoveryReport, recover

__all__ = ["RecoveryConfig", "RecoveryReport", "SparsityCallback", "check_masks_hold", "recover"]
