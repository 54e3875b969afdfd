"""Tokens/s of dense and pruned SmolLM2-135M exported to ONNX, in onnxruntime and (where it installs) DeepSparse.

    OMP_NUM_THREADS=1 python benchmarks/onnx_speed.py [--threads 1] [--prompt 128] [--decode 32] [--write-docs]

The dense model is exported once with `optimum_prune.export_onnx`; each pruned variant (magnitude 50%, 70%,
2:4) is the same graph with the pruned weights written into the initializers of the same names, checked
equal to the PyTorch weights. Every engine runs in its own process on the same inputs: prefill is one forward
of ``--prompt`` tokens with an empty cache, decode is one new token over a ``--prompt``-token cache (the
shape a generation step has). DeepSparse 1.8 runs from ``benchmarks/.venv-deepsparse`` (created with
``python3.11 -m venv benchmarks/.venv-deepsparse && benchmarks/.venv-deepsparse/bin/pip install
deepsparse==1.8.0``); it is skipped when that venv is missing. The worker half of this file imports only
numpy and the engine, so it runs in that venv too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPARSE_PYTHON = REPO / "benchmarks" / ".venv-deepsparse" / "bin" / "python"
GAIN = 1.15  # net speed ratio counted as a speed-up rather than drift
_KEEP: list = []  # temporary folders that must outlive the engine reading them
VARIANTS = {"dense": None, "50%": ("unstructured", 0.5), "70%": ("unstructured", 0.7), "2:4": ("2:4", None)}


# ---- worker: runs in the engine's own process (and venv); numpy and the engine only ---------------------------


def _inputs(prompt: int, new: int, past: int, cache: list[int], layers: int, vocab: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, vocab, (1, new)).astype(np.int64),
        np.ones((1, past + new), dtype=np.int64),
        np.arange(past, past + new, dtype=np.int64)[None],
    ]
    return arrays + [rng.standard_normal((1, cache[0], past, cache[1]), dtype=np.float32) for _ in range(2 * layers)]


def _time(run, inputs: list, repeats: int) -> float:
    run(inputs)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(inputs)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _runner(engine: str, model: str, threads: int, inputs: list):
    """A ``run(inputs) -> outputs`` callable of ``engine`` for ``model`` at the shapes of ``inputs``."""
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda arrays: session.run(None, dict(zip(names, arrays, strict=True)))
    import shutil
    import tempfile

    from deepsparse import Engine

    # DeepSparse rewrites the file it is given with its static shapes: hand it a copy, removed at exit.
    folder = tempfile.TemporaryDirectory(prefix="onnx-speed-")
    _KEEP.append(folder)
    copy = shutil.copyfile(model, Path(folder.name) / "model.onnx")
    return Engine(str(copy), batch_size=1, num_cores=threads, input_shapes=[list(a.shape) for a in inputs]).run


def worker(args: argparse.Namespace) -> None:
    """Print ``{"prefill": tokens/s, "decode": tokens/s}`` for one model file and one engine."""
    cache = json.loads(args.cache)
    result = {}
    for phase, (new, past) in {"prefill": (args.prompt, 0), "decode": (1, args.prompt)}.items():
        if args.worker == "deepsparse":
            # DeepSparse compiles static shapes and takes no zero-length cache: prefill gets a one-slot cache
            # that the attention mask hides (one extra key per query).
            past = max(past, 1)
        inputs = _inputs(args.prompt, new, past, cache, args.layers, args.vocab)
        if phase == "prefill":
            inputs[1][:, :past] = 0
        run = _runner(args.worker, args.model, args.threads, inputs)
        result[phase] = new / _time(run, inputs, args.repeats)
    print(json.dumps(result))


# ---- driver: exports, prunes, launches the workers, writes docs/benchmarks.md -------------------------------


def build_variants(folder: Path, model_name: str) -> tuple[dict[str, dict], dict]:
    """Export the dense model and write each pruned variant's ONNX; return per-variant info and cache shapes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    sys.path.insert(0, str(REPO))
    from benchmarks.models import load_model
    from optimum_prune import Pruner, PruningConfig, export_onnx

    model, tokenizer = load_model(model_name)
    dense_dir = folder / "dense"
    start = time.perf_counter()
    export_onnx(model, dense_dir, tokenizer=tokenizer, overwrite=True)
    export_seconds = time.perf_counter() - start
    graph = onnx.load(dense_dir / "model.onnx")
    past = next(i for i in graph.graph.input if i.name == "past_key_values.0.key")
    dims = [d.dim_value for d in past.type.tensor_type.shape.dim]
    shapes = {
        "cache": [dims[1], dims[3]],
        "layers": sum(1 for i in graph.graph.input if i.name.endswith(".key")),
        "vocab": model.config.vocab_size,
        "export_seconds": export_seconds,
    }
    variants = {"dense": {"path": dense_dir / "model.onnx", "sparsity": 0.0}}
    by_name = {init.name: init for init in graph.graph.initializer}
    for name, recipe in VARIANTS.items():
        if recipe is None:
            continue
        pattern, sparsity = recipe
        pruned, _ = load_model(model_name)
        config = PruningConfig(method="magnitude", pattern=pattern, **({"sparsity": sparsity} if sparsity else {}))
        pruner = Pruner(pruned, config, device="cpu", progress=False)
        report = pruner.prune()
        for layer in report.layers:
            weight = pruned.get_submodule(layer.name).weight.detach().numpy().T
            init = by_name[f"{layer.name}.weight"]
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight), init.name))
        path = folder / name.replace(":", "-").replace("%", "pct") / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(graph, path)
        stored = {init.name: numpy_helper.to_array(init) for init in onnx.load(path).graph.initializer}
        for layer in report.layers:
            expected = pruned.get_submodule(layer.name).weight.detach().numpy().T
            assert np.array_equal(stored[f"{layer.name}.weight"], expected), layer.name
        variants[name] = {"path": path, "sparsity": report.global_sparsity}
        graph = onnx.load(dense_dir / "model.onnx")
        by_name = {init.name: init for init in graph.graph.initializer}
    return variants, shapes


