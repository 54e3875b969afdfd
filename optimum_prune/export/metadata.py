"""Sparsity metadata stored in ``config.json`` under our own key (never ``quantization_config``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from ..config import PruningConfig
from ..errors import InputError
from ..report import PruningReport
from .files import read_json

METADATA_KEY = "optimum_prune"
METADATA_SCHEMA = 1
REQUIRED_KEYS = ("version", "method", "pattern", "target_sparsity", "global_sparsity", "layers")


def build_metadata(
    config: PruningConfig, report: PruningReport, recovery: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The metadata of a pruned model: recipe, calibration, achieved sparsity of every layer, structure and
    recovery training (``RecoveryReport.to_dict()``) when there were any."""
    from ..version import __version__

    return {
        "schema": METADATA_SCHEMA,
        "version": __version__,
        "method": config.method,
        "pattern": config.pattern,
        "allocation": config.allocation,
        "target_sparsity": config.sparsity,
        "global_sparsity": round(report.global_sparsity, 6),
        "block_sparsity": [round(s, 6) for s in report.block_sparsities],
        "layers": _layer_sparsities(report),
        "refit_errors": {
            layer.name: [round(error, 6) for error in layer.refit_error]
            for layer in report.layers
            if layer.refit_error is not None
        }
        or None,  # relative reconstruction error of each refitted layer, before and after the refit
        "gptq": config.gptq,  # the ONNX quantization the kept weights were rounded onto
        "calibration": {
            "dataset": config.dataset,
            "num_samples": config.num_samples,
            "seq_len": config.seq_len,
            "seed": config.seed,
        }
        if config.needs_calibration
        else None,
        "structure": report.structure,
        "left_dense_parameters": report.left_dense_parameters,
        "vision_parameters": report.vision_parameters,
        "expert_tokens": report.expert_tokens or None,
        "zero_shot": report.zero_shot,
        "speed": report.speed,
        "recovery": {key: value for key, value in recovery.items() if key != "losses"} if recovery else None,
        "config": config.to_dict(),
    }


def _layer_sparsities(report: PruningReport) -> dict[str, float | list[float]]:
    """Achieved sparsity by layer name; a fused experts parameter gets one list, a value per expert."""
    sparsities: dict[str, float | list[float]] = {}
    for layer in report.layers:
        if layer.expert is None:
            sparsities[layer.name] = round(layer.sparsity, 6)
        else:
            sparsities.setdefault(layer.name.rpartition(".")[0], []).append(round(layer.sparsity, 6))
    return sparsities


def read_metadata(source: PretrainedConfig | dict[str, Any] | str | os.PathLike) -> dict[str, Any] | None:
    """The pruning metadata of a model config (object, dict, ``config.json`` or its folder), or ``None`` if the
    model was not pruned by us. A malformed entry raises a clear error."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"No model config at {path}: expected a folder holding config.json.")
        source = read_json(path)
    data = source if isinstance(source, dict) else source.to_dict()
    metadata = data.get(METADATA_KEY)
    if metadata is None:
        return None
    missing = [key for key in REQUIRED_KEYS if key not in metadata] if isinstance(metadata, dict) else REQUIRED_KEYS
    if missing:
        raise InputError(
            f"The {METADATA_KEY!r} entry of this model config is malformed (missing {list(missing)}): it was not "
            "written by optimum-prune or was edited by hand."
        )
    return metadata
