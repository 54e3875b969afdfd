"""The model card (README.md) of a pruned model: Hub metadata, the pruning recipe, how to load it, per-layer sparsity."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..config import PruningConfig
from ..errors import InputError
from ..export.metadata import METADATA_KEY
from ..report import PruningReport, format_score

_PERPLEXITY_KEYS = {"dataset", "before", "after", "dataset_name", "split", "seq_len"}


def hub_base_model(source: str | None) -> str | None:
    """``source`` when it names a Hub repository (``owner/name``), else ``None`` (a local folder is no base model)."""
    if not source or os.path.exists(source) or source.count("/") != 1 or source.startswith((".", "/")):
        return None
    return source


def check_perplexity(perplexity: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``perplexity={"dataset": ..., "before": x, "after": y}`` (``before`` optional)."""
    if perplexity is None:
        return None
    if not isinstance(perplexity, dict) or "dataset" not in perplexity or "after" not in perplexity:
        raise InputError(
            'perplexity must be a dict like {"dataset": "wikitext2", "before": 12.3, "after": 14.1} '
            "(after: the pruned model's perplexity; before: the dense model's, optional)."
        )
    unknown = set(perplexity) - _PERPLEXITY_KEYS
    if unknown:
        raise InputError(f"Unknown perplexity keys {sorted(unknown)}: use {sorted(_PERPLEXITY_KEYS)}.")
    for key in ("before", "after"):
        if key in perplexity and not (isinstance(perplexity[key], int | float) and perplexity[key] > 0):
            raise InputError(f"perplexity[{key!r}] must be a positive number, got {perplexity[key]!r}.")
    return perplexity


def _eval_results(perplexity: dict[str, Any]) -> list[EvalResult]:
    common = {
        "task_type": "text-generation",
        "task_name": "Text Generation",
        "dataset_type": perplexity["dataset"],
        "dataset_name": perplexity.get("dataset_name", perplexity["dataset"]),
        "dataset_split": perplexity.get("split"),
        "metric_type": "perplexity",
    }
    results = [EvalResult(**common, metric_name="Perplexity (pruned)", metric_value=float(perplexity["after"]))]
    if "before" in perplexity:
        results.append(
            EvalResult(**common, metric_name="Perplexity (dense base model)", metric_value=float(perplexity["before"]))
        )
    return results


def _zero_shot_results(zero_shot: dict[str, Any]) -> list[EvalResult]:
    """One model-index entry per task, metric and model (pruned, and the dense base model beside it)."""
    results = []
    for row in zero_shot["rows"]:
        common = {
            "task_type": "text-generation",
            "task_name": "Text Generation",
            "dataset_type": row["task"],
            "dataset_name": row["task"],
            "metric_type": row["metric"],
            "source_name": f"lm-evaluation-harness {zero_shot['harness']}",
            "source_url": "https://github.com/EleutherAI/lm-evaluation-harness",
        }
        results.append(EvalResult(**common, metric_name=f"{row['metric']} (pruned)", metric_value=row["pruned_value"]))
        if "dense_value" in row:
            results.append(
                EvalResult(**common, metric_name=f"{row['metric']} (dense base model)", metric_value=row["dense_value"])
            )
    return results


def _recipe(config: PruningConfig, report: PruningReport) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if report.structure is not None:
        structure = report.structure
        for kind in ("mlp", "attention", "experts"):
            if kind in structure:
                rows.append((f"structured {kind}", f"{structure[kind]['original']} -> {structure[kind]['kept']}"))
        if "layers" in structure:
            original = structure["layers"]["original"]
            rows.append(("decoder blocks", f"{original} -> {original - len(structure['layers']['removed'])}"))
        parameters = structure["parameters"]
        rows.append(("parameters", f"{parameters['original']:,} -> {parameters['kept']:,}"))
        if "budget" in structure:
            budget = structure["budget"]
            rows.append(
                (
                    "budget",
                    f"{budget['budget']}: {budget['chosen']} chosen of {len(budget['candidates'])} mixes",
                )
            )
    rows += [
        ("method", config.method),
        ("target sparsity", config.sparsity),
        ("pattern", config.pattern),
        ("allocation", config.allocation),
    ]
    if config.allocation == "owl":
        rows += [("OWL M", config.owl_m), ("OWL lambda", config.owl_lambda)]
    if config.refit:
        rows.append(("refit", "kept weights re-solved for the least reconstruction error"))
    if config.gptq:
        rows.append(("GPTQ", f"kept weights rounded onto the {config.gptq} grid of the ONNX export (MatMulNBits)"))
    if config.reconstruct is not None:
        settings = config.reconstruct
        done = report.reconstruction or []
        rows.append(
            (
                "block-wise reconstruction",
                f"each block trained to the dense block's outputs ({settings.epochs} epochs, Adam lr {settings.lr:g}, "
                f"{settings.inputs} inputs, {settings.loss} loss); {sum(block['kept'] for block in done)} of "
                f"{len(done)} blocks kept it (held-out error fell)",
            )
        )
    if config.needs_calibration:
        rows += [
            ("calibration data", config.dataset),
            ("calibration samples", f"{config.num_samples} x {config.seq_len} tokens"),
            ("seed", config.seed),
        ]
    return rows


