"""GGUF export for llama.cpp and Ollama: the file holds exactly the saved weights (f32 bit for bit; q4_0 / q8_0
after GPTQ rounding onto their grid), transformers and a real llama.cpp (xllamacpp) run it, bad input is refused
before work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import C4_SAMPLE, STORIES_260K, TINYSTORIES_656K, TINYSTORIES_VAL, random_ids, tiny_model
from test_cli import run_main
from test_hardening2 import _no_loading
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_prune import Pruner, PruningConfig, perplexity
from optimum_prune.errors import InputError
from optimum_prune.export.gguf import export_gguf

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _state(folder: Path, gguf_file: str | None = None) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    return model.state_dict()


def _projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in state.items() if name.rsplit(".", 2)[-2] in PROJECTIONS}


@pytest.fixture(scope="module")
def gptq_656k(tmp_path_factory) -> dict[str, Path]:
    """TinyStories-656K (every width a multiple of 32) pruned by Wanda to 50% and rounded by GPTQ onto each GGUF
    grid, saved."""
    folders = {}
    for grid in ("q4_0", "q8_0"):
        config = PruningConfig(method="wanda", sparsity=0.5, gptq=grid, num_samples=8, seq_len=64)
        pruner = Pruner.from_pretrained(TINYSTORIES_656K, config, device="cpu", dtype=torch.float32, progress=False)
        pruner.prune(C4_SAMPLE)
        folders[grid] = tmp_path_factory.mktemp(grid) / "model"
        pruner.save_pretrained(folders[grid])
    return folders


def test_f32_holds_the_saved_weights_bit_for_bit(tmp_path: Path) -> None:
    path = export_gguf(STORIES_260K, tmp_path / "stories-F32.gguf")
    saved, loaded = _state(STORIES_260K), _state(tmp_path, path.name)
    assert saved.keys() <= loaded.keys()
    assert all(torch.equal(loaded[name], value) for name, value in saved.items())


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_gptq_rounded_weights_are_stored_exactly(gptq_656k: dict[str, Path], grid: str) -> None:
    folder = gptq_656k[grid]
    path = export_gguf(folder, folder.parent / f"model-{grid.upper()}.gguf", quantize=grid)
    saved, loaded = _projections(_state(folder)), _projections(_state(path.parent, path.name))
    assert len(saved) == 14 and all(torch.equal(loaded[name], value) for name, value in saved.items())
    assert all((value == 0).float().mean() >= 0.5 for value in loaded.values())  # the pruned zeros, still zero


def test_rounding_on_its_own_moves_weights_gptq_does_not(gptq_656k: dict[str, Path], tmp_path: Path) -> None:
    """The check above is not trivially true: a model pruned without gptq= loses its weights' values to q4_0."""
    config = PruningConfig(method="wanda", sparsity=0.5, num_samples=8, seq_len=64)
    pruner = Pruner.from_pretrained(TINYSTORIES_656K, config, device="cpu", dtype=torch.float32, progress=False)
    pruner.prune(C4_SAMPLE)
    pruner.save_pretrained(tmp_path / "model")
    path = export_gguf(tmp_path / "model", tmp_path / "model-Q4_0.gguf", quantize="q4_0")
    saved, loaded = _projections(_state(tmp_path / "model")), _projections(_state(tmp_path, path.name))
    assert not any(torch.equal(loaded[name], value) for name, value in saved.items())


def _structured(architecture: str, folder: Path, structure: dict | None = None) -> Pruner:
    """A tiny random ``architecture`` model with half its MLP channels and KV groups (or ``structure``) removed,
    saved with a tokenizer (stories260K's, the same vocabulary size)."""
    structure = structure or {"mlp": 0.5, "attention": 0.5}
    config = PruningConfig(method="sparsegpt", structure=structure, num_samples=8, seq_len=32)
    pruner = Pruner.from_pretrained(tiny_model(architecture), config, device="cpu", progress=False)
    pruner.prune(random_ids(8, 32))
    pruner.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES_260K).save_pretrained(folder)
    return pruner


