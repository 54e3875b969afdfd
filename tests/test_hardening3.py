"""What a demanding new user hit in ALPS, GPTQ, quantized ONNX, bench, budgets and VLMs (issue 37): each case
here failed before it was fixed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import C4_SAMPLE, STORIES_260K, TINYSTORIES_656K, TINYSTORIES_VAL, tiny_vlm
from test_cli import run_main
from test_hardening2 import _no_loading
from test_onnx_quantize import _initializers, _nbits_weight
from transformers import AutoTokenizer

from optimum_prune import Pruner, PruningConfig, export_onnx, perplexity
from optimum_prune.core.safetensors import open_safetensors
from optimum_prune.errors import InputError
from optimum_prune.evaluation.speed import SpeedReport, compare_speed, measure_speed
from optimum_prune.structured.spec import Structure

SMALL = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "4"]
MODEL = ["--model", str(STORIES_260K)]


# 1. a budget with gradual pruning saved a config that did not match its weights


def test_a_budget_with_gradual_pruning_is_refused_before_loading(monkeypatch, capsys) -> None:
    _no_loading(monkeypatch)
    flags = [*MODEL, "--structure", "params=0.7", "--recover-schedule", "gradual", "--recover-steps", "2"]
    assert run_main(*flags, "--dataset", str(C4_SAMPLE)) == 2
    error = capsys.readouterr().err
    assert "argument --recover-schedule" in error and "a budget (params=0.7) is searched one-shot" in error


# 2. GPTQ on a bf16 checkpoint: the export's grid values were rounded again to bf16


def test_gptq_of_a_bf16_checkpoint_runs_in_float32_and_the_export_holds_the_saved_weights(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="load the model with dtype=torch.float32"):
        Pruner.from_pretrained(TINYSTORIES_656K, PruningConfig(method="wanda", gptq="int4"), device="cpu")
    out = tmp_path / "out"
    flags = ["--model", str(TINYSTORIES_656K), "--method", "wanda", "--gptq", "int4", *SMALL]
    flags += ["--dataset", str(C4_SAMPLE), "--output", str(out), "--export", "onnx", "--onnx-quantize", "int4"]
    assert run_main(*flags) == 0
    stored = _initializers(out / "onnx")
    with open_safetensors(out / "model.safetensors") as file:
        names = [name for name in file.keys() if name.endswith("proj.weight")]  # noqa: SIM118 (not a dict)
        assert names
        for name in names:
            weight = file.get_tensor(name)
            assert weight.dtype == torch.float32
            layer = name.removesuffix(".weight")
            _, values = _nbits_weight(
                stored[f"{layer}.weight_Q4"], stored[f"{layer}.weight_scales"], 4, weight.shape[1]
            )
            np.testing.assert_array_equal(values, weight.numpy())


def test_gptq_with_a_dtype_that_cannot_hold_the_grid_is_refused_before_loading(monkeypatch, capsys) -> None:
    _no_loading(monkeypatch)
    assert run_main(*MODEL, "--method", "wanda", "--gptq", "int4", "--dtype", "bfloat16") == 2
    assert "argument --dtype: --gptq rounds onto a grid that bfloat16 cannot hold" in capsys.readouterr().err


# 4. --resume of prune + recovery continued another model's training


def test_resume_of_recovery_with_other_pruning_settings_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    pruned = Path(f"{out}.recover") / "pruned"
    PruningConfig(method="magnitude", sparsity=0.3).save_pretrained(pruned)  # what the interrupted run pruned
    _no_loading(monkeypatch)
    flags = [*MODEL, "--method", "magnitude", "--sparsity", "0.5", "--recover-steps", "2", "--resume"]
    assert run_main(*flags, "--dataset", str(C4_SAMPLE), "--output", str(out)) == 2
    error = capsys.readouterr().err
    assert "argument --resume:" in error and "sparsity=0.3" in error and "delete" in error


# 5. bench rewrote the files of folders it did not write


def test_bench_changes_nothing_in_a_folder_it_did_not_write(tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain"
    Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu").model.save_pretrained(plain)
    before = {path.name: path.read_bytes() for path in plain.iterdir()}
    flags = ["--prompt-len", "16", "--new-tokens", "2", "--repeats", "1"]
    assert run_main("bench", str(plain), "--against", str(STORIES_260K), *flags) == 0
    assert "not recorded: " in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in plain.iterdir()} == before


# 6. verdicts that contradicted their numbers


def _timing(prefill: tuple[float, float, float], decode: tuple[float, float, float]) -> dict[str, float]:
    return {
        f"{kind}_tokens_per_second{suffix}": value
        for kind, values in (("prefill", prefill), ("decode", decode))
        for suffix, value in zip(("", "_min", "_max"), values, strict=True)
    }


def test_a_verdict_follows_the_spreads_and_judges_prefill_and_decode_apart() -> None:
    assert compare_speed([10.0, 12.0], [8.0, 9.5], 1.3) == "1.30x: faster"
    assert compare_speed([5.0, 6.0], [8.0, 9.5], 0.6) == "0.60x: slower"
    assert compare_speed([9.0, 12.0], [8.0, 9.5], 1.08).endswith("no measurable difference (the spreads overlap)")

    def verdict(output: dict, dense: dict) -> str:
        return SpeedReport("transformers", "cpu", "float32", 1, 1, 512, 128, 3, "x86", output, dense).verdict

    # a model against itself: medians apart, spreads overlapping: no difference either way
    itself = verdict(_timing((500, 300, 900), (60, 40, 80)), _timing((900, 400, 950), (50, 45, 75)))
    assert "faster" not in itself and itself.count("no measurable difference") == 2
    mixed = verdict(_timing((3000, 2900, 3100), (30, 29, 31)), _timing((1000, 990, 1010), (100, 99, 101)))
    assert mixed.startswith("decode 0.30x: slower; prefill 3.00x: faster")


# 7. export_onnx(folder, folder) deleted the source weights


def test_export_onnx_refuses_to_write_over_its_own_source(tmp_path: Path) -> None:
    source = tmp_path / "model"
    Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu").model.save_pretrained(source)
    with pytest.raises(InputError, match="would replace the input"):
        export_onnx(source, source, overwrite=True)
    assert (source / "model.safetensors").is_file()


# 8. bench crashed with tracebacks on ordinary input


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench3") / "compressed"
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu", progress=False)
    pruner.prune()
    pruner.save_pretrained(folder, format="compressed")
    return folder


def test_bench_times_a_compressed_folder_and_refuses_what_it_cannot_time(compressed: Path, tmp_path, capsys) -> None:
    report = measure_speed(compressed, STORIES_260K, prompt_len=16, new_tokens=2, repeats=1)
    assert report.output["decode_tokens_per_second"] > 0
    onnx = export_onnx(STORIES_260K, tmp_path / "onnx")
    vlm = tmp_path / "vlm"
    tiny_vlm("qwen2_vl").save_pretrained(vlm)
    cases = [
        ((str(compressed), "--against", str(onnx)), "is an ONNX folder and"),
        ((str(compressed), "--device", "gpu"), "Unknown device 'gpu'"),
        ((str(compressed), "--prompt-len", "4096"), "do not fit"),
        ((str(vlm),), "is a vision-language model"),
    ]
    if not torch.cuda.is_available():
        cases.append(((str(compressed), "--device", "cuda"), "torch sees no CUDA GPU here"))
    for argv, message in cases:
        assert run_main("bench", *argv, "--no-record") == 2, argv
        assert message in capsys.readouterr().err, argv


def test_bench_interrupted_exits_130_and_records_nothing(compressed: Path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("optimum_prune.evaluation.speed.measure_speed", interrupted)
    before = (compressed / "config.json").read_bytes()
    assert run_main("bench", str(compressed)) == 130
    assert "interrupted: nothing was recorded" in capsys.readouterr().err
    assert (compressed / "config.json").read_bytes() == before


# 9. --benchmark of an output it cannot time failed only after pruning


def test_benchmark_of_a_vision_language_model_is_refused_before_loading(tmp_path: Path, monkeypatch, capsys) -> None:
    vlm = tmp_path / "vlm"
    tiny_vlm("qwen2_vl").save_pretrained(vlm)
    _no_loading(monkeypatch)
    assert run_main("--model", str(vlm), "--method", "magnitude", "--benchmark", "--output", str(tmp_path / "o")) == 2
    assert "argument --benchmark: bench times text decoding" in capsys.readouterr().err


# 10. --push-to-hub with --benchmark: the card had no speed and the ONNX files were not pushed


def test_push_with_benchmark_carries_the_speed_and_the_onnx_export(tmp_path: Path, monkeypatch) -> None:
    pushed: dict[str, set[str] | str] = {}

    def push_folder(folder, repo_id, **kwargs):
        pushed["files"] = {str(path.relative_to(folder)) for path in Path(folder).rglob("*") if path.is_file()}
        pushed["card"] = (Path(folder) / "README.md").read_text()
        return type("Commit", (), {"commit_url": "http://127.0.0.1/commit"})()

    monkeypatch.setattr("optimum_prune.hub.push.push_folder", push_folder)
    monkeypatch.setattr("optimum_prune.hub.push.check_can_push", lambda token, reach=False: "hf_token")
    monkeypatch.setattr("optimum_prune.cli.bench.benchmark", _fake_benchmark)
    flags = [*MODEL, "--method", "magnitude", "--output", str(tmp_path / "out"), "--export", "onnx"]
    assert run_main(*flags, "--benchmark", "--push-to-hub", "user/model") == 0
    assert "onnx/model.onnx" in pushed["files"] and "## Speed" in pushed["card"]


def _fake_benchmark(output, against, record=True, **settings):
    report = SpeedReport("onnxruntime", "cpu", "float32", 1, 1, 16, 2, 1, "x86", _timing((9, 9, 9), (3, 3, 3)), None)
    return report.to_dict()


# 14. flags that did nothing were accepted


def test_flags_that_would_do_nothing_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    with pytest.raises(InputError, match="no blocks are removed"):
        Structure(mlp=0.25, layer_criterion="influence")
    _no_loading(monkeypatch)
    gradual = [*MODEL, "--recover-schedule", "gradual", "--recover-steps", "2", "--dataset", str(C4_SAMPLE)]
    assert run_main(*gradual, "--method", "magnitude", "--refit") == 2
    assert "refit would do nothing" in capsys.readouterr().err
    assert run_main(*gradual, "--method", "alps") == 2
    assert "method 'alps' (it always refits) would do nothing" in capsys.readouterr().err
    assert run_main(*MODEL, "--method", "magnitude", "--processor", str(STORIES_260K)) == 2
    error = capsys.readouterr().err
    assert "argument --processor: " in error and "is a text model" in error


# 17. perplexity() gave internal errors on bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"max_windows": 0}, "max_windows=0 must be a positive integer"),
        ({"seq_len": -1}, "seq_len=-1 must be a positive integer"),
        ({"tokenizer": None}, "tokenizer=None: pass the model's tokenizer"),
    ],
)
def test_perplexity_bad_arguments_name_the_problem(magnitude_stories, kwargs: dict, message: str) -> None:
    arguments = {"tokenizer": AutoTokenizer.from_pretrained(STORIES_260K), "seq_len": 64, **kwargs}
    with pytest.raises(InputError, match=message):
        perplexity(magnitude_stories.model, text=TINYSTORIES_VAL.read_text()[:5000], **arguments)


def test_metadata_of_a_timed_output_stays_loadable(tmp_path: Path) -> None:
    """The speed written by --benchmark keeps the folder's pruning metadata readable."""
    flags = [*MODEL, "--method", "magnitude", "--output", str(tmp_path / "out"), "--benchmark"]
    assert run_main(*flags) == 0
    metadata = json.loads((tmp_path / "out" / "config.json").read_text())["optimum_prune"]
    assert metadata["method"] == "magnitude" and "decode " in metadata["speed"]["verdict"]


