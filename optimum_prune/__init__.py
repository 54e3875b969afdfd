"""optimum-prune: prune Hugging Face causal LMs block by block and ship the result.

The public names load lazily (PEP 562), so ``import optimum_prune.cli`` and ``optimum-cli --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# Public name -> the submodule that defines it.
_EXPORTS = {
    "Pruner": ".pruner",
    "PruningConfig": ".config",
    "PruningReport": ".report",
    "perplexity": ".evaluation",
    "evaluate": ".evaluation.harness",
    "ZeroShotTasks": ".evaluation.harness",
    "load_pruned": ".export.loading",
    "load_masks": ".export.loading",
    "apply_masks": ".export.masks",
    "decompress": ".export.compressed",
    "compress": ".export.compressed",
    "export_gguf": ".export.gguf",
    "export_onnx": ".export.onnx",
}

if TYPE_CHECKING:
    from .config import PruningConfig
    from .evaluation import perplexity
    from .evaluation.harness import ZeroShotTasks, evaluate
    from .export.compressed import compress, decompress
    from .export.gguf import export_gguf
    from .export.loading import load_masks, load_pruned
    from .export.masks import apply_masks
    from .export.onnx import export_onnx
    from .pruner import Pruner
    from .report import PruningReport


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Pruner",
    "PruningConfig",
    "PruningReport",
    "ZeroShotTasks",
    "__version__",
    "apply_masks",
    "compress",
    "decompress",
    "evaluate",
    "export_gguf",
    "export_onnx",
    "load_masks",
    "load_pruned",
    "perplexity",
]
