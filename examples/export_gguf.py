"""Prune a model, write it as GGUF for llama.cpp and Ollama, and measure each file in a real llama.cpp.

The MLP is pruned structurally (a smaller dense model), its kept weights rounded by GPTQ onto the q4_0 grid while
pruning (``gptq="q4_0"``), so that the q4_0 file stores exactly them; an f16 file is written beside it. Each file's
perplexity is computed by llama.cpp itself (xllamacpp, the ``llamacpp`` extra), beside PyTorch's:

    python examples/export_gguf.py --output out/tinystories-gguf
    ollama run hf.co/you/tinystories-gguf-GGUF:Q4_0   # after pushing it (optimum_prune.hub.push_gguf)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import ASSETS, add_common_arguments, evaluation_text

from optimum_prune import Pruner, PruningConfig, export_gguf, perplexity


def main() -> None:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), model="")
    parser.set_defaults(model=str(ASSETS / "models" / "TinyStories-656K"), eval_windows=2)
    parser.add_argument("--mlp", type=float, default=0.25, help="share of MLP channels removed")
    parser.add_argument("--output", required=True, help="folder for the pruned model and its gguf/ files")
    args = parser.parse_args()

    config = PruningConfig(
        method="sparsegpt", sparsity=0.0, structure={"mlp": args.mlp}, gptq="q4_0", num_samples=args.num_samples,
        seq_len=args.seq_len,
    )  # fmt: skip
    pruner = Pruner.from_pretrained(args.model, config, device="cpu", dtype=torch.float32)
    pruner.prune(args.dataset)
    pruner.save_pretrained(args.output, overwrite=True)
    text = evaluation_text(args.eval_text)
    measure = {"seq_len": args.seq_len, "max_windows": args.eval_windows}
    print(f"PyTorch: perplexity {perplexity(pruner.model, pruner.tokenizer, text, **measure):.3f}")
    for kind in ("f16", "q4_0"):
        path = export_gguf(args.output, Path(args.output) / "gguf" / f"model-{kind.upper()}.gguf", quantize=kind,
                           overwrite=True)  # fmt: skip
        value = perplexity(path, pruner.tokenizer, text, **measure)
        print(f"llama.cpp {kind}: {path} ({path.stat().st_size / 1e6:.2f} MB), perplexity {value:.3f}")


if __name__ == "__main__":
    main()