def test_removed_kv_groups_keep_their_head_size(tmp_path: Path) -> None:
    """Llama with half its KV groups gone: the head size is written (llama.cpp would infer hidden / heads), the q/k
    permutation follows the smaller head count, and transformers reads the file back as the saved model."""
    import gguf

    _structured("llama", tmp_path / "model")
    path = export_gguf(tmp_path / "model", tmp_path / "model-F32.gguf")
    fields = gguf.GGUFReader(path).fields
    assert int(fields["llama.attention.key_length"].parts[-1][0]) == 16  # 64 / 4 heads, though 2 heads are left
    assert int(fields["llama.attention.head_count"].parts[-1][0]) == 2
    saved, loaded = _state(tmp_path / "model"), _state(tmp_path, path.name)
    assert all(torch.equal(loaded[name], value) for name, value in saved.items())


def test_llama_cpp_computes_the_logits_of_pytorch(tmp_path: Path) -> None:
    """A real llama.cpp (xllamacpp's build) on the f32 file: every token's log-probabilities over the whole
    vocabulary within 0.02 of PyTorch's (llama.cpp keeps its KV cache in f16), and the same perplexity."""
    from optimum_prune.evaluation.llamacpp import LlamaCpp

    path = export_gguf(STORIES_260K, tmp_path / "stories-F32.gguf")
    model = AutoModelForCausalLM.from_pretrained(STORIES_260K, dtype=torch.float32)
    ids = random_ids(1, 33, seed=3)[0].tolist()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    runner = LlamaCpp(path, context=64, threads=1)
    got = runner.token_logprobs(ids)
    np.testing.assert_allclose(got, [expected[i - 1, ids[i]].item() for i in range(1, len(ids))], atol=0.02)
    tokenizer = AutoTokenizer.from_pretrained(STORIES_260K)
    text = TINYSTORIES_VAL.read_text(encoding="utf-8")[:20000]
    ours = perplexity(path, tokenizer, text, seq_len=64, max_windows=2)
    assert ours == pytest.approx(perplexity(model, tokenizer, text, seq_len=64, max_windows=2), rel=0.01)


def test_llama_cpp_runs_a_structured_qwen2_and_refuses_its_removed_heads(tmp_path: Path, monkeypatch, capsys) -> None:
    """Qwen2 (q/k/v biases, rotary halves as in transformers: no permutation) with MLP channels removed, run by
    llama.cpp: its log-probabilities are PyTorch's. Removed KV groups are refused: llama.cpp's qwen2 loader
    expects a query projection as wide as the hidden state."""
    from optimum_prune.evaluation.llamacpp import LlamaCpp

    _structured("qwen2", tmp_path / "heads")
    with pytest.raises(InputError, match="llama.cpp's qwen2 loader expects the attention as wide as the hidden"):
        export_gguf(tmp_path / "heads", tmp_path / "heads.gguf")
    tiny_model("qwen2").save_pretrained(tmp_path / "dense-source")
    _no_loading(monkeypatch)
    flags = [
        "--model",
        str(tmp_path / "dense-source"),
        "--tokenizer",
        str(STORIES_260K),
        "--structure",
        "attention=0.5",
    ]
    flags += ["--export", "gguf", "--dataset", str(C4_SAMPLE)]
    assert run_main(*flags, "--output", str(tmp_path / "o")) == 2
    assert "argument --structure: llama.cpp's qwen2 loader" in capsys.readouterr().err
    monkeypatch.undo()
    pruner = _structured("qwen2", tmp_path / "model", {"mlp": 0.5})
    path = export_gguf(tmp_path / "model", tmp_path / "model-F32.gguf")
    ids = random_ids(1, 33, seed=4)[0].tolist()
    with torch.no_grad():
        expected = torch.log_softmax(pruner.model(torch.tensor([ids])).logits[0].double(), -1)
    got = LlamaCpp(path, context=64, threads=1).token_logprobs(ids)
    np.testing.assert_allclose(got, [expected[i - 1, ids[i]].item() for i in range(1, len(ids))], atol=0.02)


