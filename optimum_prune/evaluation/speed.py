"""How fast a saved model runs where the user runs it: prefill and decode tokens/s at batch 1, beside the dense
model on the same engine, interleaved repeats, median and spread, and a plain verdict.

Engines: onnxruntime (CPU) for an ONNX folder (``model.onnx``), transformers on ``device`` for a safetensors
folder, and, on request (``engine="deepsparse"``), DeepSparse for an ONNX folder, the engine that reads the zeros of
unstructured sparsity. Prefill is one forward of ``prompt_len`` tokens with an empty cache; decode is
``new_tokens`` greedy steps, each one token over the growing KV cache. DeepSparse compiles static shapes and takes
no empty cache: its prefill runs over a one-slot cache that the attention mask hides, and each of its decode steps
is one token over a cache of ``prompt_len`` positions (a step's cost at that length, the cache not growing). A
dense model given as a safetensors folder beside an ONNX output is exported to ONNX (float32) first, so that both
run on the same engine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..export.files import transformers_bars_off
from ..export.onnx import CACHE_ARGUMENT, ONNX_FILE

ENGINES = ("onnxruntime", "transformers", "deepsparse", "llamacpp")
DEEPSPARSE_INSTALL = (
    "DeepSparse is not installed: it pins numpy<2 and onnx<1.15, so give it its own environment (python3.11 -m "
    "venv ds, ds/bin/pip install deepsparse==1.8.0, then optimum-prune with numpy<2 and onnx==1.14.1 as "
    "constraints) and run its optimum-prune bench on ONNX folders exported here (docs/formats.md)."
)


@dataclass
class Timing:
    """One model's tokens/s over the repeats: median, lowest and highest."""

    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            f"{kind}_tokens_per_second{suffix}": function(values)
            for kind, values in (("prefill", self.prefill), ("decode", self.decode))
            for suffix, function in (("", statistics.median), ("_min", min), ("_max", max))
        }


