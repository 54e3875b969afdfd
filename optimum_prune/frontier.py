"""Which output to ship: candidates (dense or pruned, in each engine's formats) measured on the user's model and
machine, their Pareto front of perplexity against decode speed and size, and a recommendation per constraint.

Each pruning is made once for each grid its formats need (float; or with its kept weights rounded by GPTQ onto
the low-bit format's grid) and saved under ``<output>/models``; every format is exported from it, measured in its
own engine (perplexity on the exported file, its size, prefill and decode tokens/s interleaved with the dense
model in the engine's first format) and recorded in ``<output>/frontier.json`` as it finishes, so a stopped run
resumes where it was. A speed ratio whose spread overlaps the baseline's is no measurable difference
(`evaluation.speed.compare_speed`), never a speedup.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .structured.spec import parse_size

# engine -> its formats: (format name, the GPTQ grid its prune rounds onto, or None for a float prune)
ENGINE_FORMATS = {
    "llamacpp": [("q8_0", None), ("q4_0", "q4_0")],
    "onnxruntime": [("fp32", None), ("int8", None), ("int4", "int4")],
}
DEFAULT_PRUNINGS = {  # label -> PruningConfig arguments (None: the dense model); the method: its default, SparseGPT
    "dense": None,
    "budget -15%": {"sparsity": 0.0, "structure": {"params": 0.85}, "reconstruct": True},
    "budget -30%": {"sparsity": 0.0, "structure": {"params": 0.7}, "reconstruct": True},
}
RESULTS = "frontier.json"


@dataclass
class Row:
    """One measured candidate."""

    pruning: str
    engine: str
    format: str
    perplexity: float
    bytes: int
    decode: float  # median tokens/s
    prefill: float
    decode_ratio: float  # median over the baseline's median
    decode_verdict: str  # `compare_speed`'s, against the baseline
    engine_version: str = ""
    threads: int | None = None
    hardware: str = ""

    @property
    def name(self) -> str:
        return f"{self.pruning}, {self.engine} {self.format}"

    @property
    def measurably_faster(self) -> bool:
        return self.decode_verdict.endswith(": faster")


def pareto(rows: Sequence[Row], axis: str = "decode") -> list[Row]:
    """The rows no other row beats on both perplexity (lower) and ``axis`` (``decode``: higher; ``bytes``: lower)."""

    def better(a: Row, b: Row) -> bool:  # a dominates b
        faster = a.decode >= b.decode if axis == "decode" else a.bytes <= b.bytes
        strictly = a.perplexity < b.perplexity or (a.decode > b.decode if axis == "decode" else a.bytes < b.bytes)
        return a.perplexity <= b.perplexity and faster and strictly

    return [row for row in rows if not any(better(other, row) for other in rows if other is not row)]


@dataclass
class Constraints:
    """What the user asks of the output: a perplexity at most ``max_perplexity`` (``"1.2x"`` of the dense model's in
    the same engine, or an absolute value), a decode speed-up of at least ``min_speedup`` (measurable), a file of
    at most ``max_size`` (``"200MB"``)."""

    max_perplexity: str | None = None
    min_speedup: float | None = None
    max_size: str | None = None
    _size: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_perplexity is not None:
            value = str(self.max_perplexity).strip().lower().removesuffix("x")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or number <= 0:
                raise InputError(
                    f"max_perplexity={self.max_perplexity!r}: give a ratio such as 1.2x or a value such as 40."
                )
        if self.min_speedup is not None and (not math.isfinite(self.min_speedup) or self.min_speedup <= 0):
            raise InputError(f"min_speedup={self.min_speedup!r} must be a positive ratio, e.g. 2.")
        if self.max_size is not None:
            self._size = parse_size(self.max_size)
            if self._size <= 0:
                raise InputError(f"max_size={self.max_size!r} must be a positive size, e.g. 200MB.")

    def perplexity_limit(self, dense: float) -> float | None:
        if self.max_perplexity is None:
            return None
        text = str(self.max_perplexity).strip().lower()
        return float(text.removesuffix("x")) * dense if text.endswith("x") else float(text)

    def recommendations(self, rows: Sequence[Row], dense: dict[str, float]) -> list[str]:
        """One line per constraint given (and one for all of them together): the candidate that meets it best, or
        that none does. ``dense``: the dense model's perplexity in each engine."""
        lines = []

        def within_perplexity(row: Row) -> bool:
            limit = self.perplexity_limit(dense[row.engine])
            return limit is None or row.perplexity <= limit

        def fast_enough(row: Row) -> bool:
            return self.min_speedup is None or (row.measurably_faster and row.decode_ratio >= self.min_speedup)

        def small_enough(row: Row) -> bool:
            return self._size is None or row.bytes <= self._size

        checks = []
        if self.max_perplexity is not None:
            checks.append((f"perplexity at most {self.max_perplexity}", within_perplexity, "decode"))
        if self.min_speedup is not None:
            checks.append((f"decode at least {self.min_speedup:g}x, measurably", fast_enough, "perplexity"))
        if self.max_size is not None:
            checks.append((f"a file of at most {self.max_size}", small_enough, "perplexity"))
        if len(checks) > 1:
            every = [check for _, check, _ in checks]
            checks.append(("all of them", lambda row: all(check(row) for check in every), "decode"))
        for label, check, best in checks:
            meeting = [row for row in rows if check(row)]
            if not meeting:
                lines.append(f"{label}: no candidate meets it")
                continue
            chosen = (
                max(meeting, key=lambda r: r.decode) if best == "decode" else min(meeting, key=lambda r: r.perplexity)
            )
            lines.append(
                f"{label}: {chosen.name} (perplexity {chosen.perplexity:.2f}, {chosen.bytes / 1e6:.1f} MB, decode "
                f"{chosen.decode_verdict})"
            )
        return lines


