"""The command-line flags of ``optimum-prune``, ``python -m optimum_prune`` and ``optimum-cli prune``.

Standard library only: ``optimum-cli`` builds every registered parser at start-up, so nothing heavy is
imported here. Values are validated later by `PruningConfig` itself (see `optimum_prune.cli.run`). Each
method's settings get a flag from their declaration in `optimum_prune.method_settings`.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..export.gguf import GGUF_TYPES
from ..export.quantize import QUANTIZATIONS
from ..method_settings import GPTQ_GRIDS, ReconstructionSettings, all_settings_fields

DESCRIPTION = (
    "Prune a Hugging Face causal LM block by block (magnitude, Wanda, SparseGPT, SparseLLM, ALPS; unstructured or N:M, "
    "uniform or OWL allocation), optionally measure its perplexity before and after, and save it."
)

# `PruningConfig` fields that have a flag of the same name (``owl_m`` -> ``--owl-m``), in validation order.
CONFIG_FIELDS = (
    "method",
    "pattern",
    "sparsity",
    "allocation",
    "structure",
    "owl_m",
    "owl_lambda",
    "targets",
    "ignore",
    "expert_calibration",
    "min_expert_tokens",
    "refit",
    "gptq",
    "reconstruct",
    "num_samples",
    "seq_len",
    "seed",
    "batch_size",
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
EXPORTS = ("compressed", "onnx", "gguf")


def flag(field: str) -> str:
    """The flag that sets a `PruningConfig` field."""
    return "--" + field.replace("_", "-")


def reconstruct_flag(field: str) -> str:
    """The flag that sets a `ReconstructionSettings` field (``held_out`` -> ``--reconstruct-held-out``)."""
    return "--reconstruct-" + field.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``prune`` flag to ``parser``. Config flags default to ``None`` ("not given").

    One flat list, group after group, on purpose: it reads like ``--help`` and docs/cli.md.
    """
    parser.description = DESCRIPTION
    parser.add_argument("--model", required=True, help="Hub id or local folder of the causal LM to prune.")

    pruning = parser.add_argument_group("pruning (defaults: PruningConfig's, or the --config file's)")
    pruning.add_argument("--config", metavar="FILE", help="pruning_config.json (or its folder) to start from.")
    pruning.add_argument("--method", help="magnitude, wanda, sparsegpt, sparsellm or alps (default sparsegpt).")
    pruning.add_argument("--sparsity", type=float, help="fraction of weights set to zero, in [0, 1).")
    pruning.add_argument("--pattern", help="'unstructured' or N:M such as 2:4 (the sparsity follows from N:M).")
    pruning.add_argument("--allocation", help="'uniform' or 'owl' (outlier-weighted layerwise sparsity).")
    pruning.add_argument("--owl-m", type=float, help="OWL outlier threshold (multiple of the block mean).")
    pruning.add_argument("--owl-lambda", type=float, help="OWL spread of block sparsities around --sparsity.")
    pruning.add_argument(
        "--structure",
        nargs="+",
        metavar="KIND=FRACTION",
        help="structured pruning, e.g. mlp=0.25 attention=0.33 layers=0.1 experts=0.25 (fractions removed in every block; also "
        "align=N, compensate=false): a smaller dense model; --method chooses what to remove.",
    )
    pruning.add_argument("--targets", nargs="+", metavar="GLOB", help="module names to prune (fnmatch globs).")
    pruning.add_argument("--ignore", nargs="+", metavar="GLOB", help="module names never to prune.")
    pruning.add_argument(
        "--expert-calibration",
        help="mixtures of experts: 'routed' (each expert's routed tokens, default), 'all' (every token through every "
        "expert) or 'weighted' (routed tokens scaled by their gate weight).",
    )
    pruning.add_argument(
        "--min-expert-tokens",
        type=int,
        help="an expert routed fewer calibration tokens is calibrated on every token (default 64; 0: never).",
    )

    pruning.add_argument(
        "--refit",
        action="store_true",
        default=None,
        help="after each layer's mask is chosen, solve its kept weights for the least reconstruction error on the "
        "calibration inputs (conjugate gradients, as ALPS does); the report gives each layer's error before and after.",
    )
    pruning.add_argument(
        "--gptq",
        choices=GPTQ_GRIDS,
        help="then round each layer's kept weights by GPTQ onto the grid of --onnx-quantize int4|int8 or --gguf-type "
        "q4_0|q8_0 (the saved weights stay float; the export quantizes to exactly them and loses less quality).",
    )

    pruning.add_argument(
        "--reconstruct",
        action="store_true",
        default=None,
        help="after each block is pruned, train its kept weights (masks frozen) to reproduce the dense block's "
        "outputs on the calibration batches; a block keeps them only if its held-out error fell.",
    )
    for item in dataclasses.fields(ReconstructionSettings):
        kind = {"int": int, "float": float}.get(str(item.type), str)
        pruning.add_argument(
            reconstruct_flag(item.name),
            type=kind,
            help=f"with --reconstruct: {item.metadata['help']} ({item.default}).",
        )

    settings = parser.add_argument_group("method settings (defaults: the method's own)")
    for name, (item, owners) in all_settings_fields().items():
        kind = int if item.type in (int, "int") else float
        settings.add_argument(flag(name), type=kind, help=f"{item.metadata['help']} ({', '.join(owners)}).")

    calibration = parser.add_argument_group("calibration")
    calibration.add_argument(
        "--dataset", help="calibration text: a local .txt/.jsonl/.json/.parquet file or a Hub dataset ('name:subset')."
    )
    calibration.add_argument("--dataset-split", default="train", help="split of a Hub dataset (default train).")
    calibration.add_argument(
        "--text-column",
        default="text",
        help="text field of --dataset and --recover-dataset rows (default text; --eval has --eval-text-column).",
    )
    calibration.add_argument("--num-samples", type=int, help="calibration sequences.")
    calibration.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048, capped at the context).")
    calibration.add_argument("--seed", type=int, help="seed of the calibration sampling.")
    calibration.add_argument("--batch-size", type=int, help="calibration sequences per forward pass.")

    loading = parser.add_argument_group("model loading")
    loading.add_argument("--device", help="where blocks are pruned: cpu, cuda, cuda:1 (default: first GPU, else CPU).")
    loading.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights dtype (default: the checkpoint's; float32 with --gptq).",
    )
    loading.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer folder or Hub id, when --model has none (default: --model)."
    )
    loading.add_argument(
        "--processor",
        metavar="PATH",
        help="a vision-language model's processor folder or Hub id, for --dataset rows with images (default: --model).",
    )
    loading.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code.")
    loading.add_argument(
        "--allow-unsafe-weights", action="store_true", help="accept pickled (non-safetensors) weights you trust."
    )
    loading.add_argument(
        "--offload",
        help="cpu: weights in RAM, one block at a time on --device (default); disk: read each block from the "
        "safetensors checkpoint and stream it to --output, so about one block is ever in memory.",
    )
    loading.add_argument(
        "--device-map",
        metavar="MAP",
        help="load the model the accelerate way instead of --offload: auto, balanced, sequential or a JSON object "
        "of module -> device ('cpu', 'disk', 0, ...); --max-memory and --offload-folder then go to accelerate.",
    )
    loading.add_argument(
        "--offload-folder",
        metavar="DIR",
        help="where a run keeps its resumable state (with --device-map: accelerate's offload folder).",
    )
    loading.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep the calibration activations between blocks in memory-mapped files (in the run's work folder) "
        "instead of host RAM.",
    )
    loading.add_argument(
        "--max-memory",
        metavar="SPEC",
        help="memory limits checked against the estimate before pruning, e.g. '0=20GiB,cpu=64GiB'.",
    )
    loading.add_argument(
        "--dry-run", action="store_true", help="print the estimated memory, disk and time; load no weights."
    )

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval",
        metavar="TEXT",
        help="measure perplexity before and after on a local text file or a Hub dataset (windows start with the "
        "BOS token when the tokenizer adds one).",
    )
    evaluation.add_argument("--eval-split", default="test", help="split of a Hub --eval dataset (default test).")
    evaluation.add_argument("--eval-text-column", default="text", help="text field of --eval rows (default text).")
    evaluation.add_argument("--eval-seq-len", type=int, help="tokens per window (default: --seq-len).")
    evaluation.add_argument("--eval-windows", type=int, help="evaluate only the first N windows (default: all).")
    evaluation.add_argument(
        "--eval-tasks",
        metavar="TASK[,TASK...]",
        help="zero-shot tasks of lm-evaluation-harness (its names: hellaswag,arc_easy,...; offline: hellaswag_local "
        'with --eval-task-data), on the dense and the pruned model; needs pip install "optimum-prune[eval]".',
    )
    evaluation.add_argument("--eval-limit", type=int, help="evaluate at most N items per task (default: all).")
    evaluation.add_argument("--eval-batch-size", type=int, default=8, help="batch size of the tasks (default 8).")
    evaluation.add_argument(
        "--eval-task-data",
        nargs="+",
        metavar="TASK=FILE",
        help="the data file of a shipped local task, e.g. hellaswag_local=hellaswag_val.jsonl.",
    )
    evaluation.add_argument(
        "--eval-include", nargs="+", metavar="DIR", help="folders of your own lm-eval YAML tasks (local data_files)."
    )

    _add_recovery_arguments(parser)

    output = parser.add_argument_group("output")
    output.add_argument("--output", metavar="DIR", help="folder for the pruned model (loads with transformers).")
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder.")
    output.add_argument(
        "--resume", action="store_true", help="continue an interrupted run with the same flags and --output."
    )
    output.add_argument(
        "--export",
        nargs="+",
        choices=EXPORTS,
        default=[],
        help="compressed: save --output in the compressed format (docs/formats.md); onnx: also write DIR/onnx; gguf: "
        "also write DIR/gguf/NAME-TYPE.gguf for llama.cpp and Ollama.",
    )
    output.add_argument(
        "--gguf-type",
        nargs="+",
        choices=GGUF_TYPES,
        help="with --export gguf: the weight types, one file each (default: the --gptq grid when it is q4_0 or q8_0, "
        "else q8_0, or f16 where the model's widths are no multiple of 32).",
    )
    output.add_argument(
        "--onnx-quantize",
        choices=QUANTIZATIONS,
        help="with --export onnx: int8 or int4 (weight-only, blocks of 32, MatMulNBits) or int8-dynamic (activations "
        "too, per tensor: fastest prefill, breaks models with activation outliers) weights through onnxruntime's "
        "quantization tools; pruned zeros stay zero.",
    )
    output.add_argument(
        "--onnx-quantize-head",
        action="store_true",
        help="with --onnx-quantize: quantize the LM head too (smaller, faster decode, some quality; default float).",
    )
    output.add_argument("--save-masks", action="store_true", help="add sparsity_masks.safetensors to --output.")
    output.add_argument(
        "--push-to-hub", metavar="REPO", help="upload the pruned model and its card (token: HF_TOKEN or hf auth login)."
    )
    output.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private.")
    output.add_argument(
        "--benchmark",
        action="store_true",
        help="after saving, time the output (its ONNX export when there is one) against --model: `optimum-prune "
        "bench` with its defaults; the result goes into the metadata and card.",
    )
    output.add_argument("--verbose", action="store_true", help="info logs, and a traceback on failure.")
    return parser