# 3. "int4" exports that stayed float without a word


def test_an_int4_export_says_what_stays_float_and_refuses_one_with_nothing_quantized(tmp_path: Path, caplog) -> None:
    from conftest import tiny_model

    with pytest.raises(InputError, match="found no weight it quantizes"):
        export_onnx(tiny_model("gpt2"), tmp_path / "gpt2", quantize="int4")  # Conv1D: every weight a Gemm
    assert not (tmp_path / "gpt2").exists()
    with caplog.at_level("WARNING"):
        folder = export_onnx(tiny_model("opt"), tmp_path / "opt", quantize="int4")
    metadata = json.loads((folder / "config.json").read_text())["optimum_prune"]["onnx"]
    left = [record.getMessage() for record in caplog.records if "stay float in this int4 export" in record.getMessage()]
    # OPT's MLP (fc1, fc2 in each of 2 blocks) exports as Gemm: said, and recorded beside the float head
    assert left and left[0].startswith("4 of 12 weight matrices stay float") and len(metadata["float_nodes"]) == 5


# 11. VLM bad input exited 1 after loading


def test_unreadable_images_and_a_tokenizer_only_processor_are_refused_before_loading(tmp_path, monkeypatch, capsys):
    import transformers
    from test_vlm import _image_text_file, _llava_with_processor

    processor = _llava_with_processor(tmp_path / "llava")
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer-only")
    pairs = _image_text_file(tmp_path, count=2)
    flags = ["--model", str(tmp_path / "llava"), "--method", "wanda", "--dataset", str(pairs), *SMALL]
    monkeypatch.setattr(
        transformers.AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights")
    )
    assert run_main(*flags, "--processor", str(tmp_path / "tokenizer-only")) == 2
    error = capsys.readouterr().err
    assert "argument --processor:" in error and "tokenizer-only has none" in error
    (tmp_path / "image1.png").write_bytes(b"not a png")
    assert run_main(*flags) == 2
    assert "row 2: " in (error := capsys.readouterr().err) and "is not a readable image" in error


