"""An exported ONNX folder run by onnxruntime and called like a transformers causal LM (``model(input_ids=...)
.logits``), so that perplexity measures ONNX outputs, quantized or not, by the protocol it measures models."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoConfig

from ..errors import InputError
from ..export.onnx import ONNX_FILE


class OnnxCausalLM:
    """``folder/model.onnx`` (with or without past inputs) on onnxruntime's CPU provider; ``threads`` limits its
    intra-op threads (default: onnxruntime's)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime

        self.folder = Path(folder)
        if not (self.folder / ONNX_FILE).is_file():
            raise InputError(f"No {ONNX_FILE} in {self.folder}: pass a folder written by export_onnx (--export onnx).")
        self.config = AutoConfig.from_pretrained(self.folder)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            str(self.folder / ONNX_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {value.name: value for value in self.session.get_inputs()}

    def __call__(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        """The logits of a batch of ``input_ids`` (no cache: empty past inputs)."""
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        batch, length = ids.shape
        feed = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), ids.shape).copy()
        for name, value in self.inputs.items():
            if name.startswith("past_key_values."):
                feed[name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), dtype=np.float32)
        (logits,) = self.session.run(["logits"], feed)
        return SimpleNamespace(logits=torch.from_numpy(logits))