def _add_recovery_arguments(parser: argparse.ArgumentParser) -> None:
    """The --recover-* flags (`optimum_prune.recovery`)."""
    recovery = parser.add_argument_group("recovery training after pruning (pruned weights stay exactly zero)")
    recovery.add_argument("--recover-steps", type=int, metavar="N", help="train N steps after pruning (default: none).")
    recovery.add_argument("--recover-dataset", metavar="SRC", help="training text (default: --dataset).")
    recovery.add_argument(
        "--recover-lr",
        type=float,
        help="peak learning rate (default: by model size, 1e-3 * (parameters / 1e6) ** -0.5 capped at 1e-3; x10 "
        "with LoRA).",
    )
    recovery.add_argument("--recover-batch-size", type=int, default=4, help="sequences per step (default 4).")
    recovery.add_argument("--recover-seq-len", type=int, help="tokens per sequence (default: --seq-len).")
    recovery.add_argument("--recover-lora", action="store_true", help="train LoRA adapters, merged through the masks.")
    recovery.add_argument(
        "--recover-eval-windows",
        type=int,
        default=8,
        metavar="N",
        help="held-out windows of the training text whose perplexity is shown along the way (default 8; 0: none).",
    )
    recovery.add_argument(
        "--recover-schedule",
        choices=["one-shot", "gradual"],
        default="one-shot",
        help="one-shot: prune, then train (default); gradual: prune while training, sparsity rising on a cubic "
        "schedule over the first 75%% of --recover-steps (unstructured, uniform).",
    )
    recovery.add_argument(
        "--recover-loss",
        choices=["distill", "lm"],
        default="distill",
        help="distill: KL to the dense model (default); lm: the plain language-model loss.",
    )


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``optimum-prune bench``: prefill and decode tokens/s of a saved model beside the dense one."""
    parser.description = (
        "Time prefill and decode tokens/s of a saved model (an ONNX folder on onnxruntime, a safetensors folder on "
        "transformers) and of the dense model on the same engine, interleaved; print the table and a verdict and "
        "write them into the folder's metadata and model card."
    )
    parser.add_argument("output", metavar="OUTPUT", help="the saved model folder (or its onnx/ subfolder).")
    parser.add_argument("--against", metavar="DENSE", help="the dense model folder to compare with.")
    parser.add_argument("--device", default="cpu", help="transformers' device for safetensors folders (default cpu).")
    parser.add_argument(
        "--engine",
        choices=("onnxruntime", "transformers", "deepsparse"),
        help="default: onnxruntime for an ONNX folder, transformers for a safetensors one; deepsparse for an ONNX "
        "folder where DeepSparse 1.8 is installed.",
    )
    parser.add_argument("--threads", type=int, help="threads of the engine (default: its own).")
    parser.add_argument(
        "--prompt-len", type=int, help="prompt tokens (default 512, or fewer so that the model's context holds them)."
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps (default 128).")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per model (default 3).")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the folder as it is.")
    return parser


def add_frontier_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``optimum-prune frontier``: which output to ship, measured on this model and machine."""
    parser.description = (
        "Build dense and pruned candidates in each engine's formats, measure each one's perplexity in the engine, "
        "its file size and its speed beside the dense model, and write the table, the Pareto front (frontier.png) "
        "and a recommendation per constraint."
    )
    parser.add_argument("--model", required=True, help="local folder of the causal LM.")
    parser.add_argument("--dataset", required=True, help="calibration text (a local file or a Hub dataset).")
    parser.add_argument("--eval", required=True, help="evaluation text (a local file or a Hub dataset).")
    parser.add_argument("--output", required=True, metavar="DIR", help="where the models, files and results go.")
    parser.add_argument("--engines", nargs="+", default=["llamacpp"], help="llamacpp and/or onnxruntime.")
    parser.add_argument(
        "--candidates",
        nargs="+",
        metavar="STRUCTURE",
        help="prunings beside the dense model, as --structure takes them (params=0.85, mlp=0.5); default: the "
        "parameter budgets params=0.85 and params=0.7, each reconstructed.",
    )
    parser.add_argument("--max-perplexity", help="a limit: 1.2x (of the dense model's, in the same engine) or 40.")
    parser.add_argument("--min-speedup", type=float, help="a decode speed-up to reach, measurably (e.g. 2).")
    parser.add_argument("--max-size", help="a file size limit, e.g. 200MB.")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration sequences (default 64).")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration tokens per sequence (default 512).")
    parser.add_argument("--eval-windows", type=int, default=10, help="evaluation windows of 512 tokens (default 10).")
    parser.add_argument("--threads", type=int, help="engine threads for the speed runs (default: the engine's).")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs (default 3).")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run in --output.")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop.")
    return parser
