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
from typing import TYPE_CHECKING, Any

from .arguments import CONFIG_FIELDS, flag

if TYPE_CHECKING:
    from ..config import PruningConfig

logger = logging.getLogger("optimum_prune.cli")


@dataclass
class Plan:
    """What the checked flags ask for."""

    config: PruningConfig
    explicit: set[str]  # config fields set by a flag or the --config file
    eval_texts: list[str] | None = None
    eval_name: str | None = None
    max_memory: dict[int | str, str] | None = None


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
    from ..engine.offload import OFFLOAD_MODES
    from ..methods import get_method

    try:
        get_method(config)
    except ValueError as error:
        parser.error(f"argument --method: {error}")
    if args.offload is not None and args.offload not in OFFLOAD_MODES:
        parser.error(f"argument --offload: unknown mode {args.offload!r}: choose one of {', '.join(OFFLOAD_MODES)}.")
    _check_device(args.device, parser)
    for name in ("eval_seq_len", "eval_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"argument {flag(name)}: must be a positive integer, got {value}.")
    _check_outputs(args, parser)
    plan = Plan(config, explicit, max_memory=_parse_max_memory(args.max_memory, parser))
    if args.dry_run:
        return plan
    if config.needs_calibration and not args.dataset:
        parser.error(
            f"argument --dataset: method {config.method!r} with {config.allocation} allocation needs calibration "
            "text: pass --dataset path/to/c4_sample.jsonl (or a Hub dataset name)."
        )
    if args.dataset and _looks_local(args.dataset) and not Path(args.dataset).is_file():
        parser.error(f"argument --dataset: no file at {args.dataset}.")
    if args.eval:
        from ..calibration import load_texts

        try:
            plan.eval_texts, plan.eval_name = load_texts(args.eval, text_column=args.text_column, split=args.eval_split)
        except (OSError, ValueError, TypeError) as error:
            parser.error(f"argument --eval: {error}")
    return plan


def streams_output(args: argparse.Namespace) -> bool:
    """Whether `Pruner.prune` writes --output itself, block by block and resumably (dense safetensors only)."""
    return bool(args.output) and "compressed" not in args.export and not args.save_masks


def _check_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that need --output, and combinations the chosen offload or resume cannot serve."""
    needs_output = {
        "--resume": args.resume,
        "--export onnx": "onnx" in args.export,
        "--offload disk": args.offload == "disk",
        "--save-masks": args.save_masks,
        "--export compressed": "compressed" in args.export and not args.push_to_hub,
    }
    for name, asked in needs_output.items():
        if asked and not args.output and not args.dry_run:
            parser.error(f"argument {name.split()[0]}: {name} writes to a folder: pass --output DIR.")
    if args.offload == "disk":
        in_memory = {"--eval": args.eval, "--export": "compressed" in args.export, "--save-masks": args.save_masks}
        in_memory["--push-to-hub"] = args.push_to_hub
        for name, asked in in_memory.items():
            if asked:
                parser.error(
                    f"argument {name}: needs the whole pruned model in memory, which --offload disk never holds: "
                    "use --offload cpu, or load the saved --output folder afterwards (optimum_prune.load_pruned)."
                )
    if args.resume and not streams_output(args):
        parser.error(
            "argument --resume: resuming writes dense safetensors block by block; drop --export compressed "
            "and --save-masks."
        )
    if args.output:
        from ..engine.checkpoint import STATE, work_folder
        from ..export.files import check_writable

        try:
            check_writable(args.output, args.overwrite)
        except FileExistsError as error:
            parser.error(f"argument --output: {error}")
        folder = work_folder(args.output, args.offload_folder)
        if streams_output(args) and not args.resume and (folder / STATE).is_file():
            parser.error(
                f"argument --output: {folder} holds an unfinished run for this output: add --resume to continue "
                "it, or delete that folder to start again."
            )


def _parse_max_memory(spec: str | None, parser: argparse.ArgumentParser) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", "cpu": "64GiB"}`` (accelerate's ``max_memory``)."""
    if spec is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    limits: dict[int | str, str] = {}
    for item in spec.split(","):
        key, separator, value = (part.strip() for part in item.partition("="))
        try:
            if not separator or not key:
                raise ValueError("expected DEVICE=SIZE")
            convert_file_size_to_int(value)
        except ValueError as error:
            parser.error(
                f"argument --max-memory: cannot read {item.strip()!r} ({error}): use DEVICE=SIZE pairs separated "
                "by commas, e.g. '0=20GiB,cpu=64GiB'."
            )
        limits[int(key) if key.isdigit() else key] = value
    return limits


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[PruningConfig, set[str]]:
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


def cap_seq_len(plan: Plan, context: int | None) -> None:
    """Without an explicit seq_len, calibrate on at most the model's context."""
    if "seq_len" not in plan.explicit and context and plan.config.seq_len > context:
        logger.info("Calibration seq_len capped at the model's context, %d tokens.", context)
        plan.config.seq_len = context


def execute(args: argparse.Namespace, plan: Plan) -> None:
    """Load (or only estimate), evaluate, prune, evaluate again, print the summary, save, export and push."""
    import torch

    from ..evaluation import perplexity
    from ..pruner import Pruner

    config = plan.config
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.dry_run:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        cap_seq_len(plan, getattr(model_config, "max_position_embeddings", None))
        estimate = Pruner.estimate(
            args.model,
            config,
            device=args.device,
            offload=args.offload,
            dtype=dtype,
            trust_remote_code=args.trust_remote_code,
            offload_activations=args.offload_activations,
        )
        print(f"dry run of {config.method} {config.pattern} at {config.sparsity:g} on {args.model}: {estimate}")
        return
    pruner = Pruner.from_pretrained(
        args.model,
        config,
        device=args.device,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        allow_unsafe_weights=args.allow_unsafe_weights,
        offload=args.offload,
        offload_folder=args.offload_folder,
        max_memory=plan.max_memory,
        offload_activations=args.offload_activations,
    )
    cap_seq_len(plan, getattr(pruner.model.config, "max_position_embeddings", None))
    if pruner.tokenizer is None and (config.needs_calibration or plan.eval_texts is not None):
        raise RuntimeError(f"No tokenizer could be loaded from {args.model}; calibration and --eval need one.")
    eval_seq_len = args.eval_seq_len or config.seq_len

    def evaluate() -> float:
        return perplexity(pruner.model, pruner.tokenizer, plan.eval_texts, eval_seq_len, args.eval_windows)

    before = evaluate() if plan.eval_texts is not None else None
    stream = streams_output(args)
    report = pruner.prune(
        args.dataset,
        text_column=args.text_column,
        split=args.dataset_split,
        output_dir=args.output if stream else None,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    after = evaluate() if plan.eval_texts is not None else None

    print(report.table())
    if before is not None:
        windows = f"first {args.eval_windows} windows" if args.eval_windows else "all windows"
        print(
            f"perplexity on {plan.eval_name} ({windows} of {eval_seq_len} tokens): dense {before:.3f} -> pruned {after:.3f}"
        )
    save_format = "compressed" if "compressed" in args.export else "dense"
    if args.output and not stream:
        pruner.save_pretrained(args.output, overwrite=args.overwrite, format=save_format, save_masks=args.save_masks)
    if args.output:
        print(f"saved ({save_format}) to {args.output}")
    if "onnx" in args.export:
        from ..export.onnx import export_onnx

        source = args.output if args.offload == "disk" else pruner.model
        onnx_dir = export_onnx(source, Path(args.output) / "onnx", tokenizer=pruner.tokenizer)
        print(f"ONNX model written to {onnx_dir}")
    if args.push_to_hub:
        scores = None if before is None else {"dataset": plan.eval_name, "before": before, "after": after}
        commit = pruner.push_to_hub(args.push_to_hub, private=args.private, format=save_format, perplexity=scores)
        print(f"pushed to {commit.commit_url}")
