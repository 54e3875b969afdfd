"""Run a parsed ``prune`` command: check the flags, prune, evaluate, print the summary, save.

Exit codes: 0 success, 2 bad arguments (``parser.error`` naming the flag, before anything is loaded, or an
`InputError` the library raised once it could see the model), 1 runtime failure (one line; the traceback only
with ``--verbose``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..method_settings import GPTQ_BITS, ReconstructionSettings, all_settings_fields
from .arguments import CONFIG_FIELDS, flag, reconstruct_flag

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ..config import PruningConfig
    from ..evaluation.harness import ZeroShotTasks
    from ..pruner import Pruner
    from ..report import PruningReport

logger = logging.getLogger("optimum_prune.cli")
RECONSTRUCTION_FIELDS = dataclasses.fields(ReconstructionSettings)


@dataclass
class Plan:
    """What the checked flags ask for."""

    config: PruningConfig
    explicit: set[str]  # config fields set by a flag or the --config file
    model_config: PretrainedConfig
    eval_texts: list[str] | None = None
    eval_name: str | None = None
    max_memory: dict[int | str, str] | None = None
    tasks: ZeroShotTasks | None = None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute the command and return its exit code (``parser.error`` exits with 2 on bad flags)."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.captureWarnings(True)  # warnings go through logging, which tqdm's bars leave room for
    from ..engine.distributed import launched_by_torchrun

    other_rank = launched_by_torchrun() and os.environ.get("RANK", "0") != "0"
    with contextlib.redirect_stderr(io.StringIO()) if other_rank else contextlib.nullcontext():
        plan = check(args, parser)  # under torchrun every rank refuses alike, and rank 0 says so
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ..engine.distributed import Ranks, init_from_environment

    try:
        ranks = init_from_environment(args.device)
        if ranks.distributed and (args.device or "cpu").startswith("cuda"):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        # under torchrun, rank 0 prints the summary; every rank prints its errors
        output = contextlib.nullcontext() if ranks.main else contextlib.redirect_stdout(io.StringIO())
        with logging_redirect_tqdm(), output:
            execute(args, plan)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except (InputError, FileExistsError) as error:  # bad input found once loading began: as a bad flag
        if Ranks.current().main:  # every rank refuses alike; one says so
            print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.verbose:
            traceback.print_exc()
        cause = " ".join(str(error).split()) or "no message"
        hint = "" if args.verbose else " (rerun with --verbose for the traceback)"
        if launched_by_torchrun() and "peer" in cause.lower():
            hint = f"; another rank stopped (its error is above){_resume_hint(args) or ''}" + hint
        print(f"{parser.prog}: error: {type(error).__name__}: {cause}{hint}", file=sys.stderr)
        return 1
    return 0


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    """Validate the flags before any weight is loaded; a bad one exits 2 with a message naming it."""
    config, explicit = build_config(args, parser)
    from ..engine.offload import OFFLOAD_MODES

    if args.offload is not None and args.offload not in OFFLOAD_MODES:
        parser.error(f"argument --offload: unknown mode {args.offload!r}: choose one of {', '.join(OFFLOAD_MODES)}.")
    if args.recover_lora and args.recover_schedule == "gradual":
        parser.error("argument --recover-lora: gradual pruning trains every weight; drop it or use one-shot.")
    if args.recover_schedule == "gradual":
        from ..recovery.gradual import check_gradual

        try:
            check_gradual(config)
        except ValueError as error:
            parser.error(f"argument --recover-schedule: {error}")
    from ..engine.distributed import launched_by_torchrun

    if launched_by_torchrun():
        for name, given in (("recover_steps", args.recover_steps), ("structure", config.structure is not None)):
            if given:
                parser.error(f"argument {flag(name)}: it runs in one process; start it without torchrun.")
    if args.offload == "disk" and config.structure is not None and config.sparsity:
        parser.error(
            "argument --offload: with disk offload, a structure and unstructured sparsity are two runs (the second "
            "reads the smaller blocks from the first's output): prune with --structure, then prune that --output "
            "with --sparsity."
        )
    if args.device_map is not None:
        _check_device_map(args, config, parser)
    if config.gptq and args.dtype not in ("auto", "float32"):
        parser.error(
            f"argument --dtype: --gptq rounds onto a grid that {args.dtype} cannot hold: use --dtype float32 (the "
            "default with --gptq)."
        )
    if args.recover_steps and config.gptq:
        from ..config import gptq_with_training

        parser.error(f"argument --recover-steps: {gptq_with_training(config.gptq)}")
    if args.recover_steps and args.offload == "disk":
        parser.error("argument --recover-steps: training needs the model in memory; use --offload cpu.")
    _check_device(args.device, parser)
    names = ("eval_seq_len", "eval_windows", "eval_limit", "eval_batch_size", "recover_steps", "recover_batch_size")
    for name in (*names, "recover_seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"argument {flag(name)}: must be a positive integer, got {value}.")
    if args.recover_eval_windows < 0:
        parser.error(f"argument --recover-eval-windows: must be 0 or more, got {args.recover_eval_windows}.")
    model_config = _check_model(args, parser)
    if args.device_map is not None:
        _check_device_map_places(args, model_config, parser)
    from ..core.auto import is_vision_language

    if "onnx" in args.export and is_vision_language(model_config):
        from ..export.onnx import VISION_LANGUAGE_REFUSAL

        parser.error(f"argument --export onnx: {VISION_LANGUAGE_REFUSAL}")
    if args.benchmark and is_vision_language(model_config):
        parser.error(
            "argument --benchmark: bench times text decoding of causal LMs, and this is a vision-language model "
            "(its speed depends on its images): drop --benchmark."
        )
    if args.processor and not is_vision_language(model_config):
        parser.error(
            f"argument --processor: {args.model} is a text model (no vision tower): a processor is for image + text "
            "calibration of a vision-language model; drop --processor."
        )
    if config.structure is not None:
        _check_structure(config, model_config, args.trust_remote_code, parser)
    context = getattr(model_config, "max_position_embeddings", None)
    if args.eval_seq_len and context and args.eval_seq_len > context:
        parser.error(
            f"argument --eval-seq-len: {args.eval_seq_len} tokens is longer than the model's context of {context}: "
            f"use at most {context}."
        )
    _check_refining_flags(args, parser)
    _check_outputs(args, parser)
    if "gguf" in args.export or args.gguf_type:
        _check_gguf(args, config, model_config, parser)
    if args.push_to_hub and not args.dry_run:
        _check_push(parser)
    if args.resume:
        _check_resume_matches(args, config, parser)
    if args.resume and _resumes_training(args):
        from ..recovery.gradual import check_same_schedule, schedule_settings

        try:
            check_same_schedule(_training_work_dir(args), schedule_settings(config, args.recover_steps, None))
        except ValueError as error:
            parser.error(f"argument --resume: {error}")
    plan = Plan(config, explicit, model_config, max_memory=_parse_max_memory(args.max_memory, parser))
    if args.dry_run:
        return plan
    if config.needs_calibration and not args.dataset and args.recover_schedule != "gradual":  # gradual: none
        parser.error(
            f"argument --dataset: {config.calibration_needed_by} needs calibration text: pass --dataset "
            "path/to/c4_sample.jsonl (or a Hub dataset name)."
        )
    if args.dataset:
        _read_texts(parser, "--dataset", args.dataset, args.text_column, args.dataset_split)
        _check_image_calibration(args, model_config, parser)
    if args.recover_steps and not (args.recover_dataset or args.dataset):
        parser.error("argument --recover-steps: recovery needs training text: add --recover-dataset (or --dataset).")
    if args.recover_steps:
        _check_recovery(args, config, model_config, parser)
    if args.eval:
        plan.eval_texts, plan.eval_name = _read_texts(
            parser, "--eval", args.eval, args.eval_text_column, args.eval_split
        )
    plan.tasks = _check_tasks(args, parser)
    return plan


def gguf_types(args: argparse.Namespace, config: PruningConfig) -> list[str]:
    """--gguf-type, or its default: the --gptq grid when it is a GGUF one, else q8_0 (f16 where the model's widths
    cannot be q8_0: `_check_gguf` sets that)."""
    return args.gguf_type or [config.gptq if config.gptq in ("q4_0", "q8_0") else "q8_0"]


def _check_gguf(
    args: argparse.Namespace, config: PruningConfig, model_config: PretrainedConfig, parser: argparse.ArgumentParser
) -> None:
    """--export gguf: a model and widths the file can hold, before loading (the output's files are checked by
    --output's own rules)."""
    if "gguf" not in args.export:
        parser.error("argument --gguf-type: it chooses the GGUF weights; add --export gguf.")
    from ..export.gguf import FULL_WIDTH_ATTENTION, check_gguf_export

    if config.structure is not None and config.structure.attention and model_config.model_type in FULL_WIDTH_ATTENTION:
        parser.error(
            f"argument --structure: llama.cpp's {model_config.model_type} loader expects the attention as wide as the "
            "hidden state: with --export gguf, prune MLP channels and blocks, not attention."
        )
    output = model_config.to_dict()  # the widths the output will have: a structure's MLP is a multiple of align
    if config.structure is not None and (config.structure.mlp or config.structure.is_budget):
        output["intermediate_size"] = config.structure.align
    if not args.gguf_type and not config.gptq:  # the default q8_0 where the widths allow it, else f16
        try:
            check_gguf_export(output, "q8_0")
        except InputError as error:
            print(f"note: --export gguf writes f16 (no --gguf-type given, and q8_0 cannot hold this model: {error})",
                  file=sys.stderr)  # fmt: skip
            args.gguf_type = ["f16"]
        except ImportError:
            pass  # said below
    for kind in gguf_types(args, config):
        if kind not in ("f32", "f16") and config.structure is not None and config.structure.align % 32:
            parser.error(
                f"argument --structure: align={config.structure.align} leaves widths that {kind}'s blocks of 32 do "
                "not divide: use align=32 (or a multiple) with --export gguf."
            )
        try:
            check_gguf_export(output, kind)
        except (InputError, ImportError) as error:
            parser.error(f"argument --export gguf: {error}")
    if config.gptq in ("q4_0", "q8_0") and config.gptq not in gguf_types(args, config):
        logger.warning("--gptq %s rounds for the %s file; --gguf-type asks for others.", config.gptq, config.gptq)


def _check_image_calibration(
    args: argparse.Namespace, model_config: PretrainedConfig, parser: argparse.ArgumentParser
) -> None:
    """Image + text --dataset: every image readable and a processor that prepares images, before loading."""
    from ..calibration import has_images, load_pairs, load_processor
    from ..core.auto import is_vision_language

    if not has_images(args.dataset) or not is_vision_language(model_config):
        return  # a text model given images is refused by the Pruner, naming the model class
    try:
        load_pairs(args.dataset, args.text_column)
    except InputError as error:
        parser.error(f"argument --dataset: {error}")
    try:
        load_processor(args.processor or args.model)
    except InputError as error:
        parser.error(f"argument {'--processor' if args.processor else '--model'}: {error}")


def _check_recovery(
    args: argparse.Namespace, config: PruningConfig, model_config: PretrainedConfig, parser: argparse.ArgumentParser
) -> None:
    """Every recovery setting, before the model is loaded and pruned: the numbers, the context, LoRA's layers,
    and enough training text for the steps (tokenized with the model's tokenizer)."""
    from ..recovery.train import RecoveryConfig, training_windows

    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    seq_len = args.recover_seq_len or min(config.seq_len, context or config.seq_len)
    if context and seq_len > context:
        parser.error(f"argument --recover-seq-len: {seq_len} tokens is longer than the model's context of {context}.")
    try:
        recovery = RecoveryConfig(
            args.recover_steps, args.recover_lr, args.recover_batch_size, seq_len,
            lora=args.recover_lora, eval_windows=args.recover_eval_windows,
        )  # fmt: skip
    except ValueError as error:
        flag_of = {
            "learning_rate": "--recover-lr",
            "seq_len": "--recover-seq-len",
            "batch_size": "--recover-batch-size",
        }
        name = next((f for key, f in flag_of.items() if key in str(error)), "--recover-steps")
        parser.error(f"argument {name}: {error}")
    if args.recover_lora:
        _check_lora_layers(config, model_config, args.trust_remote_code, parser)
    tokenizer = _tokenizer_for_checks(args)
    source = args.recover_dataset or args.dataset
    if tokenizer is not None:
        try:
            training_windows(source, tokenizer, recovery, args.text_column, args.dataset_split)
        except (OSError, ValueError, TypeError) as error:
            parser.error(f"argument {'--recover-dataset' if args.recover_dataset else '--dataset'}: {error}")


def _check_lora_layers(
    config: PruningConfig, model_config: PretrainedConfig, trust_remote_code: bool, parser: argparse.ArgumentParser
) -> None:
    """--recover-lora: the check recovery makes of its LoRA targets, on a meta-device model, before loading."""
    from ..core.layers import find_target_layers
    from ..recovery.train import lora_targets

    model = _meta_model(model_config, trust_remote_code)
    names = [layer.name for block in find_target_layers(model, config.targets, config.ignore) for layer in block]
    try:
        lora_targets(model, {}, names)
    except ValueError as error:
        parser.error(
            f"argument --recover-lora: LoRA adapts nn.Linear layers ({error}): recover without --recover-lora (full "
            "fine-tuning keeps the masks), or leave those layers out with --ignore."
        )


def _meta_model(model_config: PretrainedConfig, trust_remote_code: bool):
    """A model of ``model_config`` on the meta device: its structure, no weights."""
    from accelerate import init_empty_weights

    from ..core.auto import auto_model_class

    with init_empty_weights():
        return auto_model_class(model_config).from_config(model_config, trust_remote_code=trust_remote_code)


def _tokenizer_for_checks(args: argparse.Namespace):
    """The tokenizer of --tokenizer or --model (small; loaded again with the model), or ``None`` when it cannot
    be loaded here (the run says so once it loads the model)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    except (OSError, ValueError):
        return None


# A flag that only refines another (the one named) is refused without it: one rule for every such flag.
REFINES = {
    "recover_dataset": "recover_steps",
    "recover_lr": "recover_steps",
    "recover_batch_size": "recover_steps",
    "recover_seq_len": "recover_steps",
    "recover_lora": "recover_steps",
    "recover_eval_windows": "recover_steps",
    "recover_loss": "recover_steps",
    "recover_schedule": "recover_steps",
    "eval_split": "eval",
    "eval_text_column": "eval",
    "eval_seq_len": "eval",
    "eval_windows": "eval",
    "eval_limit": "eval_tasks",
    "eval_batch_size": "eval_tasks",
    "onnx_quantize_head": "onnx_quantize",
    "eval_task_data": "eval_tasks",
    "eval_include": "eval_tasks",
    "private": "push_to_hub",
    "overwrite": "output",
}
WHAT_IT_SETS_UP = {
    "recover_steps": "it sets up recovery training; add --recover-steps N.",
    "eval": "it sets up the perplexity evaluation; add --eval TEXT.",
    "eval_tasks": "it sets up zero-shot tasks; add --eval-tasks TASK[,TASK...].",
    "push_to_hub": "it makes the --push-to-hub repository private; add --push-to-hub REPO.",
    "output": "it lets --output replace a non-empty folder; add --output DIR.",
    "onnx_quantize": "it quantizes the LM head of the ONNX export too; add --onnx-quantize int8|int4.",
}


def _check_refining_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse a flag given without the flag it refines (it would be ignored)."""
    for name, needed in REFINES.items():
        if getattr(args, name) != parser.get_default(name) and not getattr(args, needed):
            parser.error(f"argument {flag(name)}: {WHAT_IT_SETS_UP[needed]}")
    if args.benchmark and not args.output:
        parser.error("argument --benchmark: it times the saved output; add --output DIR.")
    if args.onnx_quantize and "onnx" not in args.export:
        parser.error("argument --onnx-quantize: it quantizes the ONNX export; add --export onnx.")
    if args.eval_tasks is not None and not [name for name in args.eval_tasks.split(",") if name.strip()]:
        parser.error("argument --eval-tasks: names no task: give TASK[,TASK...], e.g. hellaswag_local.")


def _check_tasks(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ZeroShotTasks | None:
    """The --eval-tasks, resolved and with their data loaded (``None`` without the flag)."""
    if not args.eval_tasks:
        return None
    if args.offload == "disk":
        parser.error("argument --eval-tasks: the tasks run on the model in memory; use --offload cpu.")
    try:
        data = dict(_key_value(item) for item in args.eval_task_data or [])
    except ValueError as error:
        parser.error(f"argument --eval-task-data: {error}")
    from ..evaluation.harness import ZeroShotTasks

    names = [name.strip() for name in args.eval_tasks.split(",") if name.strip()]
    try:
        return ZeroShotTasks(names, task_data=data, include=args.eval_include, limit=args.eval_limit)
    except (ImportError, ValueError, FileNotFoundError) as error:
        named = {"--eval-include": args.eval_include or [], "--eval-task-data": list(data.values())}
        culprit = next((name for name, paths in named.items() if any(str(p) in str(error) for p in paths)), None)
        parser.error(f"argument {culprit or '--eval-tasks'}: {error}")


def _key_value(item: str) -> tuple[str, str]:
    key, separator, value = item.partition("=")
    if not separator or not key or not value:
        raise ValueError(f"cannot read {item!r}: use TASK=FILE, e.g. hellaswag_local=hellaswag_val.jsonl.")
    return key, value


def _read_texts(
    parser: argparse.ArgumentParser, name: str, source: str, column: str, split: str
) -> tuple[list[str], str]:
    """The texts of --dataset or --eval, read by the one rule both share (a local file, else a Hub dataset)."""
    from ..calibration import load_texts

    try:
        return load_texts(source, text_column=column, split=split)
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"argument {name}: {error}")


def _check_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> PretrainedConfig:
    """--model's config (a causal LM) and, for a local folder, whole weight files: checked before loading."""
    from ..model_source import check_local_weights, load_model_config, looks_like_path

    if args.tokenizer and looks_like_path(args.tokenizer) and not os.path.isdir(args.tokenizer):
        parser.error(f"argument --tokenizer: no tokenizer folder at {args.tokenizer}.")
    if args.processor and looks_like_path(args.processor) and not os.path.isdir(args.processor):
        parser.error(f"argument --processor: no processor folder at {args.processor}.")
    try:
        model_config = load_model_config(args.model, trust_remote_code=args.trust_remote_code)
        if os.path.isdir(args.model):
            check_local_weights(args.model, args.allow_unsafe_weights)
    except (OSError, ValueError) as error:
        parser.error(f"argument --model: {error}")
    return model_config


def _check_structure(
    config: PruningConfig, model_config: PretrainedConfig, trust_remote_code: bool, parser: argparse.ArgumentParser
) -> None:
    """--structure against a meta-device model of --model's config: a structure the model cannot express is
    refused before any weight is loaded."""
    from ..core.layers import find_target_layers
    from ..engine.budget import candidate_mixes
    from ..structured.plan import plan_structure

    model = _meta_model(model_config, trust_remote_code)
    try:
        if config.structure.is_budget:  # the mixes it would search, each planned like any structure
            candidate_mixes(model, config)
        else:
            plan_structure(model, config.structure, find_target_layers(model, config.targets, config.ignore))
    except ValueError as error:
        parser.error(f"argument --structure: {error}")


def _check_push(parser: argparse.ArgumentParser) -> None:
    """--push-to-hub needs a token and a Hub that answers: known before the model is loaded and pruned."""
    from ..hub.push import check_can_push

    try:
        check_can_push(None, reach=True)
    except (ValueError, RuntimeError) as error:
        parser.error(f"argument --push-to-hub: {error}")


def _resume_hint(args: argparse.Namespace) -> str:
    """After Ctrl-C: how to continue a run whose finished blocks (or gradual pruning's checkpoints) were kept,
    or finish the ONNX export of a model already saved."""
    export = _unfinished_export(args)
    if export:
        return f"; the pruned model is saved in {args.output}: finish its ONNX export with {export}"
    if _training_checkpoints(args):
        return (
            f"; training checkpoints are kept in {_training_work_dir(args)}: run the same command with --resume to "
            "continue"
        )
    kept = _training_work_dir(args) / "pruned" if _training_work_dir(args) is not None else None
    if kept is not None and kept.is_dir():
        return (
            f"; the pruned model (before training) is kept in {kept}: run the same command with --resume to train "
            f"it, or delete {kept.parent} to start over"
        )
    if not streams_output(args):
        return ""
    folders = [str(folder) for folder in _work_folders(args) if folder.is_dir()]
    if not folders:
        return ""
    return f"; finished blocks are kept in {' and '.join(folders)}: run the same command with --resume to continue"


def _unfinished_export(args: argparse.Namespace) -> str:
    """The command that writes --output's ONNX export when the run was stopped after saving the model and before
    the export was in place (``""`` otherwise)."""
    if "onnx" not in args.export or not args.output or not (Path(args.output) / "pruning_config.json").is_file():
        return ""
    onnx_dir = Path(args.output) / "onnx"
    if (onnx_dir / "model.onnx").is_file():
        return ""
    options = "".join(
        f", {name}={value!r}"
        for name, value in (("quantize", args.onnx_quantize), ("quantize_head", args.onnx_quantize_head))
        if value
    )
    return f'python -c "from optimum_prune import export_onnx; export_onnx({str(args.output)!r}, {str(onnx_dir)!r}{options})"'


def _work_folders(args: argparse.Namespace) -> list[Path]:
    """The work folders a run writing --output may keep (with --device-map, --offload-folder is accelerate's,
    and the work folder stays beside --output)."""
    from ..engine.work_folder import work_folder_paths

    return work_folder_paths(args.output, None if args.device_map is not None else args.offload_folder)


def streams_output(args: argparse.Namespace) -> bool:
    """Whether `Pruner.prune` writes --output itself, block by block and resumably (dense safetensors, and no
    recovery training changing the model afterwards)."""
    return bool(args.output) and "compressed" not in args.export and not args.save_masks and not args.recover_steps


def _resumes_training(args: argparse.Namespace) -> bool:
    """Whether --resume continues training: gradual pruning's, or recovery after one-shot pruning (the pruning,
    deterministic, runs again and training goes on from the last checkpoint)."""
    return bool(args.output) and bool(args.recover_steps)


def _training_work_dir(args: argparse.Namespace) -> Path | None:
    """Where recovery training keeps the pruned model and its checkpoints: beside --output."""
    return Path(f"{args.output}.recover") if args.output and args.recover_steps else None


def _training_checkpoints(args: argparse.Namespace) -> list[Path]:
    folder = _training_work_dir(args)
    return sorted(folder.glob("checkpoint-*")) if folder is not None and folder.is_dir() else []


def _check_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that need --output, and combinations the chosen offload or resume cannot serve."""
    needs_output = {
        "--resume": args.resume,
        "--export onnx": "onnx" in args.export,
        "--export gguf": "gguf" in args.export,
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
    if args.resume and not streams_output(args) and not _resumes_training(args):
        parser.error(
            "argument --resume: resuming writes dense safetensors block by block, or continues recovery training "
            "(--recover-steps); drop --export compressed and --save-masks."
        )
    if _training_checkpoints(args) and not (args.resume and _resumes_training(args)):
        parser.error(
            f"argument --output: {_training_work_dir(args)} holds the checkpoints of an unfinished training run: "
            + ("add --resume to continue it, or " if _resumes_training(args) else "")
            + "delete that folder to start again."
        )
    if args.output:
        from ..engine.work_folder import STATE
        from ..export.files import check_writable

        try:
            check_writable(args.output, args.overwrite, inputs=(args.model,))
        except (OSError, ValueError) as error:
            parser.error(f"argument --output: {error}")
        for folder in _work_folders(args):
            if streams_output(args) and not args.resume and (folder / STATE).is_file():
                parser.error(
                    f"argument --output: {folder} holds an unfinished run for this output: add --resume to "
                    "continue it, or delete that folder to start again."
                )


def _changed_settings(saved: dict[str, Any], ours: dict[str, Any]) -> str:
    """The recipe fields in which ``saved`` (a config dict a run was started with) differs from ``ours``, and
    their saved values (``""`` when none differs); the calibration fields are compared once the text is read."""
    recorded = {"dataset", "num_samples", "seq_len"}
    changed = sorted(key for key in {*ours, *saved} - recorded if saved.get(key) != ours.get(key))
    before = ", ".join(f"{key}={saved.get(key)!r}" for key in changed)
    return f"a different {', '.join(changed)} ({before})" if changed else ""


def _check_resume_matches(args: argparse.Namespace, config: PruningConfig, parser: argparse.ArgumentParser) -> None:
    """--resume of a work folder (or of recovery training) started with other settings or another number of
    processes: refused before loading (the calibration text is compared once it is tokenized)."""
    from ..config import CONFIG_NAME
    from ..engine.distributed import world_size
    from ..engine.work_folder import FINGERPRINT, STATE

    started = {
        folder: json.loads((folder / FINGERPRINT).read_text(encoding="utf-8"))
        for folder in _work_folders(args)
        if (folder / STATE).is_file() and (folder / FINGERPRINT).is_file()
    }
    pruned = _training_work_dir(args) / "pruned" if _resumes_training(args) else None
    if pruned is not None and (pruned / CONFIG_NAME).is_file():  # the model recovery training started from
        started[pruned] = {"config": json.loads((pruned / CONFIG_NAME).read_text(encoding="utf-8"))}
    for folder, saved in started.items():
        changed = _changed_settings(saved.get("config", {}), config.to_dict())
        if changed:
            parser.error(
                f"argument --resume: {folder} was started with {changed}: run the same command again, or delete "
                f"{folder.parent if folder == pruned else folder} to start over."
            )
        processes = saved.get("processes", 1)
        if processes != world_size():
            parser.error(
                f"argument --resume: {folder} was started by {processes} process(es), this run has {world_size()}: "
                f"resume it with the same number (torchrun --nproc-per-node {processes}), or delete the folder."
            )


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str) -> str | dict[str, Any]:
    """--device-map: one of accelerate's strategies, or a JSON object of module name -> device."""
    if spec in DEVICE_MAP_STRATEGIES:
        return spec
    try:
        value = json.loads(spec)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(
            f"cannot read {spec!r}: use {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object such as "
            '\'{"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cpu"}\'.'
        )
    return value


def _check_device_map(args: argparse.Namespace, config: PruningConfig, parser: argparse.ArgumentParser) -> None:
    """--device-map hands placement to accelerate: what cannot go with it is refused before loading."""
    try:
        parse_device_map(args.device_map)
    except ValueError as error:
        parser.error(f"argument --device-map: {error}")
    refused = {
        "--offload": (args.offload is not None, "accelerate offloads the model itself; drop --offload"),
        "--structure": (
            config.structure is not None,
            "structured pruning changes the shapes accelerate placed; drop --device-map (--offload disk streams a "
            "model larger than memory)",
        ),
        "--export compressed": (
            "compressed" in args.export,
            "the compressed format is built from weights in memory; save dense with --device-map and compress later",
        ),
        "--save-masks": (args.save_masks, "masks are read from weights in memory; save dense with --device-map"),
        "--recover-steps": (
            bool(args.recover_steps),
            "training needs every weight in memory; prune with --device-map and --output, then train the saved model",
        ),
    }
    for name, (given, why) in refused.items():
        if given:
            parser.error(f"argument --device-map: not with {name}: {why}.")


def _check_device_map_places(
    args: argparse.Namespace, model_config: PretrainedConfig, parser: argparse.ArgumentParser
) -> None:
    """A JSON --device-map names devices this machine has and places every parameter of --model (checked on a
    meta-device model); disk needs --offload-folder."""
    import torch

    value = parse_device_map(args.device_map)
    if isinstance(value, str):
        return
    gpus = torch.cuda.device_count()
    for module, device in value.items():
        if device in ("cpu", "disk"):
            continue
        try:
            place = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        except (RuntimeError, TypeError):
            place = None
        if place is None or place.type != "cuda":
            parser.error(
                f"argument --device-map: {module!r}: {device!r} is not a device: use cpu, disk or a GPU index."
            )
        if not (place.index or 0) < gpus:
            parser.error(
                f"argument --device-map: {module!r} goes to GPU {device!r}, and this machine has {gpus} CUDA GPU(s): "
                "use cpu or disk there."
            )
    if "disk" in value.values() and not args.offload_folder:
        parser.error(
            "argument --device-map: a module goes to disk: add --offload-folder DIR, where accelerate keeps it."
        )
    model = _meta_model(model_config, args.trust_remote_code)
    missing = sorted(
        {
            name.rpartition(".")[0]
            for name, _ in model.named_parameters()
            if not any(key == "" or name == key or name.startswith(f"{key}.") for key in value)
        }
    )
    if missing:
        parser.error(
            f"argument --device-map: it places no device for {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}: name every module (or a parent of it), or use auto."
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
                raise ValueError("it must hold a JSON object of PruningConfig fields")
            PruningConfig.from_dict(values)
        except (OSError, ValueError, TypeError) as error:
            parser.error(f"argument --config: {path}: {error}")
    given = [(field, getattr(args, field), None) for field in CONFIG_FIELDS]
    if args.structure:
        from ..structured.spec import parse_structure

        try:
            given[CONFIG_FIELDS.index("structure")] = ("structure", parse_structure(args.structure), None)
        except ValueError as error:
            parser.error(f"argument --structure: {error}")
    given += [(name, getattr(args, name), "settings") for name in all_settings_fields()]
    given += [(item.name, getattr(args, f"reconstruct_{item.name}"), "reconstruct") for item in RECONSTRUCTION_FIELDS]
    for field, value, nested in given:
        if value is None:
            continue
        name = reconstruct_flag(field) if nested == "reconstruct" else flag(field)
        if nested is None:
            candidate = {**values, field: value}
        else:
            if nested == "reconstruct" and not values.get("reconstruct"):
                parser.error(f"argument {name}: it refines --reconstruct; add --reconstruct (or drop {name}).")
            inner = values.get(nested)
            candidate = {**values, nested: {**(inner if isinstance(inner, dict) else {}), field: value}}
        try:
            PruningConfig.from_dict(candidate)
        except (ValueError, TypeError) as error:
            parser.error(f"argument {name}: {error}")
        values = candidate
    return PruningConfig.from_dict(values), set(values)


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
    """Load (or only estimate), evaluate, prune, evaluate again, recover, print the summary, save, export, push."""
    import torch

    from ..engine.distributed import Ranks
    from ..evaluation import evaluate_perplexity

    config = plan.config
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if config.gptq and args.dtype == "auto":  # the grid's values need float32 (Pruner refuses other dtypes)
        dtype = torch.float32
    cap_seq_len(plan, getattr(plan.model_config, "max_position_embeddings", None))
    if args.dry_run:
        dry_run(args, plan, dtype)
        return
    if not args.output and not args.push_to_hub:
        print(
            "note: neither --output nor --push-to-hub was given: the pruned model will not be saved.", file=sys.stderr
        )
    pruner = load(args, plan, dtype)
    eval_seq_len = args.eval_seq_len or config.seq_len

    def evaluate():
        return evaluate_perplexity(pruner.model, pruner.tokenizer, plan.eval_texts, eval_seq_len, args.eval_windows)

    main = Ranks.current().main  # under torchrun, rank 0 evaluates while the others wait at the first block
    before = evaluate() if plan.eval_texts is not None and main else None
    dense_tasks = (
        plan.tasks.evaluate(pruner.model, pruner.tokenizer, args.eval_batch_size) if plan.tasks and main else None
    )
    report = prune(args, pruner)
    after = evaluate() if before is not None else None
    if plan.tasks is not None and main:
        pruner.evaluate_tasks(plan.tasks, dense_tasks, args.eval_batch_size)
    print(report.table())
    if before is not None:
        print(
            f"perplexity on {plan.eval_name} ({before.describe()}): dense {before.value:.3f} -> pruned {after.value:.3f}"
        )
    if args.recover_steps and args.recover_schedule == "one-shot":
        recover(args, pruner)
        if before is not None:
            after = evaluate()
            print(f"perplexity on {plan.eval_name} after recovery: {after.value:.3f}")
    scores = None if before is None else {"dataset": plan.eval_name, "before": before.value, "after": after.value}
    write(args, pruner, scores)
    if args.benchmark and main:
        from .bench import benchmark

        pruner.report.speed = benchmark(args.output, args.model if os.path.isdir(args.model) else None)
        pruner._record_metadata()
    push(args, pruner, scores)
    if "onnx" in args.export and before is not None and main:  # the ONNX export, by the same protocol
        exported = evaluate_perplexity(
            Path(args.output) / "onnx", pruner.tokenizer, plan.eval_texts, eval_seq_len, args.eval_windows
        )
        weights = f"{args.onnx_quantize} weights" if args.onnx_quantize else "float32"
        print(f"perplexity on {plan.eval_name} of the ONNX export ({weights}, onnxruntime): {exported.value:.3f}")


def load(args: argparse.Namespace, plan: Plan, dtype: Any) -> Pruner:
    """The `Pruner` of --model, with a tokenizer when calibration or --eval needs one."""
    from ..engine.distributed import Ranks
    from ..pruner import Pruner

    pruner = Pruner.from_pretrained(
        args.model,
        plan.config,
        tokenizer=args.tokenizer,
        processor=args.processor,
        device=args.device,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        allow_unsafe_weights=args.allow_unsafe_weights,
        offload=args.offload,
        offload_folder=args.offload_folder,
        max_memory=plan.max_memory,
        device_map=parse_device_map(args.device_map) if args.device_map is not None else None,
        offload_activations=args.offload_activations,
        progress=Ranks.current().main,
    )
    if pruner.tokenizer is None and (plan.config.needs_calibration or plan.eval_texts is not None):
        raise RuntimeError(
            f"No tokenizer could be loaded from {args.tokenizer or args.model}; calibration and --eval need one: "
            "pass --tokenizer PATH (a folder or Hub id holding one)."
        )
    return pruner


def _training(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of recovery training from the --recover-* flags."""
    return {
        "max_steps": args.recover_steps,
        "learning_rate": args.recover_lr,
        "batch_size": args.recover_batch_size,
        "seq_len": args.recover_seq_len,
        "distill": args.recover_loss == "distill",
        "eval_windows": args.recover_eval_windows,
        "work_dir": _training_work_dir(args),
        "text_column": args.text_column,
        "split": args.dataset_split,
    }


def prune(args: argparse.Namespace, pruner: Pruner) -> PruningReport:
    """Prune one-shot (written block by block when `streams_output`), or gradually while training."""
    if args.recover_schedule == "gradual":
        report = pruner.prune_while_training(
            args.recover_dataset or args.dataset, resume=args.resume, **_training(args)
        )
        recovery = pruner.recovery
        print(f"pruned while training: {recovery.steps} steps, {recovery.tokens:,} tokens of {recovery.dataset}")
        return report
    return pruner.prune(
        args.dataset,
        text_column=args.text_column,
        split=args.dataset_split,
        output_dir=args.output if streams_output(args) else None,
        overwrite=args.overwrite,
        resume=args.resume and streams_output(args),  # else --resume continues the training after this prune
    )


def recover(args: argparse.Namespace, pruner: Pruner) -> None:
    """Train after pruning, keeping the masks, and print what the training did."""
    recovery = pruner.recover(
        args.recover_dataset or args.dataset, lora=args.recover_lora, resume=args.resume, **_training(args)
    )
    print(
        f"recovery: {recovery.steps} steps, {recovery.tokens:,} tokens of {recovery.dataset}, {recovery.loss} "
        f"{recovery.first_loss:.4f} -> {recovery.final_loss:.4f}, {recovery.seconds:.1f} s; pruned weights still zero"
    )
    if recovery.eval_perplexity:
        points = ", ".join(f"step {step}: {value:.3f}" for step, value in recovery.eval_perplexity)
        print(f"held-out perplexity ({args.recover_eval_windows} windows of the training text): {points}")


def write(args: argparse.Namespace, pruner: Pruner, scores: dict[str, Any] | None) -> None:
    """Save --output (unless pruning streamed it) and export ONNX (rank 0 only, under torchrun)."""
    from ..engine.distributed import Ranks

    if not Ranks.current().main:
        return
    save_format = _save_format(args)
    if args.output and not streams_output(args):
        pruner.save_pretrained(args.output, overwrite=args.overwrite, format=save_format, save_masks=args.save_masks)
    if args.output:
        print(f"saved ({save_format}) to {args.output}")
    if "onnx" in args.export:
        from ..export.onnx import export_onnx

        onnx_dir = Path(args.output) / "onnx"
        print(f"exporting ONNX to {onnx_dir} ...", flush=True)
        source = args.output if args.offload == "disk" or args.device_map is not None else pruner.model
        export_onnx(
            source,
            onnx_dir,
            tokenizer=pruner.tokenizer,
            quantize=args.onnx_quantize,
            quantize_head=args.onnx_quantize_head,
        )
        print(f"ONNX model{f' ({args.onnx_quantize} weights)' if args.onnx_quantize else ''} written to {onnx_dir}")
        if args.onnx_quantize in GPTQ_BITS and not pruner.config.gptq:
            print(
                f"  each weight was rounded to {args.onnx_quantize} on its own; --gptq {args.onnx_quantize} rounds "
                "them during pruning with the calibration data, for less quality loss (docs/formats.md)"
            )
    if "gguf" in args.export:
        from ..export.gguf import export_gguf

        for kind in gguf_types(args, pruner.config):
            path = Path(args.output) / "gguf" / f"{Path(args.output).name}-{kind.upper()}.gguf"
            export_gguf(args.output, path, quantize=kind, overwrite=args.overwrite)
            rounded = " (weights rounded by GPTQ onto its grid)" if pruner.config.gptq == kind else ""
            print(f"GGUF {kind} written to {path}{rounded}")


def _save_format(args: argparse.Namespace) -> str:
    """The format --output (and --push-to-hub) are saved in."""
    return "compressed" if "compressed" in args.export else "dense"


def push(args: argparse.Namespace, pruner: Pruner, scores: dict[str, Any] | None) -> None:
    """Upload the model with its card (speed included, once measured) and its ONNX export, then its GGUF files
    to ``<repo>-GGUF`` (rank 0 only)."""
    from ..engine.distributed import Ranks

    if not args.push_to_hub or not Ranks.current().main:
        return
    onnx_dir = Path(args.output) / "onnx" if "onnx" in args.export else None
    save_format = _save_format(args)
    commit = pruner.push_to_hub(
        args.push_to_hub, private=args.private, format=save_format, perplexity=scores, onnx_dir=onnx_dir
    )
    print(f"pushed to {commit.commit_url}")
    if "gguf" in args.export:  # its own repository, as the Hub's GGUF repositories are
        from ..hub.push import push_gguf

        gguf = push_gguf(Path(args.output) / "gguf", f"{args.push_to_hub}-GGUF", base_model=args.push_to_hub,
                         private=args.private)  # fmt: skip
        print(f"pushed the GGUF files to {gguf.commit_url}")


def _training_estimate(args: argparse.Namespace, plan: Plan, estimate: Any, device: Any) -> str:
    """The dry run's line for --recover-steps (one-shot or gradual)."""
    import torch

    from ..engine.estimate import matmul_flops_per_second
    from ..recovery.train import RecoveryConfig, estimate_training

    context = getattr(plan.model_config.get_text_config(), "max_position_embeddings", None) or plan.config.seq_len
    recovery = RecoveryConfig(
        args.recover_steps, args.recover_lr, args.recover_batch_size,
        args.recover_seq_len or min(plan.config.seq_len, context), distill=args.recover_loss == "distill",
        lora=args.recover_lora,
    )  # fmt: skip
    weight_bytes = max(1, estimate.weights_bytes // max(estimate.parameters, 1))
    flops = matmul_flops_per_second(torch.device(device))
    gradual = args.recover_schedule == "gradual"
    return str(estimate_training(estimate.parameters, weight_bytes, plan.model_config, recovery, flops, gradual))


def dry_run(args: argparse.Namespace, plan: Plan, dtype: Any) -> None:
    """Print the estimate of the run, refused as the real run would be when it exceeds --max-memory."""
    import torch

    from ..engine.resources import check_max_memory
    from ..pruner import Pruner, default_device

    config = plan.config
    estimate = Pruner.estimate(
        args.model,
        config,
        device=args.device,
        offload=args.offload,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        offload_activations=args.offload_activations,
    )
    run = f"{config.pattern} at {config.sparsity:g}"
    if config.structure is not None:
        run = f"structure {config.structure}" + (f", then {run}" if config.sparsity else "")
    if config.reconstruct is not None:
        run += f", each block reconstructed ({config.reconstruct.epochs} epochs)"
    print(f"dry run of {config.method} {run} on {args.model}: {estimate}")
    if args.recover_steps:
        print(_training_estimate(args, plan, estimate, default_device() if args.device is None else args.device))
    device = default_device() if args.device is None else torch.device(args.device)
    if args.device_map is None:  # with --device-map, --max-memory is accelerate's placement budget
        check_max_memory(plan.max_memory, estimate, device, args.offload or "cpu")