def _load_snippet(repo_id: str, format: str, vision_language: bool) -> str:
    if format == "compressed":
        return (
            "```python\nfrom optimum_prune import load_pruned\nfrom transformers import AutoTokenizer\n\n"
            f'model = load_pruned("{repo_id}")\ntokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```\n\n'
            "The weights are stored compressed (kept values plus a bitmask); `load_pruned` needs "
            "`pip install optimum-prune` and returns an ordinary dense transformers model."
        )
    model_class, processor_class = (
        ("AutoModelForImageTextToText", "AutoProcessor")
        if vision_language
        else ("AutoModelForCausalLM", "AutoTokenizer")
    )
    return (
        f"```python\nfrom transformers import {model_class}, {processor_class}\n\n"
        f'model = {model_class}.from_pretrained("{repo_id}")\n'
        f'{"processor" if vision_language else "tokenizer"} = {processor_class}.from_pretrained("{repo_id}")\n```\n\n'
        "The weights are ordinary dense safetensors with exact zeros where weights were pruned; no extra package "
        "is needed. The recipe is in `pruning_config.json` and the sparsity metadata in `config.json` under "
        '`"optimum_prune"`.'
    )


def _recovery_section(recovery: dict[str, Any], plot: str | None) -> str:
    rows = [
        ["steps", recovery["steps"]],
        ["training tokens", f"{recovery['tokens']:,} of {recovery['dataset']}"],
        ["loss", recovery["loss"] + (f" (teacher: {recovery['teacher']})" if recovery["teacher"] else "")],
        ["trained", "LoRA adapters, merged through the masks" if recovery["lora"] else "every weight"],
        ["first -> last loss", f"{recovery['first_loss']:.4f} -> {recovery['final_loss']:.4f}"],
    ]
    points = recovery.get("eval_perplexity") or []
    if points:
        curve = " -> ".join(f"{value:.2f} (step {step})" for step, value in points)
        rows.append(["held-out perplexity (windows of the training text)", curve])
    picture = f"\n\n![Held-out perplexity against training tokens]({plot})" if plot else ""
    return (
        "## Recovery training\n\nAfter pruning, the model was trained with every pruned weight held at "
        "exactly zero (checked before saving):\n\n" + _markdown_table(["setting", "value"], rows) + picture
    )


def _perplexity_section(perplexity: dict[str, Any]) -> str:
    rows = [["pruned", f"{perplexity['after']:.3f}"]]
    if "before" in perplexity:
        rows.insert(0, ["dense base model", f"{perplexity['before']:.3f}"])
    extra = f", {perplexity['seq_len']}-token windows" if "seq_len" in perplexity else ""
    return f"## Evaluation\n\nPerplexity on {perplexity['dataset']}{extra}:\n\n" + _markdown_table(
        ["model", "perplexity"], rows
    )


def _zero_shot_section(zero_shot: dict[str, Any]) -> str:
    rows = [
        [row["task"], row["metric"], format_score(row.get("dense_value"), row.get("dense_stderr")),
         format_score(row["pruned_value"], row["pruned_stderr"]), row["samples"]]
        for row in zero_shot["rows"]
    ]  # fmt: skip
    return (
        f"## Zero-shot tasks\n\nlm-evaluation-harness {zero_shot['harness']}, 0-shot, mean ± standard error:\n\n"
        + _markdown_table(["task", "metric", "dense base model", "pruned", "items"], rows)
    )


def speed_section(speed: dict[str, Any]) -> str:
    """The card's Speed section from a `SpeedReport.to_dict`: the engine, the settings, and tokens/s."""
    rows = [
        [name, f"{values['prefill_tokens_per_second']:.1f}", f"{values['decode_tokens_per_second']:.1f}"]
        for name, values in (("this model", speed["output"]), ("dense base model", speed.get("dense")))
        if values
    ]
    return (
        f"## Speed\n\nMeasured with `optimum-prune bench` on {speed['engine']} ({speed['device']}, {speed['dtype']}, "
        f"{speed['threads'] or 'default'} threads; {speed['hardware']}), batch {speed['batch']}, a "
        f"{speed['prompt_len']}-token prompt and {speed['new_tokens']} new tokens, median of {speed['repeats']} "
        f"interleaved runs:\n\n"
        + _markdown_table(["model", "prefill tokens/s", "decode tokens/s"], rows)
        + f"\n\nVerdict: {speed['verdict']}."
    )