# 13. budgets were refused after loading, about kinds the model does not have


def test_a_budget_searches_what_the_model_has_and_is_refused_before_loading(tmp_path, monkeypatch, capsys) -> None:
    from conftest import tiny_model

    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")  # no separate KV projections: MLP width and blocks
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "moe")  # no dense MLP: KV groups and blocks
    tokenizer = ["--tokenizer", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), *SMALL]
    out = tmp_path / "out"
    assert (
        run_main("--model", str(tmp_path / "gpt2"), *tokenizer, "--structure", "params=0.8", "--output", str(out)) == 0
    )
    kept = json.loads((out / "config.json").read_text())["optimum_prune"]["structure"]["parameters"]
    assert kept["kept"] <= 0.8 * kept["original"]
    _no_loading(monkeypatch)
    for extra in ([], ["--dry-run"]):
        assert run_main("--model", str(tmp_path / "moe"), *tokenizer, "--structure", "params=0.3", *extra) == 2
        error = capsys.readouterr().err
        assert "argument --structure: No mix of KV groups, blocks (what Qwen2MoeForCausalLM can lose)" in error


# 15. Ctrl-C during the ONNX export left no way on but pruning again


def test_ctrl_c_during_the_onnx_export_gives_the_command_that_finishes_it(tmp_path, monkeypatch, capsys) -> None:
    import subprocess
    import sys

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("optimum_prune.export.onnx.export_onnx", interrupted)
    out = tmp_path / "out"
    flags = [*MODEL, "--method", "magnitude", "--output", str(out), "--export", "onnx", "--onnx-quantize", "int8"]
    assert run_main(*flags) == 130
    error = capsys.readouterr().err
    assert f"the pruned model is saved in {out}: finish its ONNX export with python -c" in error
    command = error.split("finish its ONNX export with python -c ", 1)[1].strip().strip('"')
    monkeypatch.undo()
    subprocess.run([sys.executable, "-c", command], check=True, capture_output=True)
    metadata = json.loads((out / "onnx" / "config.json").read_text())["optimum_prune"]["onnx"]
    assert metadata["quantize"] == "int8"


