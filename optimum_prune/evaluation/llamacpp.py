"""A GGUF file run by a real llama.cpp: xllamacpp's in-process llama.cpp server (the ``llamacpp`` extra).

llama.cpp's server returns the log-probability of each generated token computed from the raw logits (before
any sampler) and the top ones beside it, but no log-probabilities for prompt tokens. So `token_logprobs` walks a
sequence one position at a time, the prefix cached: each request is the tokens so far with the next one forced by
a logit bias, and the forced token's log-probability is the model's ``log p(next | prefix)``. A token that is
only part of a UTF-8 character comes back without probabilities (the server holds partial text back); at such a
position a complete token is forced instead and the true one is read from the full list of the vocabulary's
log-probabilities. Speed comes from the server's own timings (prompt and generation tokens per second).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

LLAMACPP_INSTALL = 'Running GGUF files needs llama.cpp through xllamacpp: pip install "optimum-prune[llamacpp]".'
FORCED_BIAS = 1e9  # a logit bias no other token overcomes: the next token is the one asked


def check_llamacpp() -> str:
    """xllamacpp's version, or the install hint as an `InputError`."""
    if importlib.util.find_spec("xllamacpp") is None:
        raise InputError(LLAMACPP_INSTALL)
    return importlib.metadata.version("xllamacpp")


class LlamaCpp:
    """``path`` (a ``.gguf`` file) loaded by llama.cpp with a context of ``context`` tokens on ``threads`` threads."""

    def __init__(self, path: str | os.PathLike, context: int = 2048, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file() or path.suffix != ".gguf":
            raise InputError(f"{path} is not a .gguf file: pass the file export_gguf wrote.")
        check_llamacpp()
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = context
        params.n_batch = params.n_ubatch = min(context, 512)
        if threads is not None:
            params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        self.path = path
        self.server = xllamacpp.Server(params)
        self._vocab: int | None = None
        self._complete: int | None = None  # a token whose text is whole, forced where the true one is partial

    def _complete_ids(self, prompt: list[int], **request: Any) -> dict:
        result = self.server.handle_completions({"prompt": prompt, "cache_prompt": True, **request})
        if "error" in result:
            raise RuntimeError(f"llama.cpp: {result['error'].get('message', result['error'])}")
        return result

    def _forced(self, prefix: list[int], token: int, top: int = 1) -> dict | None:
        choice = self._complete_ids(prefix, n_predict=1, n_probs=top, logit_bias=[[token, FORCED_BIAS]])["choices"][0]
        content = (choice.get("logprobs") or {}).get("content")
        return content[0] if content else None

    def token_logprobs(self, tokens: Sequence[int]) -> list[float]:
        """``log p(tokens[i] | tokens[:i])`` for every ``i >= 1``, computed by llama.cpp."""
        values = []
        for i in range(1, len(tokens)):
            prefix = list(tokens[:i])
            forced = self._forced(prefix, tokens[i])
            if forced is None:  # part of a character: force a whole token, read the true one among all
                forced = self._forced(prefix, self._whole_token(prefix), top=self._vocabulary())
                logprob = next(entry["logprob"] for entry in forced["top_logprobs"] if entry["id"] == tokens[i])
            else:
                logprob = forced["logprob"]
            values.append(logprob)
        return values

    def _vocabulary(self) -> int:
        """The size of the file's vocabulary (read once)."""
        if self._vocab is None:
            import gguf

            reader = gguf.GGUFReader(self.path)
            self._vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        return self._vocab

    def _whole_token(self, prefix: list[int]) -> int:
        """The most likely token after ``prefix`` whose text is whole (it comes back with probabilities)."""
        if self._complete is None:
            choice = self._complete_ids(prefix, n_predict=1, n_probs=64)["choices"][0]
            candidates = [entry["id"] for entry in choice["logprobs"]["content"][0]["top_logprobs"]]
            self._complete = next(t for t in candidates if self._forced(prefix, t) is not None)
        return self._complete

    def speed(self, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
        """llama.cpp's own prefill and decode tokens/s for ``prompt`` then ``new_tokens`` greedy tokens (no cache
        reused, end of text ignored)."""
        result = self.server.handle_completions(
            {"prompt": list(prompt), "n_predict": new_tokens, "cache_prompt": False, "ignore_eos": True,
             "temperature": 0.0}
        )  # fmt: skip
        timings = result["timings"]
        return timings["prompt_per_second"], timings["predicted_per_second"]
