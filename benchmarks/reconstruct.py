"""Perplexity after block-wise reconstruction (`PruningConfig(reconstruct=...)`), beside the same prune without it,
measured in the same run.

Each row prunes a fresh copy of the model on C4 calibration tokens and evaluates it (SmolLM2: WikiText-2 raw test,
the tiny models: TinyStories val; windows of 512 tokens, no BOS, the protocol of every table here). Results go to
``benchmarks/results/reconstruct-<model>-<samples>x<seq_len>.json`` as each row finishes (rows already there are
skipped unless ``--force``), and the ``reconstruct-<model>`` section of docs/benchmarks.md is rewritten after every
row. ``--grid issue`` is issue 38's table; ``--grid settings`` the sweep that chose the defaults (one prune, many
reconstruction settings); ``--rows TEXT`` keeps the rows whose label contains TEXT.

    python benchmarks/reconstruct.py --models stories260k tinystories-656k --grid settings --samples 64 --seq-len 256
    python benchmarks/reconstruct.py --models smollm2-135m --grid issue --samples 64 --eval-windows 10 --rows "SparseGPT 70%"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section  # noqa: E402
from benchmarks.quality import eval_text, results_lock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRUNINGS = {  # label -> PruningConfig arguments
    "SparseGPT 50%": {"method": "sparsegpt", "sparsity": 0.5},
    "SparseGPT 70%": {"method": "sparsegpt", "sparsity": 0.7},
    "SparseGPT 2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "ALPS 50%": {"method": "alps", "sparsity": 0.5},
    "ALPS 70%": {"method": "alps", "sparsity": 0.7},
    "ALPS 2:4": {"method": "alps", "pattern": "2:4"},
    "Wanda 50%": {"method": "wanda", "sparsity": 0.5},
    "Wanda 70%": {"method": "wanda", "sparsity": 0.7},
    "Wanda 2:4": {"method": "wanda", "pattern": "2:4"},
    "Wanda-sp MLP -25%": {"method": "wanda", "structure": {"mlp": 0.25}},
    "Wanda-sp MLP -50%": {"method": "wanda", "structure": {"mlp": 0.5}},
    "OBS MLP -25%": {"method": "sparsegpt", "structure": {"mlp": 0.25}},
    "OBS MLP -50%": {"method": "sparsegpt", "structure": {"mlp": 0.5}},
    "budget -15% params": {"method": "sparsegpt", "structure": {"params": 0.85}},
    "budget -30% params": {"method": "sparsegpt", "structure": {"params": 0.7}},
}
SETTINGS = [  # the sweep behind the defaults (epochs 2, lr 3e-3): (label, reconstruct settings) on one prune
    ("lr 1e-3", {"lr": 1e-3}),
    ("lr 3e-4", {"lr": 3e-4}),
    ("epochs 1, lr 1e-3", {"epochs": 1, "lr": 1e-3}),
    ("epochs 4, lr 1e-3", {"epochs": 4, "lr": 1e-3}),
    ("plain MSE, lr 1e-3", {"loss": "mse", "lr": 1e-3}),
    ("dense inputs, lr 1e-3", {"inputs": "dense", "lr": 1e-3}),
]
SETTINGS_PRUNING = "SparseGPT 70%"


def rows(grid: str, pruning: str = SETTINGS_PRUNING) -> list[tuple[str, str, dict | None]]:
    """``(label, pruning, reconstruct settings or None)``: each pruning without, then with reconstruction; the
    settings grid sweeps ``pruning``."""
    if grid == "issue":
        return [(f"{p}{' + reconstruct' if r is not None else ''}", p, r) for p in PRUNINGS for r in (None, {})]
    if grid == "settings":
        sweep = [(f"{pruning} + reconstruct, {label}", pruning, settings) for label, settings in SETTINGS]
        return [(pruning, pruning, None), (f"{pruning} + reconstruct", pruning, {}), *sweep]
    raise ValueError(f"Unknown grid {grid!r}: choose issue or settings.")


def run_row(model_name: str, pruning: str, reconstruct: dict | None, args: argparse.Namespace) -> dict:
    import torch

    from benchmarks.models import calibration_token_ids, load_model
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.evaluation import perplexity

    model, tokenizer = load_model(model_name)
    config = PruningConfig(
        num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, reconstruct=reconstruct,
        **PRUNINGS[pruning],
    )  # fmt: skip
    ids = calibration_token_ids(tokenizer, args.samples, args.seq_len, config.seed)
    pruner = Pruner(model, config, tokenizer, device="cpu", progress=False)
    start = time.perf_counter()
    report = pruner.prune(ids)
    seconds = time.perf_counter() - start
    blocks = report.reconstruction or []
    text, _ = eval_text(model_name)
    value = perplexity(model, tokenizer, text, seq_len=512, max_windows=args.eval_windows, device="cpu", bos=False)
    return {
        "perplexity": value,
        "seconds": seconds,
        "reconstruct_seconds": sum(block["seconds"] for block in blocks),
        "blocks_kept": sum(block["kept"] for block in blocks),
        "blocks": len(blocks),
        "held_out_before": sum(b["held_out_before"] for b in blocks) / len(blocks) if blocks else None,
        "held_out_after": sum(b["held_out_after"] for b in blocks) / len(blocks) if blocks else None,
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "global_sparsity": report.global_sparsity,
        "torch_threads": torch.get_num_threads(),
        "settings": asdict(config.reconstruct) if config.reconstruct is not None else None,  # resolved
    }


def results_path(model: str, args: argparse.Namespace) -> Path:
    return RESULTS / f"reconstruct-{model}-{args.samples}x{args.seq_len}.json"


def load(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save(path: Path, results: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".json.partial-{os.getpid()}")
    partial.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)


def markdown(model: str, path: Path, args: argparse.Namespace) -> str:
    """The table of ``path``'s rows, each reconstructed row beside its one-shot twin."""
    results = load(path)
    _, data = eval_text(model)
    lines = [
        f"### {model}: block-wise reconstruction ({args.samples} x {args.seq_len} C4 calibration tokens, batch "
        f"{args.batch_size}; {data}, {args.eval_windows} x 512, no BOS)",
        "",
        "Measured with `python benchmarks/reconstruct.py --models "
        f"{model} --samples {args.samples} --seq-len {args.seq_len} --eval-windows {args.eval_windows} --grid ...` "
        "on the 2-core CPU. Each reconstructed row ran in the same invocation as its one-shot twin; times are "
        "wall seconds of the whole prune. The held-out error is the per-channel normalised error of each block on "
        "its held-out calibration batches (mean over blocks).",
        "",
    ]
    body = []
    for label, result in results.items():
        if "error" in result:
            body.append([label, "error: " + result["error"][:80], "", "", "", "", ""])
            continue
        base = results.get(label.split(" + reconstruct")[0])
        ratio = f"{result['perplexity'] / base['perplexity']:.3f}x" if base and base is not result else ""
        time_ratio = (
            f"{result['reconstruct_seconds'] / base['seconds']:.2f}x" if base and result["blocks"] else ""
        )  # reconstruction's own seconds over the prune without it
        held = f"{result['held_out_before']:.4f} -> {result['held_out_after']:.4f}" if result["held_out_before"] else ""
        kept = f"{result['blocks_kept']}/{result['blocks']}" if result["blocks"] else ""
        body.append([label, f"{result['perplexity']:.2f}", ratio, f"{result['seconds']:.0f}", time_ratio, held, kept])
    headers = ["row", "perplexity", "vs one-shot", "seconds", "reconstruct s / one-shot s", "held-out error", "kept"]
    return "\n".join(lines) + table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["stories260k"])
    parser.add_argument("--grid", default="issue")
    parser.add_argument("--rows", help="only the rows whose label contains this text")
    parser.add_argument(
        "--settings-pruning", default=SETTINGS_PRUNING, choices=PRUNINGS, help="what --grid settings sweeps"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    for model in args.models:
        path = results_path(model, args)
        for label, pruning, reconstruct in rows(args.grid, args.settings_pruning):
            if args.rows and args.rows not in label:
                continue
            if label in load(path) and not args.force:
                continue
            print(f"{model}: {label} ...", flush=True)
            try:
                result = run_row(model, pruning, reconstruct, args)
            except Exception as error:  # recorded, and the next row goes on
                result = {"error": f"{type(error).__name__}: {error}"}
            with results_lock():
                results = load(path)
                results[label] = result
                save(path, results)
                write_section(f"reconstruct-{model}", markdown(model, path, args))
            print(f"  {json.dumps(result)[:300]}", flush=True)


if __name__ == "__main__":
    main()