def check_engines(engines: Sequence[str]) -> None:
    """Refuse, before any work, an engine outside our list or one that is not installed."""
    import importlib.util

    for engine in engines:
        if engine not in ENGINE_FORMATS:
            raise InputError(f"Unknown engine {engine!r}: choose among {', '.join(ENGINE_FORMATS)}.")
        module = {"llamacpp": "xllamacpp", "onnxruntime": "onnxruntime"}[engine]
        if importlib.util.find_spec(module) is None:
            extra = "llamacpp" if engine == "llamacpp" else "onnx"
            raise InputError(f'Engine {engine} is not installed: pip install "optimum-prune[{extra}]".')


def plan(engines: Sequence[str], prunings: dict[str, dict | None]) -> list[tuple[str, str, str, str | None]]:
    """``(pruning, engine, format, GPTQ grid)`` of every candidate, the dense baselines first."""
    return [
        (pruning, engine, name, grid)
        for pruning in prunings
        for engine in engines
        for name, grid in ENGINE_FORMATS[engine]
    ]


def load_rows(output: Path) -> dict[str, dict[str, Any]]:
    path = output / RESULTS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save_row(output: Path, key: str, row: Row) -> None:
    rows = load_rows(output)
    rows[key] = asdict(row)
    partial = output / f"{RESULTS}.partial"
    partial.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, output / RESULTS)