# 16. messages that named the wrong cause or an invalid fix


def test_messages_name_the_real_cause_and_a_valid_fix(tmp_path, monkeypatch, capsys, caplog) -> None:
    from conftest import killed_at_block

    from optimum_prune.engine.work_folder import WorkFolder

    assert run_main(*MODEL, "--method", "magnitude", "--refit") == 2
    assert "argument --dataset: refit=True needs calibration text" in capsys.readouterr().err
    config = PruningConfig(method="wanda", gptq="int4", num_samples=4, seq_len=32)
    pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
    pruner.prune(C4_SAMPLE)
    pruner.save_pretrained(tmp_path / "gptq")
    with caplog.at_level("WARNING"):
        export_onnx(tmp_path / "gptq", tmp_path / "dynamic", quantize="int8-dynamic")
    advice = [
        record.getMessage() for record in caplog.records if "rounded by GPTQ onto the int4 grid" in record.getMessage()
    ]
    assert advice and "export with quantize='int4'" in advice[0] and "gptq='int8-dynamic'" not in advice[0]
    out, offload = tmp_path / "out", tmp_path / "offload"
    flags = [*MODEL, "--method", "wanda", "--dataset", str(C4_SAMPLE), *SMALL, "--device-map", "auto"]
    flags += ["--max-memory", "cpu=300KB", "--offload-folder", str(offload), "--output", str(out)]
    with killed_at_block(WorkFolder, "save_block", 2):
        assert run_main(*flags) == 130
    error = capsys.readouterr().err
    assert "finished blocks are kept in" in error and "--resume" in error