@dataclass
class SpeedReport:
    """What `measure_speed` measured, and how."""

    engine: str
    device: str
    dtype: str
    threads: int | None
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    hardware: str
    output: dict[str, float]
    dense: dict[str, float] | None

    @property
    def ratios(self) -> tuple[float, float] | None:
        """Prefill and decode speed of the output over the dense model's (medians)."""
        if self.dense is None:
            return None
        return tuple(
            self.output[f"{kind}_tokens_per_second"] / self.dense[f"{kind}_tokens_per_second"]
            for kind in ("prefill", "decode")
        )

    @property
    def verdict(self) -> str:
        """Prefill and decode judged apart, each from its spread (`judged`)."""
        if self.dense is None:
            return "no dense model to compare with (--against DENSE)"
        judged = {kind: self.judged(kind)[1] for kind in ("decode", "prefill")}
        text = "; ".join(f"{kind} {verdict}" for kind, verdict in judged.items())
        if not any(verdict.endswith(": faster") for verdict in judged.values()):
            low_bit = "int4" in self.dtype or "q4" in self.dtype
            advice = "structured pruning would be" if low_bit else "structured pruning or int4 ONNX would be"
            text += f" (on this runtime; {advice})"
        return text

    def judged(self, kind: str) -> tuple[float, str]:
        """``kind`` (``"decode"`` or ``"prefill"``): the ratio of medians over the dense model's and its
        `compare_speed` verdict."""
        ratio = self.output[f"{kind}_tokens_per_second"] / self.dense[f"{kind}_tokens_per_second"]
        spreads = [
            [values[f"{kind}_tokens_per_second{end}"] for end in ("_min", "_max")]
            for values in (self.output, self.dense)
        ]
        return ratio, compare_speed(*spreads, ratio)

    def table(self) -> str:
        rows = [("output", self.output)] + ([("dense", self.dense)] if self.dense else [])
        lines = [
            f"speed on {self.engine} ({self.device}, {self.dtype}, {self.threads or 'default'} threads, batch "
            f"{self.batch}, {self.prompt_len}-token prompt, {self.new_tokens} new tokens, median of {self.repeats} "
            f"interleaved runs [lowest-highest]; {self.hardware})",
            f"{'model':<8} {'prefill tokens/s':>28} {'decode tokens/s':>26}",
        ]
        for name, values in rows:
            cells = [
                f"{values[f'{kind}_tokens_per_second']:.1f} [{values[f'{kind}_tokens_per_second_min']:.1f}-"
                f"{values[f'{kind}_tokens_per_second_max']:.1f}]"
                for kind in ("prefill", "decode")
            ]
            lines.append(f"{name:<8} {cells[0]:>28} {cells[1]:>26}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


VECTOR_FEATURES = {"avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx2": "AVX2",
                   "amx_tile": "AMX"}  # fmt: skip


def cpu_features() -> str:
    """`` (AVX2)``: the vector instruction sets this CPU has that the engines' kernels use (Linux), or ``""``."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    found = [name for flag, name in VECTOR_FEATURES.items() if flag in flags]
    return f" ({', '.join(found)})" if found else ""


def compare_speed(output: list[float], dense: list[float], ratio: float) -> str:
    """``"1.42x: faster"``, ``"0.61x: slower"`` or ``"1.04x: no measurable difference"``: a ratio of medians is
    called faster or slower only when the two spreads (lowest and highest tokens/s of the repeats) do not
    overlap."""
    if min(output) > max(dense):
        return f"{ratio:.2f}x: faster"
    if max(output) < min(dense):
        return f"{ratio:.2f}x: slower"
    return f"{ratio:.2f}x: no measurable difference (the spreads overlap)"


def is_onnx_folder(folder: Path) -> bool:
    return (folder / ONNX_FILE).is_file()


def _onnx_runner(folder: Path, threads: int | None) -> Callable[[np.ndarray, int], tuple[float, float]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    inputs = {value.name: value for value in session.get_inputs()}
    past_names = [name for name in inputs if name.startswith("past_key_values.")]
    if not past_names:
        raise InputError(
            f"{folder / ONNX_FILE} has no KV-cache inputs: export it with with_past=True to time decoding."
        )
    outputs = [value.name for value in session.get_outputs()]

    def run(prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        length = prompt.shape[1]
        feed = {
            "input_ids": prompt,
            "attention_mask": np.ones_like(prompt),
            "position_ids": np.arange(length, dtype=np.int64)[None],
        }
        for name in past_names:
            feed[name] = np.zeros((1, inputs[name].shape[1], 0, inputs[name].shape[3]), dtype=np.float32)
        start = time.perf_counter()
        logits, *present = session.run(outputs, feed)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            length += 1
            feed = {
                "input_ids": token,
                "attention_mask": np.ones((1, length), dtype=np.int64),
                "position_ids": np.array([[length - 1]], dtype=np.int64),
                **dict(zip(past_names, present, strict=True)),
            }
            logits, *present = session.run(outputs, feed)
        return prefill, time.perf_counter() - start

    return run


def _deepsparse_runner(
    folder: Path, threads: int | None, prompt_len: int
) -> Callable[[np.ndarray, int], tuple[float, float]]:
    """DeepSparse engines of the two static shapes of the module docstring, on copies of the folder (DeepSparse
    rewrites the file it compiles)."""
    import shutil

    import onnx
    from deepsparse import Engine

    graph = onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph
    past = {
        value.name: [dimension.dim_value for dimension in value.type.tensor_type.shape.dim]
        for value in graph.input
        if value.name.startswith("past_key_values.")
    }
    if not past:
        raise InputError(
            f"{folder / ONNX_FILE} has no KV-cache inputs: export it with with_past=True to time decoding."
        )
    names = [value.name for value in graph.input]

    def feed(tokens: np.ndarray, cached: int, hidden: int) -> list[np.ndarray]:
        """Inputs in the graph's order: ``tokens`` after ``cached`` positions, the first ``hidden`` of them masked."""
        length = tokens.shape[1]
        mask = np.ones((1, cached + length), dtype=np.int64)
        mask[:, :hidden] = 0
        arrays = {
            "input_ids": tokens,
            "attention_mask": mask,
            "position_ids": np.arange(cached - hidden, cached - hidden + length, dtype=np.int64)[None],
        }
        for name, (_, heads, _, width) in past.items():
            arrays[name] = np.zeros((1, heads, cached, width), dtype=np.float32)
        return [arrays[name] for name in names]

    def engine(inputs: list[np.ndarray], copy: Path) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
        shutil.copytree(folder, copy)
        return Engine(
            str(copy / ONNX_FILE), batch_size=1, num_cores=threads, input_shapes=[list(a.shape) for a in inputs]
        ).run

    scratch = Path(tempfile.mkdtemp(prefix="optimum-prune-deepsparse-"))
    prompt = np.zeros((1, prompt_len), dtype=np.int64)
    prefill_run = engine(feed(prompt, 1, 1), scratch / "prefill")
    decode_run = engine(feed(prompt[:, :1], prompt_len, 0), scratch / "decode")
    shutil.rmtree(scratch, ignore_errors=True)  # the engines hold what they compiled

    def run(tokens: np.ndarray, new_tokens: int) -> tuple[float, float]:
        if tokens.shape[1] != prompt_len:  # the warm-up's shorter prompt: the compiled shapes instead
            tokens = np.resize(tokens, (1, prompt_len))
        start = time.perf_counter()
        logits = prefill_run(feed(tokens, 1, 1))[0]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            logits = decode_run(feed(token, prompt_len, 0))[0]
        return prefill, time.perf_counter() - start

    return run


def _torch_runner(folder: Path, device: torch.device) -> Callable[[np.ndarray, int], tuple[float, float]]:
    from transformers import AutoConfig

    from ..core.auto import auto_model_class
    from ..export.compressed import is_compressed
    from ..export.loading import load_pruned

    if is_compressed(folder):  # decoded bit-exactly: it runs as the dense model of the same weights
        model = load_pruned(folder)
    else:
        model = auto_model_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, use_safetensors=True)
    model = model.to(device).eval()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def run(prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        ids = torch.from_numpy(prompt).to(device)
        synchronize()
        start = time.perf_counter()
        output = model(input_ids=ids, use_cache=True)
        synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            output = model(input_ids=token, use_cache=True, **{CACHE_ARGUMENT: getattr(output, CACHE_ARGUMENT)})
        synchronize()
        return prefill, time.perf_counter() - start

    return run


def _dtype(folder: Path) -> str:
    if is_onnx_folder(folder):
        info = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("optimum_prune", {}).get("onnx")
        return f"{info['quantize']} weights" if info else "float32"
    return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("dtype", "float32"))


