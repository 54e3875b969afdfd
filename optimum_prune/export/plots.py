"""The pictures of a pruned model, written beside the weights and shown in the model card: achieved sparsity per
block and layer kind, with each block's target (the OWL allocation when one was used), as ``sparsity.png``; and,
after recovery training, the held-out perplexity against training tokens, as ``recovery.png``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..report import PruningReport

logger = logging.getLogger(__name__)

PLOT_NAME = "sparsity.png"
RECOVERY_PLOT_NAME = "recovery.png"
KINDS = ("attention", "mlp", "experts")


def layer_kind(name: str) -> str:
    """``attention``, ``experts`` (a fused mixture-of-experts parameter) or ``mlp`` (every other layer)."""
    parts = name.split(".")
    if "experts" in parts:
        return "experts"
    return "attention" if any("attn" in part or "attention" in part for part in parts) else "mlp"


def _pyplot(name: str) -> Any:
    """matplotlib's pyplot on the file backend, or ``None`` (and a log line naming ``name``) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("No %s: drawing it needs matplotlib (pip install matplotlib).", name)
        return None
    return plt


def write_recovery_plot(recovery: dict[str, Any], path: str | Path) -> bool:
    """Draw the held-out perplexity of recovery training (``eval_perplexity`` of `RecoveryReport.to_dict`)
    against training tokens into ``path``; ``False`` when it has fewer than two points or matplotlib is missing."""
    curve = recovery.get("eval_perplexity") or []
    if len(curve) < 2:
        return False
    plt = _pyplot(RECOVERY_PLOT_NAME)
    if plt is None:
        return False
    tokens_per_step = recovery["tokens"] / max(recovery["steps"], 1)
    figure, axes = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    axes.plot([step * tokens_per_step for step, _ in curve], [value for _, value in curve], marker="o")
    axes.set_xlabel("training tokens")
    axes.set_ylabel("held-out perplexity")
    axes.set_yscale("log")
    axes.set_title(f"Recovery ({recovery['loss']}): {curve[0][1]:.2f} -> {curve[-1][1]:.2f}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def write_sparsity_plot(report: PruningReport, path: str | Path) -> bool:
    """Draw ``report``'s achieved sparsity per block (bars by layer kind, weighted by size) and target (line)
    into ``path``; ``False`` (and a log line) when there is nothing to draw or matplotlib is not installed."""
    if not report.layers or report.global_sparsity == 0:
        return False
    plt = _pyplot(PLOT_NAME)
    if plt is None:
        return False
    blocks = sorted({layer.block for layer in report.layers})
    totals: dict[tuple[str, int], list[float]] = {}
    for layer in report.layers:
        zeros, size = totals.setdefault((layer_kind(layer.name), layer.block), [0.0, 0.0])
        totals[(layer_kind(layer.name), layer.block)] = [zeros + layer.sparsity * layer.numel, size + layer.numel]
    kinds = [kind for kind in KINDS if any(key[0] == kind for key in totals)]
    width = 0.8 / len(kinds)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * len(blocks) + 2), 3.6), dpi=110)
    for position, kind in enumerate(kinds):
        values = [totals[(kind, b)][0] / totals[(kind, b)][1] if (kind, b) in totals else 0.0 for b in blocks]
        axes.bar([b - 0.4 + width * (position + 0.5) for b in blocks], values, width, label=kind)
    axes.plot(
        blocks, report.block_sparsities, color="black", marker=".", linewidth=1, label=f"target ({report.allocation})"
    )
    axes.set_xlabel("decoder block")
    axes.set_ylabel("sparsity")
    axes.set_ylim(0, min(1.05, max(report.block_sparsities + [0.0]) + 0.3))
    axes.set_title(f"{report.method} {report.pattern}: {report.global_sparsity:.1%} of the target weights are zero")
    axes.legend(loc="upper center", fontsize=8, ncol=len(kinds) + 1, frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
