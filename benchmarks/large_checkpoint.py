"""A checkpoint larger than the machine's memory, pruned for real: a Llama-2-7B-shaped model (hidden 4096, 32
blocks, intermediate 11008, 32 heads, random init) in float32 safetensors shards, about 27 GB, pruned on the CPU
with ``offload="disk"`` from 8 x 128 calibration tokens.

1. The checkpoint is written block by block (`benchmarks.memory.build_model`), one shard per block.
2. Wanda 50%, in a fresh process: peak RSS (``VmHWM``), wall time and the dry-run estimate made before any weight
   was loaded; the output folder's size and the disk space the run used at most.
3. The output is checked shard by shard, one tensor at a time (never loaded whole): every pruned layer holds
   exactly 50% zeros, and transformers reads its config and index.
4. SparseGPT 50% on a checkpoint of the first two blocks of the same shapes: seconds per block, extrapolated to
   32 blocks, beside the estimate.

Results go to ``benchmarks/results/large-checkpoint.json`` and the ``large-checkpoint`` section of
docs/benchmarks.md. Needs about 60 GB of free disk in ``--workdir``.

    python benchmarks/large_checkpoint.py --workdir /var/tmp/large
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section
from benchmarks.memory import _hwm, build_model

LLAMA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SAMPLES, SEQ_LEN = 8, 128
RESULTS = Path(__file__).resolve().parent / "results" / "large-checkpoint.json"


def worker(source: str, output: str, method: str) -> None:
    """One pruning run in this fresh process; prints a JSON line with the measurements."""
    import torch

    from optimum_prune import Pruner, PruningConfig

    config = PruningConfig(method=method, sparsity=0.5, num_samples=SAMPLES, seq_len=SEQ_LEN, batch_size=4)
    estimate = Pruner.estimate(source, config, device="cpu", offload="disk")
    ids = torch.randint(0, LLAMA_7B["vocab_size"], (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    pruner = Pruner.from_pretrained(source, config, device="cpu", offload="disk", progress=False)
    report = pruner.prune(ids, output_dir=output)
    result = {
        "method": method,
        "seconds": time.perf_counter() - start,
        "block_seconds": report.block_seconds,
        "peak_rss_bytes": _hwm(),
        "estimate_host_peak_bytes": estimate.host_peak_bytes,
        "estimate_seconds": estimate.seconds,
        "estimate_disk_bytes": estimate.disk_bytes,
        "global_sparsity": report.global_sparsity,
    }
    print("RESULT " + json.dumps(result), flush=True)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def prune(source: Path, output: Path, method: str, workdir: Path) -> dict:
    """Run `worker` in a subprocess while sampling the disk space the run uses (the output and its work folder)."""
    used = {"most": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(2.0):
            total = sum(folder_bytes(path) for path in workdir.iterdir() if path.name.startswith(output.name))
            used["most"] = max(used["most"], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    command = [sys.executable, __file__, "--worker", str(source), str(output), method]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    stop.set()
    sampler.join()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"The {method} run failed:\n{done.stderr[-4000:]}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), "disk_used_bytes": used["most"]}


def check_output(folder: Path) -> dict:
    """Every 2-D weight of the blocks in ``folder``'s shards, read one tensor at a time: its share of zeros."""
    from safetensors import safe_open
    from transformers import AutoConfig

    AutoConfig.from_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shares = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as file:
            for name in file.keys():  # noqa: SIM118 (not a dict)
                if ".layers." in name and name.endswith("proj.weight"):
                    tensor = file.get_tensor(name)
                    shares[name] = int((tensor == 0).sum()) / tensor.numel()
    exact = sum(share == 0.5 for share in shares.values())
    return {"layers_checked": len(shares), "layers_exactly_half_zero": exact, "output_bytes": folder_bytes(folder)}


