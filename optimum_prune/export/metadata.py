"""Sparsity metadata stored in ``config.json`` under our own key (never ``quantization_config``)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..config import PruningConfig
from ..report import PruningReport

METADATA_KEY = "optimum_prune"


def build_metadata(config: PruningConfig, report: PruningReport) -> dict[str, Any]:
    """The metadata of a pruned model: recipe, calibration, achieved sparsity of every layer."""
    from .. import __version__

    return {
        "version": __version__,
        "method": config.method,
        "pattern": config.pattern,
        "allocation": config.allocation,
        "target_sparsity": config.sparsity,
        "global_sparsity": round(report.global_sparsity, 6),
        "block_sparsity": [round(s, 6) for s in report.block_sparsities],
        "layers": {layer.name: round(layer.sparsity, 6) for layer in report.layers},
        "calibration": {
            "dataset": config.dataset,
            "num_samples": config.num_samples,
            "seq_len": config.seq_len,
            "seed": config.seed,
        }
        if config.needs_calibration
        else None,
        "config": config.to_dict(),
    }


def read_metadata(config: PretrainedConfig | dict[str, Any]) -> dict[str, Any] | None:
    """The pruning metadata of a model config, or ``None`` if the model was not pruned by us."""
    data = config if isinstance(config, dict) else config.to_dict()
    return data.get(METADATA_KEY)
