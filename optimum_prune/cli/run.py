"""Run a parsed ``prune`` command: check the flags, prune, evaluate, print the summary, save.

Exit codes: 0 success, 2 bad arguments (``parser.error`` naming the flag, before anything is loaded),
1 runtime failure (one line; the traceback only with ``--verbose``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arguments import CONFIG_FIELDS, flag

logger = logging.getLogger("optimum_prune.cli")


@dataclass
class Plan:
    """What the checked flags ask for."""

    config: Any  # PruningConfig
    explicit: set[str]  # config fields set by a flag or the --config file
    eval_texts: list[str] | None = None
    eval_name: str | None = None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute the command and return its exit code (``parser.error`` exits with 2 on bad flags)."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    plan = check(args, parser)
    try:
        execute(args, plan)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.verbose:
            traceback.print_exc()
        cause = " ".join(str(error).split()) or "no message"
        hint = "" if args.verbose else " (rerun with --verbose for the traceback)"
        print(f"{parser.prog}: error: {type(error).__name__}: {cause}{hint}", file=sys.stderr)
        return 1
    return 0


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    """Validate the flags before any model is loaded; a bad one exits 2 with a message naming it."""
    config, explicit = build_config(args, parser)
    from ..methods import get_method

    try:
        get_method(config)
    except ValueError as error:
        parser.error(f"argument --method: {error}")
    if config.needs_calibration and not args.dataset:
        parser.error(
            f"argument --dataset: method {config.method!r} with {config.allocation} allocation needs calibration "
            "text: pass --dataset path/to/c4_sample.jsonl (or a Hub dataset name)."
        )
    if args.dataset and _looks_local(args.dataset) and not Path(args.dataset).is_file():
        parser.error(f"argument --dataset: no file at {args.dataset}.")
    _check_device(args.device, parser)
    for name in ("eval_seq_len", "eval_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"argument {flag(name)}: must be a positive integer, got {value}.")
    if args.output:
        from ..export.files import check_writable

        try:
            check_writable(args.output, args.overwrite)
        except FileExistsError as error:
            parser.error(f"argument --output: {error}")
    plan = Plan(config, explicit)
    if args.eval:
        from ..calibration import load_texts

        try:
            plan.eval_texts, plan.eval_name = load_texts(args.eval, text_column=args.text_column, split=args.eval_split)
        except (OSError, ValueError, TypeError) as error:
            parser.error(f"argument --eval: {error}")
    return plan


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Any, set[str]]:
    """The `PruningConfig` of the --config file overridden by the config flags.

    Flags are applied one at a time, so that the first one `PruningConfig` rejects is the one named.
    """
    from ..config import CONFIG_NAME, PruningConfig

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        path = path / CONFIG_NAME if path.is_dir() else path
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(values, dict):
                raise ValueError(f"{path} must hold a JSON object of PruningConfig fields.")
            PruningConfig.from_dict(values)
        except (OSError, ValueError, TypeError) as error:
            parser.error(f"argument --config: {error}")
    for field in CONFIG_FIELDS:
        value = getattr(args, field)
        if value is None:
            continue
        candidate = {**values, field: value}
        try:
            PruningConfig.from_dict(candidate)
        except (ValueError, TypeError) as error:
            parser.error(f"argument {flag(field)}: {error}")
        values = candidate
    return PruningConfig.from_dict(values), set(values)


def _looks_local(source: str) -> bool:
    from ..calibration.sources import LOCAL_FORMATS

    return Path(source).suffix.lower() in LOCAL_FORMATS or os.sep in source or source.startswith(".")


def _check_device(device: str | None, parser: argparse.ArgumentParser) -> None:
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        parser.error(f"argument --device: {error}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {device!r} asked for, but no CUDA device is available; use --device cpu.")


def execute(args: argparse.Namespace, plan: Plan) -> None:
    """Load, evaluate, prune, evaluate again, print the summary and save."""
    import torch

    from ..evaluation import perplexity
    from ..pruner import Pruner

    config = plan.config
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    pruner = Pruner.from_pretrained(
        args.model,
        config,
        device=args.device,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        allow_unsafe_weights=args.allow_unsafe_weights,
    )
    context = getattr(pruner.model.config, "max_position_embeddings", None)
    if "seq_len" not in plan.explicit and context and config.seq_len > context:
        logger.info("Calibration seq_len capped at the model's context, %d tokens.", context)
        config.seq_len = context
    if pruner.tokenizer is None and (config.needs_calibration or plan.eval_texts is not None):
        raise RuntimeError(f"No tokenizer could be loaded from {args.model}; calibration and --eval need one.")

    def evaluate() -> float:
        return perplexity(
            pruner.model,
            pruner.tokenizer,
            plan.eval_texts,
            seq_len=args.eval_seq_len or config.seq_len,
            max_windows=args.eval_windows,
        )

    before = evaluate() if plan.eval_texts is not None else None
    report = pruner.prune(args.dataset, text_column=args.text_column, split=args.dataset_split)
    after = evaluate() if plan.eval_texts is not None else None

    print(report.table())
    if before is not None:
        windows = f"{args.eval_windows} windows" if args.eval_windows else "all windows"
        print(
            f"perplexity on {plan.eval_name} ({windows} of {args.eval_seq_len or config.seq_len} tokens): "
            f"dense {before:.3f} -> pruned {after:.3f}"
        )
    if args.output:
        pruner.save_pretrained(args.output, overwrite=args.overwrite)
        print(f"saved to {args.output}")
