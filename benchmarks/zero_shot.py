"""HellaSwag accuracy of SmolLM2-135M-Instruct, dense and pruned, through lm-evaluation-harness.

Each row loads the model, prunes it (64 x 512 C4 calibration tokens, as benchmarks/quality.py) and runs the
shipped local task ``hellaswag_local`` (0-shot, acc and acc_norm with their standard errors) on the HellaSwag
validation set of the offline assets, llama.cpp's preprocessed text of all 10,042 items (``--limit`` takes the
first N). Perplexities come from benchmarks/quality.py's stored results (WikiText-2, same calibration). Results are
stored per row in ``results/zero-shot-smollm2-135m.json`` as they finish (a rerun skips finished rows), and the
``zero-shot`` section of docs/benchmarks.md is rewritten.

    python benchmarks/zero_shot.py --limit 2000
    python benchmarks/zero_shot.py                  # every item (about 5 hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section  # noqa: E402
from benchmarks.models import ASSETS, calibration_token_ids, load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "zero-shot-smollm2-135m.json"
QUALITY = Path(__file__).resolve().parent / "results" / "quality-smollm2-135m.json"
HELLASWAG = ASSETS / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"
ROWS = [
    ("dense", None),
    ("magnitude", "50%"),
    ("wanda", "50%"),
    ("sparsegpt", "50%"),
    ("magnitude", "2:4"),
    ("wanda", "2:4"),
    ("sparsegpt", "2:4"),
]


def run_row(method: str, sparsity: str | None, limit: int | None, batch_size: int) -> dict:
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.evaluation.harness import ZeroShotTasks

    tasks = ZeroShotTasks(["hellaswag_local"], task_data={"hellaswag_local": HELLASWAG}, limit=limit)
    model, tokenizer = load_model("smollm2-135m")
    result: dict = {"method": method, "sparsity": sparsity}
    if method != "dense":
        pattern = "2:4" if sparsity == "2:4" else "unstructured"
        config = PruningConfig(method=method, sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern)
        config.num_samples, config.seq_len = 64, 512
        pruner = Pruner(model, config, tokenizer, device="cpu", progress=False)
        result["global_sparsity"] = pruner.prune(calibration_token_ids(tokenizer, 64, 512)).global_sparsity
    start = time.perf_counter()
    scores = tasks.evaluate(model, tokenizer, batch_size=batch_size)
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    result["scores"] = {score.metric: {"value": score.value, "stderr": score.stderr} for score in scores}
    result["samples"] = scores[0].samples
    return result


def perplexity_of(method: str, sparsity: str | None) -> float | None:
    stored = json.loads(QUALITY.read_text(encoding="utf-8")) if QUALITY.exists() else {}
    key = f"{method}|{sparsity or '0%'}|uniform|64x512|40w"
    return stored.get(key, {}).get("perplexity")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="the first N items (default: all 10,042)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--write-only", action="store_true", help="rewrite the docs section from stored rows only")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {}
    for method, sparsity in ROWS:
        key = f"{method}|{sparsity or '0%'}|{args.limit or 'all'}"
        if args.write_only:
            continue
        if key not in results:
            results[key] = run_row(method, sparsity, args.limit, args.batch_size)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(key, json.dumps(results[key]["scores"]), flush=True)
    rows = []
    for method, sparsity in ROWS:
        result = results.get(f"{method}|{sparsity or '0%'}|{args.limit or 'all'}")
        if result is None:
            rows.append([method, sparsity or "-", "not run yet", "not run yet", "-"])
            continue
        scores = result["scores"]
        ppl = perplexity_of(method, sparsity)
        rows.append(
            [
                method,
                sparsity or "-",
                *(f"{scores[m]['value']:.4f} ± {scores[m]['stderr']:.4f}" for m in ("acc", "acc_norm")),
                f"{ppl:.2f}" if ppl else "-",
            ]
        )
    items = results[f"dense|0%|{args.limit or 'all'}"]["samples"]
    missing = any(row[2] == "not run yet" for row in rows)
    pending = (
        " Rows marked *not run yet* had not finished when this table was written; the command runs only those."
        if missing
        else ""
    )
    command = "python benchmarks/zero_shot.py" + (f" --limit {args.limit}" if args.limit else "")
    write_section(
        "zero-shot",
        f"""## Zero-shot HellaSwag (lm-evaluation-harness)

SmolLM2-135M-Instruct (from its GGUF file), dense and pruned to 50% / 2:4 with 64 x 512 C4 calibration tokens;
HellaSwag validation through lm-evaluation-harness with the shipped local task `hellaswag_local` (0-shot, the
harness's `hellaswag` scoring: acc = highest log-likelihood ending, acc_norm = highest per character), {items:,}
items of the offline copy (llama.cpp's preprocessed text), mean ± standard error. Perplexity: WikiText-2 raw test,
from the quality table above (same calibration). Each row takes about 20 minutes on 2 CPU cores.{pending}

`{command}`

{table(["method", "sparsity", "acc", "acc_norm", "WikiText-2 ppl"], rows)}

For reference, an independent lm-evaluation-harness 0-shot run of SmolLM2-135M-Instruct reports HellaSwag
acc_norm 42.99% (the "Baseline" column of huggingface.co/lldois/SmolLM2-135M-Reasoning-SLERP-Champion; the official
model card's evaluation uses lighteval, whose number could not be read offline). The settings differ from that run
in three ways: this model is the GGUF file's weights dequantized (its quantization costs a little), the items are
llama.cpp's preprocessed copy of the validation set (whitespace and bracket clean-up done by its extractor, not by the
harness's `preprocess`), and {"the first " + format(items, ",") + " items, not all 10,042" if items < 10042 else "the same 10,042 items"}.
""",
    )


if __name__ == "__main__":
    main()