# The OBS crash of a second structured prune in one process ("Pivots given to lu_solve must all be >= 1")


def test_obs_recovers_when_its_downdated_inverse_is_lost(monkeypatch) -> None:
    """MKL's batched LU turns a NaN reaching it into that pivot error: a round whose pivot block came out
    non-finite recomputes the inverse from the kept columns' Hessian, and chooses what it would have."""
    from optimum_prune.structured import select

    torch.manual_seed(0)
    units, columns = 32, 4
    inputs = torch.randn(256, units * columns) * torch.logspace(-2, 3, units * columns)
    hessian, weight = inputs.T @ inputs, torch.randn(16, units * columns)
    _, expected = select.obs_remove(weight, hessian, columns, units, 20, dampening=0.01)
    inverse, calls = torch.linalg.inv, []

    def lost_once(matrix):
        calls.append(1)
        return torch.full_like(matrix, float("nan")) if len(calls) == 3 else inverse(matrix)

    monkeypatch.setattr(select.torch.linalg, "inv", lost_once)
    removed_weight, removed = select.obs_remove(weight, hessian, columns, units, 20, dampening=0.01)
    assert removed == expected and torch.isfinite(removed_weight).all()


def test_two_structured_prunes_in_one_process_give_the_same_model(tmp_path: Path) -> None:
    """The second prune follows an ONNX export, an onnxruntime session and a change of torch threads, as in
    benchmarks/deploy_speed.py: nothing of the first is left to change it."""
    config = PruningConfig(method="sparsegpt", structure={"mlp": 0.5, "attention": 0.5}, num_samples=8, seq_len=64)

    def prune() -> dict[str, torch.Tensor]:
        pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
        pruner.prune(C4_SAMPLE)
        return pruner.model.state_dict()

    first = prune()
    folder = export_onnx(STORIES_260K, tmp_path / "onnx", quantize="int4")
    perplexity(folder, None, TINYSTORIES_VAL.read_text()[:4000], seq_len=64, max_windows=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.set_num_threads(threads)
    second = prune()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
