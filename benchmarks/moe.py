"""A mixture of experts pruned with disk offload: time, peak memory, achieved sparsity, per-expert tokens.

The model has Qwen3-MoE's architecture (transformers 5 fused 3-D experts) at a small shape with random weights
(speed and memory depend on shapes, not on values), saved as safetensors and pruned block by block from the
file (``offload="disk"``). Calibration: random token ids, so routing is close to uniform; real text routes less
evenly, which the histogram of a real model's run would show. The ``moe`` section of docs/benchmarks.md is
rewritten from the results.

    python benchmarks/moe.py                          # CPU, Wanda and SparseGPT at 50%
    python benchmarks/moe.py --device cuda --samples 128 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section  # noqa: E402
from optimum_prune import Pruner, PruningConfig  # noqa: E402
from optimum_prune.core.layers import is_fused_experts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "moe.json"
SHAPE = {  # a Qwen3-MoE of 165M parameters, 126M of them in 8 x 32 experts
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 320,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "max_position_embeddings": 4096,
}


def expert_sparsity(model: torch.nn.Module) -> float:
    """The fraction of zeros in every fused expert parameter, read from the weights."""
    weights = [
        getattr(module, name).detach()
        for module in model.modules()
        if is_fused_experts(module)
        for name in ("gate_up_proj", "down_proj")
    ]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def run(folder: Path, method: str, args: argparse.Namespace) -> dict:
    config = PruningConfig(method=method, sparsity=0.5, num_samples=args.samples, seq_len=args.seq_len, batch_size=8)
    pruner = Pruner.from_pretrained(folder, config, device=args.device, offload="disk", progress=False)
    ids = torch.randint(
        0, SHAPE["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    output = folder.parent / f"pruned-{method}"
    start = time.perf_counter()
    report = pruner.prune(ids, output_dir=output)
    seconds = time.perf_counter() - start
    pruned = AutoModelForCausalLM.from_pretrained(output)
    tokens = [count for counts in report.expert_tokens.values() for count in counts]
    return {
        "method": method,
        "seconds": round(seconds, 1),
        "peak_memory_gib": round(report.peak_memory_bytes / 2**30, 2),
        "reported_sparsity": round(report.global_sparsity, 4),
        "expert_sparsity_in_weights": round(expert_sparsity(pruned), 4),
        "tokens_per_expert": {
            "min": min(tokens),
            "median": sorted(tokens)[len(tokens) // 2],
            "max": max(tokens),
            "histogram": torch.histc(torch.tensor(tokens, dtype=torch.float32), bins=8).int().tolist(),
            "range": [min(tokens), max(tokens)],
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**SHAPE))
    parameters = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    results = {"shape": SHAPE, "parameters": parameters, "expert_parameters": experts, "runs": []}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "dense"
        model.save_pretrained(folder)  # one tensor per expert, as MoE checkpoints on the Hub
        del model
        context = multiprocessing.get_context("spawn")
        for method in args.methods:  # each in a fresh process: its peak memory is the pruning's alone
            with context.Pool(1) as pool:
                results["runs"].append(pool.apply(run, (folder, method, args)))
            print(json.dumps(results["runs"][-1]))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows = [
        [
            r["method"],
            f"{r['seconds']:.1f}",
            f"{r['peak_memory_gib']:.2f}",
            f"{r['reported_sparsity']:.4f}",
            f"{r['expert_sparsity_in_weights']:.4f}",
            f"{r['tokens_per_expert']['min']} / {r['tokens_per_expert']['median']} / {r['tokens_per_expert']['max']}",
            " ".join(str(count) for count in r["tokens_per_expert"]["histogram"]),
        ]
        for r in results["runs"]
    ]
    write_section(
        "moe",
        f"""## Mixture of experts with disk offload

Qwen3-MoE architecture, random weights: {parameters / 1e6:.0f}M parameters, {experts / 1e6:.0f}M of them in
{SHAPE["num_hidden_layers"]} x {SHAPE["num_experts"]} fused experts (top-{SHAPE["num_experts_per_tok"]}),
pruned to 50% from its safetensors file with `offload="disk"` on `{args.device}`, {args.samples} x {args.seq_len}
random calibration tokens. "In weights": zeros counted in the saved and reloaded 3-D expert parameters. The checkpoint
stores one tensor per expert (as `save_pretrained` and the Hub's MoE checkpoints do); each block's fused experts are
assembled from it. Tokens per expert: routed calibration tokens (min / median / max over all {SHAPE["num_hidden_layers"] * SHAPE["num_experts"]}
experts) and their histogram in 8 equal bins. Peak memory: the process's peak resident memory.

`python benchmarks/moe.py`

{table(["method", "seconds", "peak GiB", "reported sparsity", "expert sparsity in weights", "tokens per expert", "histogram"], rows)}
""",
    )


if __name__ == "__main__":
    main()