def measure(engine: str, path: Path, shapes: dict, args: argparse.Namespace) -> dict | str:
    python = sys.executable if engine == "onnxruntime" else str(DEEPSPARSE_PYTHON)
    command = [python, __file__, "--worker", engine, "--model", str(path), "--threads", str(args.threads)]
    command += ["--prompt", str(args.prompt), "--repeats", str(args.repeats), "--cache", json.dumps(shapes["cache"])]
    command += ["--layers", str(shapes["layers"]), "--vocab", str(shapes["vocab"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NM_DISABLE_ANALYTICS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per engine run")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "onnx_speed")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the docs from <workdir>/results.json")
    parser.add_argument("--worker", choices=["onnxruntime", "deepsparse"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results_file = args.workdir / "results.json"
    if args.render:
        return write_docs(json.loads(results_file.read_text()), rendered=True)

    load_before = os.getloadavg()[0]
    variants, shapes = build_variants(args.workdir, args.model)
    engines = ["onnxruntime"] + (["deepsparse"] if DEEPSPARSE_PYTHON.exists() else [])
    measured = {}
    for name, info in variants.items():
        for engine in engines:
            measured[f"{name} {engine}"] = measure(engine, info["path"], shapes, args)
            print(name, engine, measured[f"{name} {engine}"], flush=True)
    run = {
        "command": f"OMP_NUM_THREADS={args.threads} python benchmarks/onnx_speed.py --threads {args.threads} "
        f"--prompt {args.prompt} --repeats {args.repeats} --write-docs",
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "threads": args.threads,
        "prompt": args.prompt,
        "repeats": args.repeats,
        "load": [load_before, os.getloadavg()[0]],
        "export_seconds": shapes["export_seconds"],
        "engines": engines,
        "sparsity": {name: info["sparsity"] for name, info in variants.items()},
        "results": measured,
    }
    results_file.write_text(json.dumps(run, indent=1))
    if args.write_docs:
        write_docs(run)


def _ratios(run: dict, engine: str) -> dict[tuple[str, str], float]:
    """Pruned over dense tokens/s of ``engine``, per (variant, phase), where both ran."""
    dense = run["results"][f"dense {engine}"]
    ratios = {}
    for name in run["sparsity"]:
        value = run["results"][f"{name} {engine}"]
        if name != "dense" and isinstance(value, dict) and isinstance(dense, dict):
            ratios.update({(name, phase): value[phase] / dense[phase] for phase in ("prefill", "decode")})
    return ratios


def _readings(run: dict) -> str:
    """What the ratios say. onnxruntime runs dense kernels on every variant, so its spread is the machine's drift;
    DeepSparse's ratio divided by onnxruntime's on the same file and phase is the part sparsity can explain."""
    baseline = _ratios(run, "onnxruntime")
    if not baseline:
        return "- onnxruntime did not run (see the table)."
    lines = [
        f"- **onnxruntime**: pruned/dense between {min(baseline.values()):.2f}x and {max(baseline.values()):.2f}x. "
        "Its kernels are the same dense ones for every variant, so this spread is the drift of the shared machine "
        "(the rows ran one after the other, in table order)."
    ]
    if "deepsparse" not in run["engines"]:
        return lines[0]
    ratios = _ratios(run, "deepsparse")
    for phase in ("prefill", "decode"):
        net = {name: ratios[name, phase] / baseline[name, phase] for name, p in ratios if p == phase}
        if not net:
            lines.append(f"- **DeepSparse {phase}**: did not run (see the table).")
            continue
        listed = ", ".join(f"{name} {value:.2f}x" for name, value in net.items())
        if min(net.values()) >= GAIN:
            verdict = "faster on every pruned variant"
        elif max(net.values()) < GAIN:
            verdict = "no gain beyond the drift on any variant"
        else:
            verdict = "faster on " + ", ".join(name for name, value in net.items() if value >= GAIN) + " only"
        lines.append(
            f"- **DeepSparse {phase}**: pruned/dense divided by onnxruntime's pruned/dense on the same file: "
            f"{listed}; {verdict} (a gain counts from {GAIN:.2f}x)."
        )
    return "\n".join(lines)


def _cell(value: dict | str, phase: str, dense: dict | str) -> str:
    if isinstance(value, str):
        return value
    ratio = f" ({value[phase] / dense[phase]:.2f}x)" if isinstance(dense, dict) else ""
    return f"{value[phase]:.1f}{ratio}"


def write_docs(run: dict, rendered: bool = False) -> None:
    """Write the ``onnx_speed`` section; ``rendered``: from a saved ``results.json``, not a fresh run."""
    sys.path.insert(0, str(REPO))
    from benchmarks.markdown import table, write_section

    engines = run["engines"]
    headers = ["variant", "sparsity"] + [f"{e} {phase} tok/s" for e in engines for phase in ("prefill", "decode")]
    rows = []
    for name, sparsity in run["sparsity"].items():
        row = [name, f"{sparsity:.1%}"]
        for engine in engines:
            value, dense = run["results"][f"{name} {engine}"], run["results"][f"dense {engine}"]
            row += [_cell(value, phase, dense) for phase in ("prefill", "decode")]
        rows.append(row)
    readings = _readings(run)
    note = " (this text rendered later from its `results.json` with `--render`)" if rendered else ""
    markdown = f"""## ONNX inference speed: dense vs pruned

`{run["command"]}`{note} on {run["date"]}: a 2-core CPU (AVX2, no AVX-512) shared with other jobs, Python
{run["python"]}, {run["threads"]} thread(s). Its 1-minute load average was {run["load"][0]:.1f} at the start and
{run["load"][1]:.1f} at the end, so absolute numbers are noisy; compare the ratios. Model: SmolLM2-135M-Instruct
(dequantized GGUF, fp32), exported once with `export_onnx` ({run["export_seconds"]:.0f} s); each pruned variant
(magnitude pruning) is the same graph with its pruned weights written into the initializers of the same names.
Prefill: one forward of {run["prompt"]} tokens with an empty cache (DeepSparse: a masked one-slot cache, as it
takes no empty one). Decode: one token over a {run["prompt"]}-token cache. Median of {run["repeats"]} runs after a
warm-up; in brackets, speed relative to dense on the same engine.

{table(headers, rows)}

{readings}

Where unstructured sparsity does and does not speed things up:

- The exported files keep pruned weights as exact zeros in ordinary dense initializers: every variant's
  `model.onnx` has the dense size. To ship fewer bytes, save with `format="compressed"`.
- onnxruntime's CPU `MatMul` kernels are dense: they multiply the zeros like any other value, so pruning does
  not change the work it does; use it as the control for the drift of a shared machine.
- DeepSparse is the engine that reads the zeros in dense initializers. Here it runs its AVX2 build (its log:
  `system=avx2, binary=avx2`) in fp32; its sparse kernels are tuned first for AVX-512/VNNI CPUs and for
  sparse int8 models, which this table does not cover.
- Each cell is one process on a machine whose load moved during the run: treat a single gain here as an
  observation to confirm on a quiet machine (`--threads`, `--repeats`), not as a measured constant.
- 2:4 is a GPU pattern (sparse tensor cores, through TensorRT or cuSPARSELt); on a CPU it is just 50%
  unstructured sparsity with a constraint.
"""
    write_section("onnx_speed", markdown)


if __name__ == "__main__":
    main()
