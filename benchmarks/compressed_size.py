"""Size on disk of the compressed sparse format against dense safetensors, and the time to save and load it.

For every dtype (fp32, fp16, bf16) and sparsity (50%, 70% unstructured, 2:4) a model is pruned by magnitude, saved
dense and compressed, and the compressed folder is loaded back and checked bit-exact. Sizes count the weight files
only (shards and their index). Models: a random-init Llama of realistic layer shapes (hidden 1024, intermediate
2816, 16 heads, 8 KV heads, vocab 32000; the default 4 blocks keep it quick), and two real models in bf16:
TinyStories-656K and SmolLM2-135M-Instruct (30 blocks, tied embeddings; see benchmarks/models.py).

    OMP_NUM_THREADS=1 python benchmarks/compressed_size.py            # prints the table and writes docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from benchmarks.markdown import table, write_section  # noqa: E402
from benchmarks.models import ASSETS, model_folder  # noqa: E402
from optimum_prune import Pruner, PruningConfig, load_pruned  # noqa: E402
from optimum_prune.core.safetensors import DTYPES as STORED_DTYPES  # noqa: E402
from optimum_prune.export.compressed import read_index  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPARSITIES = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"pattern": "2:4"}}


def llama_1024(layers: int, dtype: torch.dtype) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tinystories(dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(ASSETS / "models" / "TinyStories-656K", dtype=dtype).eval()


def smollm2(dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_folder("smollm2-135m"), dtype=dtype).eval()


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight shards and their index (tokenizer and configs left out)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model") and p.is_file())


def pruned_layer_bytes(folder: Path) -> tuple[int, int]:
    """Dense bytes of the pruned weights and the bytes the compressed encodings store for them."""
    dense = stored = 0
    for entry in read_index(folder)["tensors"].values():
        if entry["encoding"] not in ("bitmask", "nm"):
            continue
        numel = torch.Size(entry["shape"]).numel()
        element = torch.empty((), dtype=STORED_DTYPES[entry["dtype"]]).element_size()
        dense += numel * element
        if entry["encoding"] == "bitmask":
            stored += entry["kept"] * element + (numel + 7) // 8
        else:
            kept = numel * entry["n"] // entry["m"]
            stored += kept * element + (kept * entry["index_bits"] + 7) // 8
    return dense, stored


def measure(label: str, build, dtype_name: str, sparsity_name: str, workdir: Path) -> list[object]:
    model = build(DTYPES[dtype_name])
    pruner = Pruner(model, PruningConfig(method="magnitude", **SPARSITIES[sparsity_name]), device="cpu", progress=False)
    pruner.prune()
    dense_dir, sparse_dir = workdir / "dense", workdir / "compressed"
    start = time.perf_counter()
    pruner.save_pretrained(dense_dir, overwrite=True)
    dense_save = time.perf_counter() - start
    start = time.perf_counter()
    pruner.save_pretrained(sparse_dir, format="compressed", overwrite=True)
    sparse_save = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_pruned(sparse_dir)
    sparse_load = time.perf_counter() - start
    expected = pruner.model.state_dict()
    exact = all(torch.equal(t.view(torch.uint8), expected[n].view(torch.uint8)) for n, t in loaded.state_dict().items())
    dense, compressed = weight_bytes(dense_dir), weight_bytes(sparse_dir)
    layers_dense, layers_stored = pruned_layer_bytes(sparse_dir)
    mib = 2**20
    return [
        label,
        dtype_name,
        sparsity_name,
        f"{dense / mib:.1f}",
        f"{compressed / mib:.1f}",
        f"{compressed / dense:.3f}",
        f"{layers_dense / dense:.0%}",
        f"{layers_stored / layers_dense:.3f}",
        f"{dense_save:.1f}",
        f"{sparse_save:.1f}",
        f"{sparse_load:.1f}",
        "yes" if exact else "NO",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks of the hidden-1024 Llama")
    parser.add_argument("--no-write", action="store_true", help="print the table without updating docs/benchmarks.md")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    models = [
        (
            f"Llama hidden 1024, {args.layers} blocks (random init)",
            lambda dtype: llama_1024(args.layers, dtype),
            DTYPES,
        ),
        ("TinyStories-656K", tinystories, ["bf16"]),
        ("SmolLM2-135M-Instruct (dequantized GGUF)", smollm2, ["bf16"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, build, dtypes in models:
            for dtype_name in dtypes:
                for sparsity_name in SPARSITIES:
                    rows.append(measure(label, build, dtype_name, sparsity_name, Path(tmp)))
                    print(" | ".join(map(str, rows[-1])), flush=True)
    headers = [
        "model",
        "dtype",
        "sparsity",
        "dense MiB",
        "compressed MiB",
        "compressed / dense",
        "pruned share of dense",
        "pruned layers only",
        "dense save s",
        "compressed save s",
        "compressed load s",
        "bit-exact",
    ]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    command = "OMP_NUM_THREADS=1 python benchmarks/compressed_size.py" + (
        f" --layers {args.layers}" if args.layers != 4 else ""
    )
    markdown = f"""## Compressed sparse safetensors: size on disk

Command: `{command}` (magnitude pruning; sizes count the weight shards and their index only).

Machine: 2 shared CPU cores (torch CPU, OMP_NUM_THREADS={threads}), {started:%Y-%m-%d %H:%M} UTC. Other engineers
used the same cores, so the save/load seconds are noisy; the sizes are exact.

"compressed / dense" is the whole weight folder, embeddings and `lm_head` (never pruned) included, so it depends on
how much of the model the pruned layers hold ("pruned share of dense"; the decoder blocks of a 7B Llama hold 96% of
its weights). "pruned layers only" is the ratio for the pruned weights alone, which is what a
deep model tends to. Every compressed folder was loaded back with `optimum_prune.load_pruned` and compared byte
for byte with the pruned model ("bit-exact").

{table(headers, rows)}
"""
    print(markdown)
    if not args.no_write:
        write_section("compressed-size", markdown)


if __name__ == "__main__":
    main()
