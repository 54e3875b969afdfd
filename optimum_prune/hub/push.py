"""Upload a pruned model to the Hugging Face Hub in one commit: weights, tokenizer, recipe and model card."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitInfo, HfApi, constants, get_token

from ..export.compressed import check_format
from .model_card import check_perplexity, hub_base_model

if TYPE_CHECKING:
    from ..pruner import Pruner


def resolve_token(token: str | None) -> str:
    """``token``, else the locally saved one (``HF_TOKEN`` or ``hf auth login``); a clear error when there is none."""
    token = token if token is not None else get_token()
    if not token:
        raise ValueError(
            "Pushing to the Hub needs a write token: set HF_TOKEN or run `hf auth login` (or pass token=... in Python)."
        )
    return token


def push_to_hub(
    pruner: Pruner,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    format: str = "dense",
    perplexity: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> CommitInfo:
    """Stage the pruned model (``pruner.save_pretrained``) and its README.md card, then create the repo and commit.

    Every check (pruned model, format, perplexity, token, offline mode) runs before anything is written or sent.
    """
    if pruner.report is None:
        raise RuntimeError("Nothing to push yet: call prune() first.")
    check_format(format)
    check_perplexity(perplexity)
    token = resolve_token(token)
    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it to push to the Hub.")
    card = pruner.model_card(
        repo_id, format=format, perplexity=perplexity, base_model=base_model or hub_base_model(pruner.source)
    )
    message = commit_message or (
        f"Upload {pruner.config.method} {pruner.config.pattern} pruned model "
        f"({pruner.report.global_sparsity:.1%} sparse) with optimum-prune"
    )
    with tempfile.TemporaryDirectory(prefix="optimum-prune-push-") as tmp:
        folder = Path(tmp) / "model"
        pruner.save_pretrained(folder, format=format)
        card.save(folder / "README.md")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message, repo_type="model")
