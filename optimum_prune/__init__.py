"""optimum-prune: prune Hugging Face causal LMs block by block and ship the result."""

__version__ = "0.1.0"

from .config import PruningConfig  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .pruner import Pruner  # noqa: E402
from .report import PruningReport  # noqa: E402

__all__ = ["Pruner", "PruningConfig", "PruningReport", "__version__", "perplexity"]
