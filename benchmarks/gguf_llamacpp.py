"""GGUF files of dense and structured models in llama.cpp: perplexity computed by llama.cpp itself, file size, and
(``--speed``, run alone on the machine) prefill and decode tokens/s at 1 and 2 threads, interleaved with the dense
file of the same type.

Each pruned model is made once (SparseGPT structure on C4 calibration, and again with ``gptq="q4_0"`` for the GPTQ
row) and written as f32, q8_0, q4_0 (each weight rounded on its own) and q4_0 (GPTQ). Perplexity: WikiText-2 raw
test for SmolLM2, TinyStories val for the tiny models, windows of 512 tokens without BOS; the float model's
PyTorch perplexity on the same windows is beside it. llama.cpp's perplexity goes one token a request (about 0.1-0.2
s a token for SmolLM2 on this CPU), so ``--eval-windows`` is small. Results go to
``benchmarks/results/gguf-<model>.json`` as each file finishes, skipped when there (``--force``), and the
``gguf-<model>`` section of docs/benchmarks.md is rewritten after each.

    python benchmarks/gguf_llamacpp.py --models tinystories-656k --eval-windows 4
    python benchmarks/gguf_llamacpp.py --models smollm2-135m --samples 32 --eval-windows 2
    python benchmarks/gguf_llamacpp.py --models smollm2-135m --speed --threads 1 2   # alone on the machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section  # noqa: E402
from benchmarks.models import CACHE  # noqa: E402
from benchmarks.quality import eval_text, results_lock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRUNINGS = {"dense": None, "structured -15%": {"mlp": 0.27}, "structured -30%": {"mlp": 0.52}}
FILES = {"f32": ("f32", False), "q8_0": ("q8_0", False), "q4_0 (RTN)": ("q4_0", False), "q4_0 (GPTQ)": ("q4_0", True)}


def model_folder(model: str, pruning: str, gptq: bool, samples: int) -> Path:
    """The saved float model of ``pruning`` (with ``gptq``, rounded onto the q4_0 grid while pruned), made once."""
    import torch

    from benchmarks.models import calibration_token_ids, load_model
    from benchmarks.models import model_folder as source
    from optimum_prune import Pruner, PruningConfig

    if pruning == "dense" and not gptq:
        return source(model)
    folder = CACHE / "gguf-benchmark" / f"{model}-{pruning}{'-gptq' if gptq else ''}-{samples}".replace(" ", "_")
    if (folder / "model.safetensors").is_file():
        return folder
    model_, tokenizer = load_model(model)
    structure = PRUNINGS[pruning]
    config = PruningConfig(
        method="sparsegpt", sparsity=0.0, structure=structure, gptq="q4_0" if gptq else None, num_samples=samples,
        seq_len=512,
    )  # fmt: skip
    pruner = Pruner(model_.to(torch.float32), config, tokenizer, device="cpu", progress=False)
    pruner.prune(calibration_token_ids(tokenizer, samples, 512, config.seed))
    pruner.save_pretrained(folder, overwrite=True)
    return folder


def gguf_file(model: str, pruning: str, kind: str, samples: int) -> Path:
    from optimum_prune import export_gguf

    quantize, gptq = FILES[kind]
    folder = model_folder(model, pruning, gptq, samples)
    path = (
        CACHE
        / "gguf-benchmark"
        / f"{model}-{pruning}-{kind}-{samples}.gguf".replace(" ", "_").replace("(", "").replace(")", "")
    )
    return path if path.is_file() else export_gguf(folder, path, quantize=quantize)


def quality(model: str, pruning: str, kind: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_prune import perplexity

    path = gguf_file(model, pruning, kind, args.samples)
    folder = model_folder(model, pruning, FILES[kind][1], args.samples)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text, _ = eval_text(model)
    start = time.perf_counter()
    value = perplexity(path, tokenizer, text, seq_len=512, max_windows=args.eval_windows, bos=False)
    seconds = time.perf_counter() - start
    float_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = perplexity(float_model, tokenizer, text, seq_len=512, max_windows=args.eval_windows, bos=False)
    parameters = sum(p.numel() for p in {id(p): p for p in float_model.parameters()}.values())
    return {"perplexity": value, "pytorch_perplexity": reference, "bytes": path.stat().st_size,
            "parameters": parameters, "eval_seconds": seconds}  # fmt: skip


def speed(model: str, pruning: str, kind: str, args: argparse.Namespace) -> dict:
    from optimum_prune.evaluation.speed import measure_speed

    path, dense = gguf_file(model, pruning, kind, args.samples), gguf_file(model, "dense", kind, args.samples)
    dense_f32 = gguf_file(model, "dense", "f32", args.samples)
    measured = {}
    for threads in args.threads:
        for name, against in (("", dense), ("_vs_f32", dense_f32)):
            report = measure_speed(path, against, threads=threads, prompt_len=128, new_tokens=64, repeats=args.repeats)
            measured[f"{threads}{name}"] = report.to_dict()
    return measured


def results_path(model: str) -> Path:
    return RESULTS / f"gguf-{model}.json"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".json.partial-{os.getpid()}")
    partial.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)


def markdown(model: str, results: dict, args: argparse.Namespace) -> str:
    _, data = eval_text(model)
    lines = [
        f"### {model} in llama.cpp (xllamacpp {_xllamacpp_version()})",
        "",
        f"`python benchmarks/gguf_llamacpp.py --models {model} --samples {args.samples} --eval-windows {args.eval_windows}` "
        f"(then `--speed` alone on the machine). Perplexity on {data}, {args.eval_windows} x 512 tokens without BOS, "
        "computed by llama.cpp; beside it PyTorch's on the same windows for the weights the file was made from (for "
        "GPTQ rows: rounded), and the ratio to the unrounded float model of the same pruning (its f32 row's PyTorch "
        "value). Structures: "
        "SparseGPT (OBS) MLP channels, C4 calibration.",
        "",
    ]
    rows = []
    for key, result in results.items():
        pruning, kind = key.split(" | ")
        quality_ = result.get("quality", {})
        if "error" in quality_:
            rows.append([pruning, kind, "error: " + quality_["error"][:60], "", "", "", "", ""])
            continue
        if not quality_:
            continue
        base = results.get(f"{pruning} | f32", {}).get("quality", {}).get("pytorch_perplexity")
        ratio = quality_["perplexity"] / base if base else float("nan")  # against the float (unrounded) model
        speeds = []
        for threads in args.threads:
            for suffix in ("", "_vs_f32"):
                measured = result.get("speed", {}).get(f"{threads}{suffix}")
                speeds.append(measured["verdict"].split(";")[0].removeprefix("decode ") if measured else "not measured")
        rows.append([
            pruning, kind, f"{quality_['parameters'] / 1e6:.1f}M", f"{quality_['bytes'] / 1e6:.1f} MB",
            f"{quality_['perplexity']:.2f}", f"{quality_['pytorch_perplexity']:.2f}", f"{ratio:.3f}x", *speeds,
        ])  # fmt: skip
    headers = ["model", "file", "parameters", "size", "llama.cpp ppl", "PyTorch ppl, same weights", "vs float model"]
    headers += [f"{t}-thread decode vs dense {than}" for t in args.threads for than in ("same type", "f32")]
    return "\n".join(lines) + table(headers, rows)


def _xllamacpp_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("xllamacpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tinystories-656k"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--speed", action="store_true", help="time the files instead (run alone on the machine)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", help="only the rows whose 'pruning | file' contains this text")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    phase = "speed" if args.speed else "quality"
    for model in args.models:
        path = results_path(model)
        for pruning in PRUNINGS:
            for kind in FILES:
                key = f"{pruning} | {kind}"
                if (args.rows and args.rows not in key) or (phase in load(path).get(key, {}) and not args.force):
                    continue
                print(f"{model}: {key} ({phase}) ...", flush=True)
                try:
                    result = (speed if args.speed else quality)(model, pruning, kind, args)
                except Exception as error:  # recorded; the next row goes on
                    result = {"error": f"{type(error).__name__}: {error}"}
                with results_lock():
                    results = load(path)
                    results.setdefault(key, {})[phase] = result
                    save(path, results)
                    write_section(f"gguf-{model}", markdown(model, results, args))
                print(f"  {json.dumps(result)[:300]}", flush=True)


if __name__ == "__main__":
    main()