def render(result: dict) -> str:
    gb = 1e9
    wanda, sparsegpt = result["wanda"], result["sparsegpt_two_blocks"]
    per_block = sparsegpt["block_seconds"]
    extrapolated = sum(per_block) / len(per_block) * LLAMA_7B["num_hidden_layers"]
    rows = [
        ["checkpoint", f"{result['checkpoint_bytes'] / gb:.1f} GB float32, {LLAMA_7B['num_hidden_layers']} shards + 1",
         "machine RAM", f"{result['ram_bytes'] / gb:.1f} GB"],
        ["Wanda 50%: peak RSS", f"{wanda['peak_rss_bytes'] / gb:.2f} GB",
         "estimated", f"{wanda['estimate_host_peak_bytes'] / gb:.2f} GB"],
        ["Wanda 50%: time", f"{wanda['seconds']:.0f} s", "estimated",
         f"{wanda['estimate_seconds']:.0f} s ({wanda['seconds'] / wanda['estimate_seconds']:.2f}x)"],
        ["Wanda 50%: disk used at most (output + work folder)", f"{wanda['disk_used_bytes'] / gb:.1f} GB",
         "estimated", f"{wanda['estimate_disk_bytes'] / gb:.1f} GB"],
        ["output", f"{result['check']['output_bytes'] / gb:.1f} GB",
         "layers exactly 50% zero (read shard by shard)",
         f"{result['check']['layers_exactly_half_zero']} of {result['check']['layers_checked']}"],
        ["SparseGPT 50%, first two blocks: s per block", ", ".join(f"{s:.0f}" for s in per_block),
         "extrapolated to 32 blocks", f"{extrapolated:.0f} s (estimate for 2 blocks: {sparsegpt['estimate_seconds']:.0f} s, "
         f"measured {sparsegpt['seconds']:.0f} s: {sparsegpt['seconds'] / sparsegpt['estimate_seconds']:.2f}x)"],
    ]  # fmt: skip
    return "\n".join([
        "## A checkpoint larger than memory: Llama-2-7B shapes on the CPU",
        "",
        "Random-init Llama with Llama-2-7B's shapes (hidden 4096, 32 blocks, intermediate 11008, 32 heads, vocab "
        "32000, untied), float32 safetensors written one shard per block; pruned with `offload=\"disk\"` on the CPU "
        f"from {SAMPLES} x {SEQ_LEN} calibration tokens, each run in a fresh process (peak RSS is its `VmHWM`). "
        f"Command: `{result['command']}`, {result['date']}, {os.cpu_count()}-core CPU shared with other jobs. "
        "Targets of issue 26: peak RSS at most 3 GB, time within 1.5x of the estimate.",
        "",
        table(["measure", "value", "beside", "value"], rows),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where the checkpoints and outputs go (~60 GB; required)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs afterwards")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.render_only:
        write_section("large-checkpoint", render(json.loads(RESULTS.read_text())))
        return
    if args.workdir is None:
        parser.error("--workdir is required: a folder with about 60 GB free.")
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        source = workdir / "llama-7b-shaped"
        if not (source / "config.json").is_file():
            shutil.rmtree(source, ignore_errors=True)
            build_model(source, LLAMA_7B["num_hidden_layers"], shape=LLAMA_7B)
        result = {
            "checkpoint_bytes": folder_bytes(source),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "command": "python benchmarks/large_checkpoint.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
        }
        output = workdir / "wanda-50"
        shutil.rmtree(output, ignore_errors=True)
        result["wanda"] = prune(source, output, "wanda", workdir)
        result["check"] = check_output(output)
        print(json.dumps(result), flush=True)
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)
        two = workdir / "llama-7b-shaped-2-blocks"
        shutil.rmtree(two, ignore_errors=True)
        build_model(two, 2, shape=LLAMA_7B)
        result["sparsegpt_two_blocks"] = prune(two, workdir / "sparsegpt-2-blocks", "sparsegpt", workdir)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        write_section("large-checkpoint", render(result))
        print(json.dumps(result), flush=True)
    finally:
        if not args.keep:
            for name in ("llama-7b-shaped", "wanda-50", "llama-7b-shaped-2-blocks", "sparsegpt-2-blocks"):
                shutil.rmtree(workdir / name, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