def test_the_cli_writes_one_file_per_type(gptq_656k: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    flags = ["--model", str(TINYSTORIES_656K), "--method", "wanda", "--gptq", "q4_0", "--dataset", str(C4_SAMPLE)]
    flags += ["--num-samples", "8", "--seq-len", "64", "--output", str(out), "--export", "gguf", "--gguf-type"]
    assert run_main(*flags, "q4_0", "f16") == 0
    printed = capsys.readouterr().out
    assert f"GGUF q4_0 written to {out}/gguf/out-Q4_0.gguf (weights rounded by GPTQ onto its grid)" in printed
    assert sorted(path.name for path in (out / "gguf").iterdir()) == ["out-F16.gguf", "out-Q4_0.gguf"]
    assert json.loads((out / "config.json").read_text())["optimum_prune"]["config"]["gptq"] == "q4_0"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--export", "gguf", "--gguf-type", "q4_k"], "argument --gguf-type: invalid choice: 'q4_k'"),
        (["--gguf-type", "q4_0"], "argument --gguf-type: it chooses the GGUF weights; add --export gguf"),
        (["--export", "gguf", "--gguf-type", "q4_0", "--output", "o"], "intermediate_size 172 is not a multiple of 32"),
        (["--export", "gguf", "--gguf-type", "q8_0", "--structure", "mlp=0.5", "align=8", "--output", "o"], "align=8"),
        (["--export", "gguf"], "--export gguf writes to a folder: pass --output DIR"),
    ],
)
def test_bad_gguf_input_exits_2_before_loading(flags: list[str], message: str, tmp_path, monkeypatch, capsys) -> None:
    _no_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(STORIES_260K), "--method", "magnitude"]
    assert run_main(*model, *flags) == 2
    assert message in capsys.readouterr().err


def test_bad_gguf_input_in_python(tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    with pytest.raises(InputError, match="GGUF export writes llama, mistral, qwen2, qwen3 models; this one is 'gpt2'"):
        export_gguf(gpt2, tmp_path / "gpt2.gguf")
    with pytest.raises(InputError, match="Unknown GGUF type 'q5_k'"):
        export_gguf(STORIES_260K, tmp_path / "x.gguf", quantize="q5_k")
    with pytest.raises(InputError, match="must be a file path ending in .gguf"):
        export_gguf(STORIES_260K, tmp_path / "x.bin")
    (tmp_path / "there.gguf").write_bytes(b"kept")
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf(STORIES_260K, tmp_path / "there.gguf")
    assert (tmp_path / "there.gguf").read_bytes() == b"kept"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpt2", "there.gguf"]  # nothing left behind


def test_the_default_type_is_one_the_model_can_hold(tmp_path: Path, capsys) -> None:
    """No --gguf-type: q8_0, or f16 (said) for stories260K, whose MLP width 172 is no multiple of 32."""
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--export", "gguf"]
    assert run_main(*flags, "--output", str(tmp_path / "s")) == 0
    assert "note: --export gguf writes f16 (no --gguf-type given" in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "s" / "gguf").iterdir()] == ["s-F16.gguf"]
    flags = ["--model", str(TINYSTORIES_656K), "--method", "magnitude", "--export", "gguf"]
    assert run_main(*flags, "--output", str(tmp_path / "t")) == 0
    assert [path.name for path in (tmp_path / "t" / "gguf").iterdir()] == ["t-Q8_0.gguf"]


def test_push_puts_the_gguf_files_in_their_own_repository(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub
    import yaml
    from hub_server import FakeHub

    out = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--output", str(out), "--export", "gguf"]
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_optimumPruneTestToken0123456789xyz")
        assert run_main(*flags, "--gguf-type", "f16", "--push-to-hub", "someone/stories") == 0
    repos = [commit["repo"] for commit in hub.recorded.commits]
    assert repos == ["someone/stories", "someone/stories-GGUF"]
    files = hub.recorded.commits[1]["files"]
    assert set(files) == {"README.md", "out-F16.gguf"}
    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "someone/stories" and metadata["base_model_relation"] == "quantized"
    assert "ollama run hf.co/someone/stories-GGUF:F16" in card


@pytest.mark.parametrize("architecture", ["qwen3", "mistral"])
def test_llama_cpp_runs_qwen3_and_mistral_as_pytorch_does(architecture: str, tmp_path: Path) -> None:
    """Qwen3 (q/k norms, its own head size) and Mistral (written as llama.cpp's llama): the log-probabilities of
    random tokens in llama.cpp are PyTorch's."""
    import transformers

    from optimum_prune.evaluation.llamacpp import LlamaCpp

    if architecture == "qwen3":
        config = transformers.Qwen3Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = tiny_model(architecture)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(STORIES_260K).save_pretrained(tmp_path / "model")
    path = export_gguf(tmp_path / "model", tmp_path / "model-F32.gguf")
    ids = random_ids(1, 33, seed=5)[0].tolist()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    got = LlamaCpp(path, context=64, threads=1).token_logprobs(ids)
    np.testing.assert_allclose(got, [expected[i - 1, ids[i]].item() for i in range(1, len(ids))], atol=0.02)
