"""Inference speed of structured outputs against the dense model and the 50% / 2:4 sparse ones.

Speed depends on shapes, not on values, so every model here is SmolLM2-135M's architecture with random
weights: the dense config, the configs that structured pruning writes (-15%, -30%, -50% of the parameters),
and the dense config with 50% unstructured and 2:4 zeros (what optimum-prune's dense output of those runs is).
Prefill: one forward over a 512-token prompt; decode: 128 single-token steps with the KV cache (greedy). Tokens per
second at batch 1 and 8, parameters and the size of the dense safetensors file beside them. The
``structured-speed`` section of docs/benchmarks.md is rewritten from the results.

    python benchmarks/structured_speed.py                 # CPU, every thread
    python benchmarks/structured_speed.py --device cuda   # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "structured-speed.json"
SMOLLM2 = {  # HuggingFaceTB/SmolLM2-135M's config.json
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
}
VARIANTS = {  # name -> (config changes, zeros)
    "dense": ({}, None),
    "structured MLP -25% (-15% parameters)": ({"intermediate_size": 1152}, None),
    "structured MLP -50% (-30% parameters)": ({"intermediate_size": 768}, None),
    "structured MLP -50%, 1 of 3 KV groups, 12 of 30 blocks (-50% parameters)": (
        {
            "intermediate_size": 768,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "num_hidden_layers": 18,
        },
        None,
    ),  # fmt: skip
    "50% unstructured (dense output)": ({}, "50%"),
    "2:4 (dense output)": ({}, "2:4"),
}


def build(changes: dict, zeros: str | None, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**SMOLLM2, **changes}), dtype=dtype).eval()
    if zeros is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() == 2 and "layers." in name:
                    groups = parameter.view(-1, 4) if zeros == "2:4" else parameter.view(1, -1)
                    count = 2 if zeros == "2:4" else parameter.numel() // 2
                    drop = groups.abs().argsort(dim=1)[:, :count]
                    groups.scatter_(1, drop, 0.0)
    return model.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model: torch.nn.Module, batch: int, prompt: int, new: int, device: str) -> tuple[float, float]:
    """Prefill and decode tokens per second, best of two runs each. Decode: ``new`` single-token steps with the
    KV cache, after an untimed prefill."""
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, prompt), device=device)
    prefill = decode = float("inf")
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        output = model(input_ids=ids, use_cache=True)
        _sync(device)
        prefill = min(prefill, time.perf_counter() - start)
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new):
            output = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = min(decode, time.perf_counter() - start)
    return batch * prompt / prefill, batch * new / decode


def file_size(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    rows = []
    for name, (changes, zeros) in VARIANTS.items():
        model = build(changes, zeros, dtype, args.device)
        row = {"parameters": sum(p.numel() for p in model.parameters()), "file_bytes": file_size(model)}
        for batch in args.batches:
            row[f"batch {batch}"] = measure(model, batch, args.prompt, args.new_tokens, args.device)
            print(name, batch, row[f"batch {batch}"], flush=True)
        results.setdefault(device_name, {})[name] = row
        del model
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    dense = results[device_name]["dense"]
    for name, row in results[device_name].items():
        cells = [name, f"{row['parameters'] / 1e6:.1f}M", f"{row['file_bytes'] / 2**20:.0f} MiB"]
        for batch in args.batches:
            prefill, decode = row[f"batch {batch}"]
            base_prefill, base_decode = dense[f"batch {batch}"]
            cells += [f"{prefill:.0f} ({prefill / base_prefill:.2f}x)", f"{decode:.1f} ({decode / base_decode:.2f}x)"]
        rows.append(cells)
    headers = ["model", "parameters", f"{args.dtype} file"]
    for batch in args.batches:
        headers += [f"prefill tok/s, batch {batch}", f"decode tok/s, batch {batch}"]
    write_section(
        "structured-speed",
        "\n".join(
            [
                "## Structured pruning: inference speed",
                "",
                f"Command: `python benchmarks/structured_speed.py --device {args.device} --dtype {args.dtype}` on "
                f"{device_name}, torch {torch.__version__}: SmolLM2-135M's architecture with random weights, a "
                f"{args.prompt}-token prompt, {args.new_tokens} decode steps (greedy, KV cache), best of two runs. "
                "The ratio is against dense. The unstructured and 2:4 rows are the dense files optimum-prune "
                "writes for those runs: dense kernels do not skip zeros, so only the structured rows get faster.",
                "",
                table(headers, rows),
            ]
        ),
    )


if __name__ == "__main__":
    main()