def _fitting_prompt(prompt_len: int | None, new_tokens: int, context: int, where: Path) -> int:
    """``prompt_len`` (default `DEFAULT_PROMPT_LEN`, or what the context leaves beside ``new_tokens``), refused when
    it and the new tokens do not fit ``where``'s context."""
    if prompt_len is None:
        prompt_len = min(DEFAULT_PROMPT_LEN, context - new_tokens)
    if prompt_len < 1 or prompt_len + new_tokens > context:
        raise InputError(
            f"A {prompt_len}-token prompt and {new_tokens} new tokens do not fit {where}'s context of {context} tokens: "
            f"lower --prompt-len or --new-tokens so that they sum to at most {context}."
        )
    return prompt_len


def _gguf_facts(path: Path, against: Path | None, prompt_len: int | None, new_tokens: int) -> tuple[int, int, str]:
    """A GGUF file's prompt length (default, or checked against its context), vocabulary size and weight type;
    ``against`` must be a GGUF file too (one engine times both)."""
    import gguf

    if against is not None and against.suffix != ".gguf":
        raise InputError(f"--against {against} must be a .gguf file beside a GGUF output (llama.cpp times both).")
    for file in (path, against):
        if file is not None and not file.is_file():
            raise InputError(f"No GGUF file at {file}: pass the file export_gguf wrote.")
    fields = gguf.GGUFReader(path).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    context = int(fields[f"{arch}.context_length"].parts[-1][0])
    prompt_len = _fitting_prompt(prompt_len, new_tokens, context, path)
    kind = gguf.LlamaFileType(int(fields["general.file_type"].parts[-1][0])).name.removeprefix("MOSTLY_").lower()
    return prompt_len, len(fields["tokenizer.ggml.tokens"].data), f"GGUF {kind}"