def record_speed(folder: str | os.PathLike, speed: dict[str, Any]) -> None:
    """Write a `SpeedReport.to_dict` into a saved ``folder``'s metadata (``config.json``, ``optimum_prune.speed``)
    and the Speed section of its model card (``README.md``), when it has one."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.setdefault(METADATA_KEY, {})["speed"] = speed
    temporary = config_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, config_path)
    card = folder / "README.md"
    if card.is_file():  # the Speed section replaced, or added at the end
        head, _, rest = card.read_text(encoding="utf-8").partition("\n## Speed\n")
        _, _, tail = rest.partition("\n## ")
        after = f"\n\n## {tail}" if tail else "\n"
        card.write_text(head.rstrip() + "\n\n" + speed_section(speed) + after, encoding="utf-8")


def _markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def build_model_card(
    config: PruningConfig,
    report: PruningReport,
    repo_id: str,
    *,
    base_model: str | None = None,
    format: str = "dense",
    perplexity: dict[str, Any] | None = None,
    recovery: dict[str, Any] | None = None,
    plot: str | None = None,
    recovery_plot: str | None = None,
) -> ModelCard:
    """The card of a model pruned with ``config`` (``report`` is what the run achieved, zero-shot scores
    included; ``recovery``, the `RecoveryReport.to_dict` of training after pruning; ``plot``, the file name of
    the sparsity picture beside the card; ``recovery_plot``, that of the recovery curve)."""
    from ..version import __version__

    perplexity = check_perplexity(perplexity)
    name = repo_id.split("/")[-1]
    tags = ["pruned", "sparse", config.method, config.pattern, "optimum-prune"]
    if report.structure is not None:
        tags = ["pruned", "structured-pruning", config.method, "optimum-prune"] + (
            ["sparse"] if config.sparsity else []
        )
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="image-text-to-text" if report.vision_parameters else "text-generation",
        tags=list(dict.fromkeys(tags)),
        model_name=name,
        eval_results=(_eval_results(perplexity) if perplexity else [])
        + (_zero_shot_results(report.zero_shot) if report.zero_shot else [])
        or None,
    )
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a causal language model"
    summary = (
        f"{config.method}, {config.pattern} pattern, global sparsity {report.global_sparsity:.2%} over "
        f"{len(report.layers)} linear layers of the decoder blocks."
    )
    if report.structure is not None:
        parameters = report.structure["parameters"]
        summary = (
            f"structured pruning scored by {config.method}, a smaller dense model ({parameters['original'] / 1e6:.1f}M "
            f"-> {parameters['kept'] / 1e6:.1f}M parameters) that loads with stock transformers"
            + (f", then {report.global_sparsity:.2%} unstructured sparsity." if config.sparsity else ".")
        )
    sections = [
        f"# {name}\n\n{origin} pruned with optimum-prune {__version__}: {summary}",
        "## Pruning recipe\n\n" + _markdown_table(["setting", "value"], [list(row) for row in _recipe(config, report)]),
    ]
    if recovery is not None:
        sections.append(_recovery_section(recovery, recovery_plot))
    if perplexity:
        sections.append(_perplexity_section(perplexity))
    if report.zero_shot:
        sections.append(_zero_shot_section(report.zero_shot))
    if report.speed:
        sections.append(speed_section(report.speed))
    if plot:
        sections.append(f"## Sparsity per block\n\n![Achieved sparsity per block and layer kind]({plot})")
    sections.append("## How to load\n\n" + _load_snippet(repo_id, format, report.vision_parameters > 0))
    layer_rows = [
        [f"`{name}`", shape, f"{target:.3f}", f"{achieved:.4f}"] for name, _, shape, target, achieved in report.rows()
    ]
    sections.append(
        "## Per-layer sparsity\n\n<details>\n<summary>Target and achieved sparsity of every pruned layer</summary>\n\n"
        + _markdown_table(["layer", "shape", "target", "achieved"], layer_rows)
        + "\n\n</details>"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def gguf_card(repo_id: str, base_model: str, files: list[tuple[str, int]]) -> ModelCard:
    """The card of a ``<name>-GGUF`` repository holding ``files`` (name, bytes) of the pruned model ``base_model``:
    a quantized relation to it, as the Hub's GGUF repositories declare, and how llama.cpp and Ollama run them."""
    data = ModelCardData(
        base_model=base_model, base_model_relation="quantized", library_name="gguf",
        tags=["gguf", "llama.cpp", "pruned", "optimum-prune"],
    )  # fmt: skip
    kinds = [name.rsplit("-", 1)[-1].removesuffix(".gguf") for name, _ in files]
    rows = [[f"`{name}`", kind, f"{size / 1e6:.1f} MB"] for (name, size), kind in zip(files, kinds, strict=True)]
    first = kinds[0] if kinds else "Q4_0"
    text = (
        f"# {repo_id.split('/')[-1]}\n\nGGUF files of [{base_model}](https://huggingface.co/{base_model}), a model "
        "pruned with optimum-prune, for llama.cpp, Ollama and LM Studio (its recipe and measurements are on its own "
        "card).\n\n"
        + _markdown_table(["file", "weights", "size"], rows)
        + f"\n\n## Run\n\n```bash\nollama run hf.co/{repo_id}:{first}\nllama-cli -hf {repo_id}:{first}\n```\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
