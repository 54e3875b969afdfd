"""Prune a model, export it to ONNX with optimum_prune.export_onnx, and generate with onnxruntime.

The ONNX graph has optimum's decoder I/O (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.key/value`` out). Greedy decoding with the
KV cache in onnxruntime must give the same tokens as PyTorch's ``generate``. With ``--quantize int8`` or
``int4`` the model is exported a second time with low-bit weights (onnxruntime's quantization tools, pruned zeros
kept), and the perplexity of both exports on TinyStories is printed, measured in onnxruntime; ``--gptq`` rounds
the kept weights onto that grid while pruning (GPTQ on the calibration inputs), so that the export stores exactly
them:

    python examples/export_onnx.py --output out/stories260K-onnx
    python examples/export_onnx.py --output out/stories260K-onnx --quantize int4 --gptq
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import torch
from common import ASSETS, add_common_arguments, load_model

from optimum_prune import Pruner, PruningConfig, export_onnx, perplexity
from optimum_prune.export.quantize import QUANTIZATIONS


def ort_greedy(session: ort.InferenceSession, input_ids: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy decoding of one prompt, feeding the KV cache back at every step."""
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    outputs = [o.name for o in session.get_outputs()]
    past = [np.zeros([1, i.shape[1], 0, i.shape[3]], dtype=np.float32) for i in past_inputs]
    tokens, step, length = [], input_ids, 0
    for _ in range(new_tokens):
        length += step.shape[1]
        feed = {
            "input_ids": step,
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "position_ids": np.arange(length - step.shape[1], length, dtype=np.int64)[None],
            **{info.name: value for info, value in zip(past_inputs, past, strict=True)},
        }
        logits, *past = session.run(outputs, feed)
        tokens.append(int(logits[0, -1].argmax()))
        step = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens


def main() -> None:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]), model="")
    parser.set_defaults(model=str(ASSETS / "models" / "stories260K"))
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4", help="unstructured or N:M")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--output", required=True, help="folder for model.onnx, its config and tokenizer")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="also export with low-bit weights to OUTPUT-Q")
    parser.add_argument("--gptq", action="store_true", help="with --quantize int4|int8: round by GPTQ while pruning")
    args = parser.parse_args()
    if args.gptq and args.quantize not in ("int4", "int8"):
        parser.error("--gptq rounds onto the grid of --quantize int4 or int8: add one of them.")

    model, tokenizer = load_model(args.model)
    config = PruningConfig(
        method=args.method,
        pattern=args.pattern,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        gptq=args.quantize if args.gptq else None,
    )
    pruner = Pruner.from_pretrained(model, config, tokenizer=tokenizer, device="cpu")
    pruner.prune(args.dataset)
    folder = export_onnx(pruner.model, args.output, tokenizer=tokenizer)
    print(f"exported to {folder}")

    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
    session = ort.InferenceSession(str(next(folder.glob("*.onnx"))), providers=["CPUExecutionProvider"])
    onnx_tokens = ort_greedy(session, prompt.numpy(), args.new_tokens)
    with torch.no_grad():
        generated = pruner.model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    torch_tokens = generated[0, prompt.shape[1] :].tolist()
    print(f"onnxruntime: {args.prompt}{tokenizer.decode(onnx_tokens)}")
    print(f"pytorch:     {args.prompt}{tokenizer.decode(torch_tokens)}")
    if onnx_tokens != torch_tokens:
        raise SystemExit("onnxruntime and PyTorch disagree on the greedy tokens")
    print("onnxruntime and PyTorch generate the same tokens")
    if args.quantize:
        quantized = export_onnx(
            pruner.model, f"{args.output}-{args.quantize}", tokenizer=tokenizer, quantize=args.quantize
        )
        text = (ASSETS / "data" / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")
        for name, path in (("float32", folder), (args.quantize, quantized)):
            print(f"perplexity of the {name} export in onnxruntime: {perplexity(path, None, text, 256, 10):.3f}")


if __name__ == "__main__":
    main()
