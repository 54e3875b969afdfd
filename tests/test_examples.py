"""Every example and the README's Python snippet run, with small settings, so that none of them can rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ASSETS, REPO, STORIES_260K
from hub_server import FakeHub
from transformers import AutoModelForCausalLM

from optimum_prune.export import read_metadata

EXAMPLES = REPO / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OPTIMUM_PRUNE_ASSETS": str(ASSETS)}
SMALL = ["--num-samples", "8", "--seq-len", "128", "--eval-windows", "2"]


def example(script: str, *args: str, env: dict[str, str] = ENV, timeout: int = 600) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def perplexities(output: str) -> tuple[float, float]:
    return tuple(map(float, re.search(r"dense ([\d.]+) -> pruned ([\d.]+)", output).groups()))


def test_prune_example_on_stories260k(tmp_path) -> None:
    output = example("prune_smollm2.py", "--model", str(STORIES_260K), *SMALL, "--output", str(tmp_path / "m"))
    before, after = perplexities(output)
    assert 1 < before < after
    assert read_metadata(AutoModelForCausalLM.from_pretrained(tmp_path / "m").config)["method"] == "wanda"


@pytest.mark.slow
def test_prune_example_on_smollm2_gguf() -> None:
    output = example("prune_smollm2.py", "--num-samples", "2", "--seq-len", "64", "--eval-windows", "1")
    assert "model.layers.29.mlp.down_proj" in output  # all 30 SmolLM2 blocks were pruned
    before, after = perplexities(output)
    assert 1 < before < after


def test_owl_example() -> None:
    output = example("owl_70.py", "--model", str(STORIES_260K), *SMALL)
    uniform = re.search(r"uniform: global sparsity ([\d.]+), block sparsities \[(.*)\]", output)
    owl = re.search(r"owl: global sparsity ([\d.]+), block sparsities \[(.*)\]", output)
    assert float(uniform.group(1)) == pytest.approx(0.7, abs=1e-3) == float(owl.group(1))
    assert {float(s) for s in uniform.group(2).split(", ")} == {0.7}
    assert len({float(s) for s in owl.group(2).split(", ")}) > 1  # OWL varies the block sparsity
    scores = dict(re.findall(r"^\s+(dense|uniform|owl)\s+([\d.]+)$", output, re.MULTILINE))
    assert float(scores["dense"]) < min(float(scores["uniform"]), float(scores["owl"]))


def test_onnx_example(tmp_path) -> None:
    flags = (
        "--num-samples",
        "8",
        "--seq-len",
        "128",
        "--output",
        str(tmp_path / "onnx"),
        "--quantize",
        "int4",
        "--gptq",
    )
    output = example("export_onnx.py", *flags)
    assert "onnxruntime and PyTorch generate the same tokens" in output
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx-int4" / "model.onnx").is_file()
    assert "perplexity of the float32 export in onnxruntime: " in output and "of the int4 export" in output


def test_push_example_to_a_local_hub() -> None:
    env = {key: value for key, value in ENV.items() if key != "HF_HUB_OFFLINE"}
    env["HF_TOKEN"] = "hf_example_test_token"
    with FakeHub() as hub:
        output = example(
            "push_to_hub.py", "--repo-id", "someone/stories-wanda-50", "--endpoint", hub.endpoint, *SMALL, env=env
        )
    assert "hf_example_test_token" not in output
    assert output.strip().endswith(
        f"{hub.endpoint}/someone/stories-wanda-50/commit/0123456789abcdef0123456789abcdef01234567"
    )
    (commit,) = hub.recorded.commits
    assert {"model.safetensors", "README.md", "pruning_config.json", "tokenizer.json"} <= set(commit["files"])
    assert {auth for _, _, auth in hub.recorded.requests if auth} == {"Bearer hf_example_test_token"}
    assert ("POST", "/api/models/someone/stories-wanda-50/commit/main", "Bearer hf_example_test_token") in (
        hub.recorded.requests
    )


def test_readme_python_example(tmp_path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    snippet = snippet.replace("../shared/assets", str(ASSETS)).replace('"out/', f'"{tmp_path}/')
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global sparsity 0.5000" in result.stdout
    assert list(tmp_path.iterdir()), "the snippet saves the pruned model"


def test_gguf_example_runs_in_llama_cpp(tmp_path) -> None:
    output = example("export_gguf.py", "--num-samples", "8", "--seq-len", "128", "--output", str(tmp_path / "m"))
    pytorch = float(re.search(r"PyTorch: perplexity ([\d.]+)", output)[1])
    q4 = float(re.search(r"llama.cpp q4_0: .* perplexity ([\d.]+)", output)[1])
    f16 = float(re.search(r"llama.cpp f16: .* perplexity ([\d.]+)", output)[1])
    assert abs(f16 - pytorch) < 0.01 * pytorch and q4 < 1.2 * pytorch  # the q4_0 file holds the GPTQ-rounded weights
    assert (tmp_path / "m" / "gguf" / "model-Q4_0.gguf").is_file()
