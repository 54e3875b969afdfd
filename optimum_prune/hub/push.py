"""Upload a saved model folder to the Hugging Face Hub in one commit; the token is never logged."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, constants, get_token

from ..errors import InputError


def resolve_token(token: str | None) -> str:
    """``token``, else the locally saved one (``HF_TOKEN`` or ``hf auth login``); a clear error when there is none."""
    token = token if token is not None else get_token()
    if not token:
        raise InputError(
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


def push_gguf(
    folder: str | os.PathLike, repo_id: str, *, base_model: str, token: str | None = None, private: bool = False
) -> CommitInfo:
    """Upload the ``.gguf`` files of ``folder`` (`export_gguf`'s, the weight type in each name) to their own
    repository ``repo_id`` (``<name>-GGUF``, as the Hub's GGUF repositories are), with a card naming the pruned
    model ``base_model`` it quantizes, in one commit."""
    from .model_card import gguf_card

    files = sorted(Path(folder).glob("*.gguf"))
    if not files:
        raise InputError(f"{folder} holds no .gguf file: export them first (export_gguf, --export gguf).")
    token = check_can_push(token)
    with tempfile.TemporaryDirectory(prefix="optimum-prune-gguf-") as tmp:
        staging = Path(tmp)
        for file in files:  # linked where the file system allows (a GGUF can be gigabytes), else copied
            try:
                os.link(file, staging / file.name)
            except OSError:
                shutil.copy2(file, staging / file.name)
        gguf_card(repo_id, base_model, [(file.name, file.stat().st_size) for file in files]).save(staging / "README.md")
        message = f"Upload {len(files)} GGUF file(s) of {base_model} with optimum-prune"
        return push_folder(staging, repo_id, token=token, private=private, commit_message=message)


def check_can_push(token: str | None, reach: bool = False) -> str:
    """The token to push with; a clear error, before anything is written or sent, when there is none or the
    Hub is switched off (``HF_HUB_OFFLINE``); with ``reach``, also when the Hub cannot be reached or refuses the
    token (one ``whoami`` request: what a long run checks before it starts)."""
    token = resolve_token(token)
    if constants.is_offline_mode():
        raise InputError("HF_HUB_OFFLINE is set: unset it to push to the Hub.")
    if reach:
        try:
            HfApi(token=token).whoami()
        except Exception as error:  # httpx's connection errors or the Hub's HTTP error: all mean "cannot push"
            cause = " ".join(str(error).split())[:200] or type(error).__name__
            raise InputError(
                f"cannot use the Hub at {constants.ENDPOINT} ({type(error).__name__}: {cause}): check the network, "
                "HF_ENDPOINT and the token, or save with --output now and push that folder later (`hf upload REPO "
                "DIR`)."
            ) from None
    return token


def kept_push_folder(repo_id: str) -> Path:
    """Where the folder of a push that failed is kept: a new folder named after the repository, in the
    current directory."""
    base = Path.cwd() / f"{repo_id.replace('/', '--')}.unpushed"
    folder, number = base, 1
    while folder.exists():
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    return folder
