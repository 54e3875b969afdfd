"""70% sparsity, uniform versus OWL (outlier-weighted layerwise sparsity, arXiv 2310.05175), on SmolLM2-135M.

At high sparsity OWL keeps more weights in the blocks with many activation outliers and fewer elsewhere,
at the same global sparsity:

    python examples/owl_70.py --method wanda

A quick look with small settings: ``--num-samples 8 --seq-len 128 --eval-windows 4``.
"""

from __future__ import annotations

import argparse
import copy

from common import add_common_arguments, evaluation_text, load_model

from optimum_prune import Pruner, PruningConfig, perplexity


def main() -> None:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--method", default="wanda", help="magnitude, wanda, sparsegpt or sparsellm")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--owl-m", type=float, default=5.0, help="outlier threshold (times the block mean)")
    parser.add_argument("--owl-lambda", type=float, default=0.08, help="block sparsities within +- lambda")
    args = parser.parse_args()

    dense, tokenizer = load_model(args.model)
    text = evaluation_text(args.eval_text)
    results = {"dense": perplexity(dense, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows)}
    for allocation in ("uniform", "owl"):
        config = PruningConfig(
            method=args.method,
            sparsity=args.sparsity,
            allocation=allocation,
            owl_m=args.owl_m,
            owl_lambda=args.owl_lambda,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
        )
        pruner = Pruner.from_pretrained(copy.deepcopy(dense), config, tokenizer=tokenizer, device="cpu")
        report = pruner.prune(args.dataset)
        blocks = ", ".join(f"{s:.3f}" for s in report.block_sparsities)
        print(f"{allocation}: global sparsity {report.global_sparsity:.4f}, block sparsities [{blocks}]")
        results[allocation] = perplexity(
            pruner.model, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows
        )
    print(f"perplexity ({args.eval_windows} x {args.seq_len} tokens, {args.method} at {args.sparsity:g}):")
    for name, value in results.items():
        print(f"  {name:<8} {value:.3f}")


if __name__ == "__main__":
    main()
