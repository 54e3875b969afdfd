"""Distributed pruning: SmolLM2-135M, SparseGPT 50%, on 1 rank and on N ranks of torch.distributed.

Each rank is a process (gloo on CPU, NCCL with ``--device cuda``: one GPU per rank) with ``--threads`` torch
threads, holding the model and its share of the calibration samples. The time is the pruning alone (model
loading and calibration tokenization excluded), measured on rank 0 between two barriers. The masks of every
run are compared with those of the first run (1 rank), weight by weight. Results go to ``results/distributed.json`` and the ``distributed``
section of docs/benchmarks.md.

    python benchmarks/distributed.py                           # 1 vs 2 ranks, one thread each (a 2-core machine)
    python benchmarks/distributed.py --device cuda --ranks 1 2 4 8 --samples 128 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.markdown import table, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, folder: str) -> None:
    from benchmarks.models import calibration_token_ids, load_model
    from optimum_prune import Pruner, PruningConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=30))
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    config = PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=args.samples, seq_len=args.seq_len)
    ids = calibration_token_ids(tokenizer, args.samples, args.seq_len)
    pruner = Pruner(model, config, tokenizer, device=f"cuda:{rank}" if cuda else "cpu", progress=False)
    dist.barrier()
    start = time.perf_counter()
    report = pruner.prune(ids)
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        torch.save(
            {"seconds": seconds, "masks": pruner.masks, "sparsity": report.global_sparsity},
            Path(folder) / f"{world}.pt",
        )
    dist.destroy_process_group()


def _differing_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many bits differ between two packed masks."""
    xor = (a ^ b).to(torch.int64)
    return int(sum(((xor >> shift) & 1).sum() for shift in range(8)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for world in args.ranks:
            mp.start_processes(_rank, args=(world, _free_port(), args, folder), nprocs=world, start_method="spawn")
            runs[world] = torch.load(Path(folder) / f"{world}.pt")
            print(f"{world} rank(s): {runs[world]['seconds']:.1f} s", flush=True)
    base = runs[args.ranks[0]]
    rows = []
    for world, run in runs.items():
        differ = sum(_differing_bits(run["masks"][name], bits) for name, bits in base["masks"].items())
        total = sum(8 * bits.numel() for bits in base["masks"].values())
        rows.append(
            {
                "ranks": world,
                "seconds": round(run["seconds"], 1),
                "speedup": round(base["seconds"] / run["seconds"], 2),
                "global_sparsity": run["sparsity"],
                "mask_agreement": f"{1 - differ / total:.5f}",
            }
        )
    setup = {"device": args.device, "threads_per_rank": args.threads, "samples": args.samples, "seq_len": args.seq_len}
    RESULTS.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    command = "python benchmarks/distributed.py" + (" " + " ".join(argv) if argv else "")
    write_section(
        "distributed",
        f"""## Distributed pruning (torch.distributed)

SmolLM2-135M-Instruct, SparseGPT 50%, {args.samples} x {args.seq_len} C4 calibration tokens, on `{args.device}` with
{args.threads} torch thread(s) per rank (gloo on CPU). Seconds: pruning alone, rank 0, between barriers. Mask agreement:
the fraction of weights pruned (or kept) in both this run and the {args.ranks[0]}-rank run. The ranks sum float32
statistics in another order than one process does, so near-ties can fall the other way, and a differing weight
changes the inputs of every later block.

`{command}`

{table(["ranks", "seconds", "speedup", "global sparsity", "mask agreement"], [list(r.values()) for r in rows])}
""",
    )


if __name__ == "__main__":
    main()
