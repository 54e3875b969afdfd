"""Where two pruned copies of a model stop having the same masks: per-block agreement of their zero patterns.

Used to tell a method difference from float drift in the llm-compressor side by side: prune the same token ids
with both workers of ``benchmarks/compare_llmcompressor.py`` (``--worker ours|theirs --config wanda-2:4
--model-folder DIR --ids IDS.pt --output FILE.safetensors``), then::

    python benchmarks/mask_agreement.py ours.safetensors theirs.safetensors

A method difference shows from the first block on; drift starts with a handful of near-tied weights and grows
block by block, as each block's changed outputs feed the next.
"""

from __future__ import annotations

import argparse
import re

import torch
from safetensors.torch import load_file

_BLOCK = re.compile(r"\.(\d+)\.")


def mask_agreement(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[int, tuple[int, int]]:
    """For every decoder block, (mask entries that differ, mask entries) over its 2-D weights."""
    if first.keys() != second.keys():
        raise ValueError("The two files hold different tensors: compare pruned copies of one model.")
    blocks: dict[int, tuple[int, int]] = {}
    for name, tensor in first.items():
        match = _BLOCK.search(name)
        if tensor.dim() != 2 or match is None:
            continue
        block = int(match.group(1))
        different = int(((tensor == 0) != (second[name] == 0)).sum())
        previous = blocks.get(block, (0, 0))
        blocks[block] = (previous[0] + different, previous[1] + tensor.numel())
    return dict(sorted(blocks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    for block, (different, total) in mask_agreement(load_file(args.first), load_file(args.second)).items():
        print(f"block {block:3d}: {different:8d} of {total} mask entries differ ({1 - different / total:.4%} agree)")


if __name__ == "__main__":
    main()