def markdown(rows: Sequence[Row], front: Sequence[Row], recommendations: Sequence[str]) -> str:
    on_front = {row.name for row in front}
    lines = [
        "| candidate | engine | perplexity | size | prefill tokens/s | decode tokens/s | decode vs dense | Pareto front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.engine_version}, {row.threads or 'default'} threads | {row.perplexity:.2f} | "
            f"{row.bytes / 1e6:.1f} MB | {row.prefill:.1f} | {row.decode:.1f} | {row.decode_verdict} | "
            f"{'yes' if row.name in on_front else ''} |"
        )
    if rows:
        lines.append(
            f"\nOn {rows[0].hardware}; perplexity measured on each exported file in its engine; speed at batch 1, "
            "interleaved with the dense model in the engine's first format (median; faster or slower only when the "
            "spreads do not overlap)."
        )
    if recommendations:
        lines += ["", "Recommendations:", *(f"- {line}" for line in recommendations)]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path) -> Path | None:
    """Perplexity against decode tokens/s and against size, the Pareto fronts drawn (matplotlib, when installed)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4.5))
    for ax, axis, label in ((axes[0], "decode", "decode tokens/s"), (axes[1], "bytes", "file size (MB)")):
        values = [row.decode if axis == "decode" else row.bytes / 1e6 for row in rows]
        ax.scatter(values, [row.perplexity for row in rows])
        for row, value in zip(rows, values, strict=True):
            ax.annotate(row.name, (value, row.perplexity), fontsize=7)
        front = sorted(pareto(rows, axis), key=lambda r: r.decode if axis == "decode" else r.bytes)
        ax.plot([r.decode if axis == "decode" else r.bytes / 1e6 for r in front], [r.perplexity for r in front], "r--")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


def prune_arguments(arguments: dict | None, grid: str | None) -> dict | None:
    """The `PruningConfig` arguments (besides ``gptq=grid``) that make a candidate's model, or ``None`` for the
    dense model as it is: rounding the dense model is SparseGPT (the default method) pruning nothing, and GPTQ
    replaces reconstruction (it rounds inside the method, which the training would have to precede)."""
    if arguments is None and grid is None:
        return None
    arguments = dict(arguments or {"sparsity": 0.0})
    if grid is not None:
        arguments.pop("reconstruct", None)
    return arguments


def _pruned_folder(model: str | os.PathLike, label: str, arguments: dict | None, grid: str | None, output: Path,
                   dataset: Any, num_samples: int, seq_len: int) -> Path:  # fmt: skip
    """The saved model of ``label`` (rounded onto ``grid`` by GPTQ when given), pruned once and kept."""
    from .config import PruningConfig
    from .pruner import Pruner

    arguments = prune_arguments(arguments, grid)
    if arguments is None:
        return Path(model)
    folder = output / "models" / _slug(f"{label}-{grid or 'float'}")
    if (folder / "pruning_config.json").is_file():
        return folder
    config = PruningConfig(num_samples=num_samples, seq_len=seq_len, gptq=grid, **arguments)
    import torch

    pruner = Pruner.from_pretrained(model, config, dtype=torch.float32, progress=False)
    pruner.prune(dataset)
    pruner.save_pretrained(folder, overwrite=True)
    return folder


def _export(folder: Path, engine: str, kind: str, path: Path) -> Path:
    if path.exists():
        return path
    if engine == "llamacpp":
        from .export.gguf import export_gguf

        return export_gguf(folder, path, quantize=kind)
    from .export.onnx import export_onnx

    return export_onnx(folder, path, quantize=None if kind == "fp32" else kind)


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    )


def run_frontier(
    model: str | os.PathLike,
    dataset: Any,
    eval_text: str | Sequence[str],
    output: str | os.PathLike,
    *,
    engines: Sequence[str] = ("llamacpp",),
    prunings: dict[str, dict | None] = DEFAULT_PRUNINGS,
    constraints: Constraints | None = None,
    num_samples: int = 64,
    seq_len: int = 512,
    eval_windows: int = 10,
    eval_seq_len: int = 512,
    threads: int | None = None,
    repeats: int = 3,
    prompt_len: int = 128,
    new_tokens: int = 64,
    resume: bool = False,
) -> tuple[list[Row], list[str]]:
    """Measure every candidate (see the module docstring) into ``output``; return the rows and the
    recommendations, written with the table (``frontier.md``), the JSON and the picture (``frontier.png``)."""
    from transformers import AutoTokenizer

    from .evaluation import perplexity
    from .evaluation.speed import measure_speed

    check_engines(engines)
    constraints = constraints or Constraints()
    output = Path(output)
    if (output / RESULTS).is_file() and not resume:
        raise FileExistsError(
            f"{output} holds a frontier run: pass resume=True (--resume) to continue it, or another folder."
        )
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows: list[Row] = []
    baselines: dict[str, Path] = {}
    for label, engine, kind, grid in plan(engines, prunings):
        key = f"{label} | {engine} {kind}"
        folder = _pruned_folder(model, label, prunings[label], grid, output, dataset, num_samples, seq_len)
        suffix = ".gguf" if engine == "llamacpp" else ""
        path = _export(folder, engine, kind, output / "files" / f"{_slug(f'{label}-{kind}')}{suffix}")
        baselines.setdefault(engine, path)  # the dense model in the engine's first format
        stored = load_rows(output).get(key)
        if stored is not None:
            rows.append(Row(**stored))
            continue
        value = perplexity(path, tokenizer, eval_text, seq_len=eval_seq_len, max_windows=eval_windows, bos=False)
        baseline = baselines[engine]
        against = None if path == baseline else baseline
        report = measure_speed(path, against, threads=threads, prompt_len=prompt_len, new_tokens=new_tokens,
                               repeats=repeats)  # fmt: skip
        out = report.output
        ratio, verdict = (1.0, "the baseline") if against is None else report.judged("decode")
        row = Row(label, engine, kind, value, _size(path), out["decode_tokens_per_second"],
                  out["prefill_tokens_per_second"], ratio, verdict, report.engine, threads, report.hardware)  # fmt: skip
        save_row(output, key, row)
        rows.append(row)
    dense = {row.engine: row.perplexity for row in rows if row.decode_verdict == "the baseline"}
    recommendations = constraints.recommendations(rows, dense)
    front = pareto(rows)
    (output / "frontier.md").write_text(markdown(rows, front, recommendations), encoding="utf-8")
    plot(rows, output / "frontier.png")
    return rows, recommendations