def _llamacpp_runner(path: Path, threads: int | None, context: int) -> Callable[[np.ndarray, int], tuple[float, float]]:
    """llama.cpp's own prompt and generation timings, as seconds."""
    from .llamacpp import LlamaCpp

    runner = LlamaCpp(path, context=context, threads=threads)

    def run(prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
        prefill, decode = runner.speed(prompt[0].tolist(), new_tokens)
        return prompt.shape[1] / prefill, new_tokens / decode

    return run


def _check_engine(engine: str | None, onnx: bool, output: Path) -> str:
    """The engine that times ``output``, refused before any work when it cannot."""
    gguf_file = output.suffix == ".gguf"
    engine = engine or ("llamacpp" if gguf_file else "onnxruntime" if onnx else "transformers")
    if engine not in ENGINES:
        raise InputError(f"Unknown engine {engine!r}: choose one of {', '.join(ENGINES)}.")
    if (engine == "llamacpp") != gguf_file:
        kind = "GGUF files (--export gguf)" if engine == "llamacpp" else "folders"
        raise InputError(f"{engine} times {kind}; {output} is not one: give the other engine or the other path.")
    if engine == "llamacpp":
        from .llamacpp import check_llamacpp

        check_llamacpp()
        return engine
    if (engine == "transformers") == onnx:
        kind = "safetensors folders (save_pretrained)" if engine == "transformers" else "ONNX folders (--export onnx)"
        raise InputError(f"{engine} times {kind}; {output} is not one: give the other engine or the other folder.")
    if importlib.util.find_spec(engine) is None:
        raise InputError(DEEPSPARSE_INSTALL if engine == "deepsparse" else f"{engine} is not installed.")
    return engine


DEFAULT_PROMPT_LEN = 512


def _check_inputs(
    output: Path, against: Path | None, device: str | torch.device, prompt_len: int | None, new_tokens: int
) -> tuple[torch.device, int]:
    """Refuse, before any model is loaded, what `measure_speed` cannot time; return the device and the prompt
    length (by default `DEFAULT_PROMPT_LEN`, or what the smaller context leaves beside ``new_tokens``)."""
    from transformers import AutoConfig

    from ..core.auto import is_vision_language

    try:
        device = torch.device(device)
    except RuntimeError:
        raise InputError(f"Unknown device {device!r}: use cpu, or cuda (cuda:N) on a machine with a GPU.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {device} asked, and torch sees no CUDA GPU here: use --device cpu.")
    for name, folder in (("output", output), ("against", against)):
        if folder is None:
            continue
        if not (folder / "config.json").is_file():
            raise InputError(
                f"No saved model in {folder} ({name}): pass a folder written by save_pretrained or export_onnx."
            )
        config = AutoConfig.from_pretrained(folder)
        if is_vision_language(config):
            raise InputError(
                f"{folder} is a vision-language model: bench times text decoding of causal LMs; a VLM's speed "
                "depends on its images. Time its language model's decode with the transformers' generate API."
            )
        context = getattr(config, "max_position_embeddings", None)
        if context is None:
            continue
        prompt_len = _fitting_prompt(prompt_len, new_tokens, context, folder)
    if against is not None and is_onnx_folder(against) and not is_onnx_folder(output):
        raise InputError(
            f"--against {against} is an ONNX folder and {output} is not: both must run on one engine; give the "
            "dense safetensors folder (an ONNX output's dense model is exported for it), or time the ONNX export."
        )
    return device, prompt_len or DEFAULT_PROMPT_LEN


def measure_speed(
    output: str | os.PathLike,
    against: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    prompt_len: int | None = None,
    new_tokens: int = 128,
    repeats: int = 3,
    engine: str | None = None,
) -> SpeedReport:
    """Prefill and decode tokens/s of the saved model ``output`` and, beside it on the same engine, of the
    dense model ``against``; runs alternate between the two, ``repeats`` times each after one warm-up.
    ``prompt_len`` (default 512, fewer where the context must also hold ``new_tokens``).
    ``engine`` (`ENGINES`; default: onnxruntime for an ONNX folder, transformers for a safetensors one)."""
    output = Path(output)
    dense = Path(against) if against is not None else None
    onnx = is_onnx_folder(output)
    engine = _check_engine(engine, onnx, output)
    if engine == "llamacpp":
        prompt_len, vocab, dtype = _gguf_facts(output, dense, prompt_len, new_tokens)
        device = torch.device("cpu")
    else:
        device, prompt_len = _check_inputs(output, dense, device, prompt_len, new_tokens)
        vocab = json.loads((output / "config.json").read_text(encoding="utf-8")).get("vocab_size", 1000)
        dtype = _dtype(output)
    if threads is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="optimum-prune-bench-") as scratch:
        if dense is not None and onnx and not is_onnx_folder(dense):
            from ..export.onnx import export_onnx

            dense = export_onnx(dense, Path(scratch) / "dense")
        makers = {
            "onnxruntime": lambda folder: _onnx_runner(folder, threads),
            "deepsparse": lambda folder: _deepsparse_runner(folder, threads, prompt_len),
            "transformers": lambda folder: _torch_runner(folder, device),
            "llamacpp": lambda path: _llamacpp_runner(path, threads, prompt_len + new_tokens + 16),
        }
        make = makers[engine]
        with transformers_bars_off():
            runners = {"output": make(output)} | ({"dense": make(dense)} if dense is not None else {})
        prompt = np.random.default_rng(0).integers(0, vocab, (1, prompt_len)).astype(np.int64)
        timings = {name: Timing() for name in runners}
        for run in runners.values():
            run(prompt[:, : min(prompt_len, 16)], 2)  # warm-up
        for _ in range(repeats):
            for name, run in runners.items():
                prefill, decode = run(prompt, new_tokens)
                timings[name].prefill.append(prompt_len / prefill)
                timings[name].decode.append(new_tokens / decode)
    return SpeedReport(
        engine=f"{engine} {importlib.metadata.version('xllamacpp' if engine == 'llamacpp' else engine)}",
        device="cpu" if onnx else str(device),
        dtype=dtype,
        threads=threads,
        batch=1,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        hardware=f"{platform.processor() or platform.machine()}{cpu_features()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        output=timings["output"].summary(),
        dense=timings["dense"].summary() if "dense" in timings else None,
    )
