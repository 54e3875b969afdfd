"""Prune a model, measure its perplexity and push it to the Hugging Face Hub with a model card.

The token comes from ``HF_TOKEN`` or ``hf auth login`` and is never printed. ``--endpoint`` points at another
Hub (a private one, or a local test server):

    HF_TOKEN=hf_... python examples/push_to_hub.py --repo-id you/stories260K-wanda-50 --private
"""

from __future__ import annotations

import argparse
import os

import huggingface_hub
from common import ASSETS, add_common_arguments, evaluation_text, load_model

from optimum_prune import Pruner, PruningConfig, perplexity


def main() -> None:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), model="")
    parser.set_defaults(model=str(ASSETS / "models" / "stories260K"))
    parser.add_argument("--repo-id", required=True, help="user/name of the repository to create or update")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--format", default="dense", help="dense or compressed (docs/formats.md)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--endpoint", help="Hub URL (default: huggingface.co, or HF_ENDPOINT)")
    args = parser.parse_args()
    if args.endpoint:
        huggingface_hub.constants.ENDPOINT = args.endpoint.rstrip("/")  # HfApi() reads it when created

    model, tokenizer = load_model(args.model)
    text = evaluation_text(args.eval_text)
    before = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows)
    config = PruningConfig(
        method=args.method, sparsity=args.sparsity, num_samples=args.num_samples, seq_len=args.seq_len
    )
    pruner = Pruner.from_pretrained(model, config, tokenizer=tokenizer, device="cpu")
    pruner.prune(args.dataset)
    after = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.eval_windows)
    print(f"perplexity: dense {before:.3f} -> pruned {after:.3f}")
    scores = {"dataset": os.path.basename(args.eval_text), "before": before, "after": after}
    commit = pruner.push_to_hub(args.repo_id, private=args.private, format=args.format, perplexity=scores)
    print(f"pushed to {commit.commit_url}")


if __name__ == "__main__":
    main()
