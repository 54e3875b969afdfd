"""Recovery after pruning: eval perplexity against training tokens, one-shot + recovery against gradual pruning,
and the training throughput with `SparsityCallback` against a plain Trainer.

For each pruned model (Wanda 50%, SparseGPT 2:4, structured MLP -25% by SparseGPT, the mix a -30% parameter
budget searches) and each way of training (distillation or plain language-model loss, full or LoRA), one run of
``--steps`` steps is evaluated at a few points along the way; gradual pruning to Wanda's 50% runs at each of those budgets. Training text and evaluation
text never overlap: for the asset models, TinyStories val is split (evaluation: its first characters; training:
the rest); for SmolLM2, C4 trains and WikiText-2 evaluates. Results go to ``benchmarks/results/recover-<model>.json``,
the ``recovery`` section of docs/benchmarks.md and a plot, ``docs/recovery-<model>.png``.

    OMP_NUM_THREADS=1 python benchmarks/recover.py --models stories260k --steps 100 --pruned "wanda 50%" \
        "sparsegpt 2:4" "structured MLP -25% (sparsegpt)"
    python benchmarks/recover.py --models smollm2-135m --steps 250 --lr 1e-4 --pruned "sparsegpt 50%" \
        "sparsegpt 2:4" --training "distill, full" --no-gradual --no-throughput
    python benchmarks/recover.py --models smollm2-135m --steps 250 --lr 1e-4 --throughput-only --throughput-steps 30
    python benchmarks/recover.py --models smollm2-135m --steps 250 --lr 1e-4 --pruned "budget -30% params (sparsegpt)" \
        --training "distill, full" --no-gradual --no-throughput

Rows accumulate in the results file (a rerun replaces the rows it runs; other settings start it afresh), so a
slow model can be measured a few rows at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section  # noqa: E402
from benchmarks.models import C4_SAMPLE, TINYSTORIES_VAL, WIKITEXT_TEST  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs"
EVAL_CHARACTERS = 120_000  # the head of TinyStories val is evaluation text, the rest training text
PRUNED = {
    "wanda 50%": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt 50%": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt 2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "structured MLP -25% (sparsegpt)": {"method": "sparsegpt", "structure": {"mlp": 0.25}},
    "budget -30% params (sparsegpt)": {"method": "sparsegpt", "structure": {"params": 0.7}},  # the searched mix
}
TRAINING = {"distill, full": (True, False), "lm, full": (False, False), "distill, LoRA": (True, True)}


def data(model: str, folder: Path) -> tuple[str | Path, str | list[str], str]:
    """Training data, evaluation text and its name, without overlap."""
    if model == "smollm2-135m":
        rows = [json.loads(line)["text"] for line in WIKITEXT_TEST.open(encoding="utf-8")]
        return C4_SAMPLE, rows, "WikiText-2 raw test"
    text = TINYSTORIES_VAL.read_text(encoding="utf-8")
    train = folder / "tinystories_train_part.txt"
    train.write_text(text[EVAL_CHARACTERS:], encoding="utf-8")
    return train, text[:EVAL_CHARACTERS], "TinyStories val (head)"


def evaluate(model, tokenizer, text, windows: int) -> float:
    from optimum_prune.evaluation import perplexity

    return perplexity(model, tokenizer, text, seq_len=256, max_windows=windows)


def run(model_name: str, args: argparse.Namespace, results: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from benchmarks.models import calibration_token_ids, load_model, model_folder
    from optimum_prune import Pruner, PruningConfig

    torch.manual_seed(0)
    results["settings"] = {key: value for key, value in vars(args).items() if key != "models"}
    checkpoints = sorted({max(1, args.steps // 4), max(1, args.steps // 2), args.steps})
    with tempfile.TemporaryDirectory() as tmp:
        train, text, eval_name = data(model_name, Path(tmp))
        results["eval"] = eval_name
        model, tokenizer = load_model(model_name)
        results["dense"] = evaluate(model, tokenizer, text, args.eval_windows)
        tokens_per_step = args.batch_size * args.seq_len

        class Evaluate(TrainerCallback):
            def __init__(self, curve: list) -> None:
                self.curve = curve

            def on_step_end(self, args_, state, control, model=None, **kwargs):
                if state.global_step in checkpoints[:-1] and not hasattr(model, "peft_config"):
                    self.curve.append(
                        (state.global_step * tokens_per_step, evaluate(model, tokenizer, text, args.eval_windows))
                    )

        for pruned_name in args.pruned:
            recipe = PRUNED[pruned_name]
            for training_name in args.training:
                distill, lora = TRAINING[training_name]
                model, tokenizer = load_model(model_name)
                config = PruningConfig(**recipe, num_samples=args.samples, seq_len=args.seq_len)
                pruner = Pruner(
                    model, config, tokenizer, device=args.device, progress=False, source=str(model_folder(model_name))
                )
                pruner.prune(calibration_token_ids(tokenizer, args.samples, args.seq_len, 0))
                pruner.model.to(args.device)  # trained where it was pruned
                curve = [(0, evaluate(pruner.model, tokenizer, text, args.eval_windows))]
                start = time.perf_counter()
                report = pruner.recover(
                    train, max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lora=lora,
                    distill=distill, learning_rate=args.lr * (3 if lora else 1), work_dir=Path(tmp) / "work",
                    callbacks=[Evaluate(curve)],
                )  # fmt: skip
                curve.append((report.tokens, evaluate(pruner.model, tokenizer, text, args.eval_windows)))
                zeros = sum(int((p == 0).sum()) for p in pruner.model.parameters() if p.dim() == 2)
                key = f"{pruned_name} | {training_name}"
                results[key] = {"curve": curve, "seconds": time.perf_counter() - start, "zeros": zeros}
                print(key, curve, flush=True)
        for steps in checkpoints if args.gradual else []:
            results["gradual"] = [point for point in results.get("gradual", []) if point[0] != steps * tokens_per_step]
            model, tokenizer = load_model(model_name)
            pruner = Pruner(
                model.to(args.device), PruningConfig(method="wanda", sparsity=0.5, seq_len=args.seq_len), tokenizer,
                device=args.device, progress=False, source=str(model_folder(model_name)),
            )  # fmt: skip
            pruner.prune_while_training(
                train, max_steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
                work_dir=Path(tmp) / f"gradual-{steps}",
            )  # fmt: skip
            results["gradual"].append(
                (steps * tokens_per_step, evaluate(pruner.model, tokenizer, text, args.eval_windows))
            )
            print("gradual", results["gradual"][-1], flush=True)
        if args.throughput:
            results["throughput"] = throughput(model_name, train, args)
    return results


def throughput(model_name: str, train: Path, args: argparse.Namespace) -> dict:
    """Tokens per second of the same training steps with and without `SparsityCallback` (plain LM loss)."""
    from transformers import Trainer, TrainingArguments

    from benchmarks.models import load_model
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.export.masks import Masks
    from optimum_prune.recovery import RecoveryConfig, SparsityCallback
    from optimum_prune.recovery.train import _Windows, training_windows

    speeds = {}
    for name in ("plain Trainer", "with SparsityCallback", "plain Trainer again"):
        model, tokenizer = load_model(model_name)
        pruner = Pruner(
            model, PruningConfig(method="magnitude", sparsity=0.5), tokenizer, device=args.device, progress=False
        )
        pruner.prune()
        pruner.model.to(args.device)
        config = RecoveryConfig(max_steps=args.throughput_steps, batch_size=args.batch_size, seq_len=args.seq_len)
        ids, _, _ = training_windows(train, tokenizer, config, "text", "train")
        with tempfile.TemporaryDirectory() as tmp:
            training = TrainingArguments(
                output_dir=tmp, max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
                report_to=[], use_cpu=args.device == "cpu", disable_tqdm=True, save_strategy="no", logging_strategy="no",
            )  # fmt: skip
            callbacks = [SparsityCallback(Masks.from_pruner(pruner.model, pruner.masks))] if "with" in name else []
            trainer = Trainer(model=pruner.model, args=training, train_dataset=_Windows(ids), callbacks=callbacks)
            start = time.perf_counter()
            trainer.train()
            speeds[name] = config.max_steps * config.batch_size * config.seq_len / (time.perf_counter() - start)
    return speeds


def plot(model: str, results: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for key, value in results.items():
        if isinstance(value, dict) and "curve" in value:
            tokens, ppl = zip(*value["curve"], strict=True)
            axis.plot(tokens, ppl, marker="o", label=key)
    if results.get("gradual"):
        tokens, ppl = zip(*results["gradual"], strict=True)
        axis.plot(
            tokens, ppl, marker="s", linestyle="--", color="black", label="gradual wanda 50% (one run per budget)"
        )
    axis.axhline(results["dense"], color="grey", linestyle=":", label="dense")
    axis.set(
        xlabel="training tokens", ylabel=f"perplexity, {results['eval']}", yscale="log", title=f"Recovery: {model}"
    )
    axis.legend(fontsize=7)
    path = DOCS / f"recovery-{model}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def model_section(model: str, results: dict) -> list[str]:
    """One model's table, plot and throughput line, from its stored results and the settings they ran with."""
    settings = results["settings"]
    rows = []
    for key, value in results.items():
        if isinstance(value, dict) and "curve" in value:
            (_, pruned), (tokens, last) = value["curve"][0], value["curve"][-1]
            closed = (pruned - last) / (pruned - results["dense"]) if pruned > results["dense"] else float("nan")
            rows.append(
                [
                    key.replace(" | ", ", "),
                    f"{pruned:.2f}",
                    f"{last:.2f}",
                    f"{tokens:,}",
                    f"{closed:.0%}",
                    f"{value['seconds']:.0f}",
                    f"{value['zeros']:,}",
                    "; ".join(f"{tokens:,}: {ppl:.2f}" for tokens, ppl in value["curve"][1:-1]) or "-",
                ]
            )
    for tokens, ppl in results.get("gradual", []):
        rows.append(["gradual wanda 50%, distill, full", "-", f"{ppl:.2f}", f"{tokens:,}", "-", "-", "-", "-"])
    lines = [
        f"### {model}",
        "",
        f"Settings: `--steps {settings['steps']} --samples {settings['samples']} --lr {settings['lr']:g}` (batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens per step, 3x the learning rate with LoRA). "
        f"Perplexity on {results['eval']}, {settings['eval_windows']} windows of 256 tokens; dense "
        f"{results['dense']:.2f}.",
        "",
        table(
            ["model, training", "pruned", "recovered", "tokens", "gap closed", "train s", "zeros", "along the way"],
            rows,
        ),
        "",
        f"![perplexity against training tokens: {model}](recovery-{model}.png)",
    ]
    speeds = results.get("throughput")
    if speeds:
        plain = speeds["plain Trainer"], speeds["plain Trainer again"]
        overhead = 1 - speeds["with SparsityCallback"] / max(plain)
        lines += [
            "",
            f"Training throughput, {settings['throughput_steps']} steps, plain language-model loss: plain Trainer "
            f"{plain[0]:.0f} and {plain[1]:.0f} tokens/s, with `SparsityCallback` "
            f"{speeds['with SparsityCallback']:.0f} tokens/s (overhead {overhead:.1%} against the faster plain run; "
            f"the two plain runs differ by {max(plain) / min(plain) - 1:.1%}).",
        ]
    return lines


