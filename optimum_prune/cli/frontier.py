"""``optimum-prune frontier``: which output to ship (`optimum_prune.frontier`), with every flag checked first."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError


def prunings(args: argparse.Namespace) -> dict:
    """The dense model and each --candidates structure (SparseGPT, reconstructed), by label."""
    from ..config import PruningConfig
    from ..frontier import DEFAULT_PRUNINGS
    from ..structured.spec import parse_structure

    if not args.candidates:
        return DEFAULT_PRUNINGS
    chosen = {"dense": None}
    for text in args.candidates:
        arguments = {"sparsity": 0.0, "structure": parse_structure(text.split()), "reconstruct": True}
        PruningConfig(num_samples=args.num_samples, seq_len=args.seq_len, **arguments)  # refused here if bad
        chosen[text] = arguments
    return chosen


def run_frontier_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check every flag and input, then measure; exit 0, 2 for bad input, 130 when interrupted."""
    from pathlib import Path

    from ..frontier import RESULTS, Constraints, check_engines, plan

    try:
        for name in ("num_samples", "seq_len", "eval_windows", "repeats", "threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
        check_engines(args.engines)
        constraints = Constraints(args.max_perplexity, args.min_speedup, args.max_size)
        chosen = prunings(args)
        if not (Path(args.model) / "config.json").is_file():
            raise InputError(f"--model {args.model}: no config.json there (a local model folder).")
        if (Path(args.output) / RESULTS).is_file() and not args.resume:
            raise InputError(f"--output {args.output} holds a frontier run: add --resume, or choose another folder.")
        from ..calibration import load_texts

        texts = {name: load_texts(getattr(args, name))[0] for name in ("dataset", "eval")}
    except (InputError, ValueError, OSError) as error:
        parser.error(" ".join(str(error).split()))
    candidates = plan(args.engines, chosen)
    if args.dry_run:
        print(
            f"frontier plan: {len(chosen)} prunings x formats of {', '.join(args.engines)} = {len(candidates)} candidates"
        )
        for label, engine, kind, grid in candidates:
            print(f"  {label}: {engine} {kind}" + (f" (kept weights rounded by GPTQ onto {grid})" if grid else ""))
        print(_estimate(args, chosen, candidates))
        return 0
    from ..frontier import run_frontier

    try:
        rows, recommendations = run_frontier(
            args.model, texts["dataset"], texts["eval"], args.output, engines=args.engines, prunings=chosen,
            constraints=constraints, num_samples=args.num_samples, seq_len=args.seq_len, eval_windows=args.eval_windows,
            threads=args.threads, repeats=args.repeats, resume=args.resume,
        )  # fmt: skip
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; finished candidates are kept: add --resume to continue", file=sys.stderr)
        return 130
    except InputError as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print((Path(args.output) / "frontier.md").read_text(encoding="utf-8"))
    return 0


FILE_BYTES_PER_PARAMETER = {"q8_0": 34 / 32, "q4_0": 18 / 32, "fp32": 4.0, "int8": 1.1, "int4": 0.6}  # about


def _estimate(args: argparse.Namespace, chosen: dict, candidates: list) -> str:
    """The plan's pruning time (`Pruner.estimate` of each prune) and disk (saved models and files), before any
    work; measuring (perplexity in each engine, speed) comes on top."""
    from ..config import PruningConfig
    from ..frontier import prune_arguments
    from ..pruner import Pruner

    seconds, disk, parameters = 0.0, 0, 0
    grids = {(label, grid) for label, _, _, grid in candidates if prune_arguments(chosen[label], grid) is not None}
    for label, grid in sorted(grids, key=str):
        arguments = prune_arguments(chosen[label], grid)
        config = PruningConfig(num_samples=args.num_samples, seq_len=args.seq_len, gptq=grid, **arguments)
        estimate = Pruner.estimate(args.model, config, dtype="float32")
        seconds += estimate.seconds
        disk += estimate.weights_bytes  # the saved float32 model
        parameters = estimate.parameters
    files = sum(FILE_BYTES_PER_PARAMETER[kind] for _, _, kind, _ in candidates) * parameters
    return (
        f"estimated: pruning {seconds / 60:.1f} min on this machine, disk {(disk + files) / 1e9:.2f} GB (models and "
        "files, the files counted at the dense size; measuring each candidate's perplexity and speed comes on top)"
    )
