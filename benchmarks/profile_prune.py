"""Where pruning time goes: the model's own forward code, the statistics hooks, and the pruning math.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/profile_prune.py [--model smollm2-135m] [--methods wanda sparsegpt]
        [--samples 16] [--write]

Runs `Pruner.prune` under cProfile on a benchmark model (C4 calibration, 512-token sequences, batch size 8)
and splits its wall time into:

- **block forward**: the decoder blocks' own code (transformers' modules and the torch ops they call), over
  every pass the engine makes through them, the statistics hooks inside those passes excluded;
- **statistics**: the hooks that feed each target layer's inputs to its statistic;
- **pruning**: the method's `prune_block` (mask selection, weight updates, Hessian inverses);
- **rest**: the first block's inputs (embeddings), moving and packing, bookkeeping.

The block forward is the part any tool running the model's transformers code pays on every pass it makes; the
column "passes" is how many passes through a block each calibration batch makes on average (a statistics pass
that stops at the block's last target layer counts as one).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import pstats
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section
from benchmarks.models import MODELS, calibration_token_ids, load_model

SEQ_LEN = 512
BATCH_SIZE = 8


def _key(function) -> tuple[str, int, str]:
    """The cProfile key of a Python function (decorators unwrapped)."""
    code = inspect.unwrap(function).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def _cumulative(stats: dict, key: tuple[str, int, str] | None) -> float:
    """Cumulative seconds of the function ``key`` (0 if it never ran)."""
    return stats[key][3] if key in stats else 0.0


def profile(model_name: str, method: str, samples: int) -> dict:
    """Prune ``model_name`` with ``method`` under cProfile; return the split of its wall time."""
    from optimum_prune import PruningConfig
    from optimum_prune.core.layers import find_decoder_blocks
    from optimum_prune.engine import blockwise
    from optimum_prune.pruner import Pruner

    model, tokenizer = load_model(model_name)
    ids = calibration_token_ids(tokenizer, samples, SEQ_LEN)
    config = PruningConfig(method=method, sparsity=0.5, batch_size=BATCH_SIZE)
    pruner = Pruner(model, config, device="cpu", progress=False)
    _, blocks = find_decoder_blocks(model)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    pruner.prune(ids)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats

    block_key = _key(type(blocks[0]).forward)
    hook_key = next((key for key in stats if key[0] == blockwise.__file__ and key[2] == "observe"), None)
    engine_key = _key(blockwise.BlockwiseEngine._prune)  # the one caller of the method's prune_block
    pruning = sum(
        callers[engine_key][3]
        for key, (*_, callers) in stats.items()
        if key[2] == "prune_block" and engine_key in callers
    )
    statistics = _cumulative(stats, hook_key)
    forward = _cumulative(stats, block_key) - statistics
    batches = -(-samples // BATCH_SIZE)
    return {
        "model": model_name,
        "method": method,
        "samples": samples,
        "total": total,
        "forward": forward,
        "statistics": statistics,
        "pruning": pruning,
        "rest": total - forward - statistics - pruning,
        "passes": stats[block_key][1] / (len(blocks) * batches) if block_key in stats else 0.0,
    }


def markdown(rows: list[dict], command: str) -> str:
    body = [
        [
            MODELS[r["model"]], r["method"], f"{r['samples']} x {SEQ_LEN}", f"{r['total']:.1f}",
            f"{r['forward']:.1f} ({r['forward'] / r['total']:.0%})", f"{r['statistics']:.1f}",
            f"{r['pruning']:.1f}", f"{r['rest']:.1f}", f"{r['passes']:.2f}",
        ]
        for r in rows
    ]  # fmt: skip
    headers = ["model", "method (50%)", "calibration", "total s", "block forward s", "statistics s", "pruning s",
               "rest s", "passes"]  # fmt: skip
    return "\n".join([
        "## Where pruning time goes",
        "",
        f"Command: `{command}`; one thread, under cProfile (which adds a little to the Python-level calls), "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, 2-core CPU shared with other jobs.",
        "",
        "\"block forward\" is the decoder blocks' own transformers code over every pass the engine makes (statistics "
        "hooks excluded); \"passes\" is how many passes through a block each calibration batch makes on average "
        "(the statistics pass stops at the block's last target layer, and the last block's outputs are not "
        "computed).",
        "",
        table(headers, body),
        "",
        "Any tool doing this work (llm-compressor's sequential pipeline included) runs every calibration batch "
        "through each block's transformers code about as often, so the block forward is a floor on its time: "
        + "; ".join(f"{r['method']} {r['forward']:.0f} s of {r['total']:.0f} s" for r in rows) + ".",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences of 512 tokens")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    command = "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/profile_prune.py", *sys.argv[1:]])
    rows = [profile(args.model, method, args.samples) for method in args.methods]
    text = markdown(rows, command)
    print(text)
    if args.write:
        write_section("profile", text)


if __name__ == "__main__":
    main()