def render() -> None:
    """The section, from every model's results file."""
    parts = [
        "## Recovery after pruning",
        "",
        'Commands: the docstring of `benchmarks/recover.py` (one per model). "gap closed" is (pruned - recovered) / '
        '(pruned - dense); "zeros" counts the exact zeros of every matrix after training (the pruned weights stay '
        "zero: the runs check it before writing). LoRA runs are evaluated only at the end, after the masked merge "
        "(the unmerged adapters are dense), so their curves are straight lines.",
    ]
    for path in sorted(RESULTS.glob("recover-*.json")):
        model = path.stem.removeprefix("recover-")
        parts += ["", *model_section(model, json.loads(path.read_text()))]
    write_section("recovery", "\n".join(parts))


def same(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The settings every row of one results file shares."""
    keys = ("steps", "batch_size", "seq_len", "lr", "samples", "eval_windows")
    return [(key, getattr(args, key)) for key in keys]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["stories260k"])
    parser.add_argument("--pruned", nargs="+", choices=list(PRUNED), default=list(PRUNED))
    parser.add_argument("--training", nargs="+", choices=list(TRAINING), default=list(TRAINING))
    parser.add_argument("--no-gradual", dest="gradual", action="store_false")
    parser.add_argument("--no-throughput", dest="throughput", action="store_false")
    parser.add_argument("--device", default="cpu", help="where to prune and train (cuda on a GPU machine)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences of --seq-len tokens")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--throughput-only", action="store_true", help="measure the callback's overhead again")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    for model in [] if args.render_only else args.models:
        path = RESULTS / f"recover-{model}.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        if not args.throughput_only and any(results.get("settings", {}).get(key) != value for key, value in same(args)):
            results = {}  # rows measured with other settings would not compare
        if args.throughput_only:
            with tempfile.TemporaryDirectory() as tmp:
                train, _, _ = data(model, Path(tmp))
                results["throughput"] = throughput(model, train, args)
            results.setdefault("settings", {})["throughput_steps"] = args.throughput_steps  # what the line says
        else:
            results = run(model, args, results)
        path.write_text(json.dumps(results, indent=1))
        plot(model, results)
    render()


if __name__ == "__main__":
    main()
