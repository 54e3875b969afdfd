"""Upload a saved model folder to the Hugging Face Hub in one commit; the token is never logged."""

from __future__ import annotations

import os

from huggingface_hub import CommitInfo, HfApi, constants, get_token


def resolve_token(token: str | None) -> str:
    """``token``, else the locally saved one (``HF_TOKEN`` or ``hf auth login``); a clear error when there is none."""
    token = token if token is not None else get_token()
    if not token:
        raise ValueError(
            "Pushing to the Hub needs a write token: set HF_TOKEN or run `hf auth login` (or pass token=... in Python)."
        )
    return token


def push_folder(
    folder: str | os.PathLike, repo_id: str, *, token: str, private: bool = False, commit_message: str
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload ``folder`` (a saved model with its README.md card) in one commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model")


def check_can_push(token: str | None) -> str:
    """The token to push with; a clear error, before anything is written or sent, when there is none or the
    Hub is switched off (``HF_HUB_OFFLINE``)."""
    token = resolve_token(token)
    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it to push to the Hub.")
    return token
