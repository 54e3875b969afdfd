"""`optimum-prune bench` / `measure_speed`: tokens/s of a saved model beside the dense one on the same engine,
the verdict, and the result in the folder's metadata and card."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import STORIES_260K
from test_cli import run_main

from optimum_prune import Pruner, PruningConfig, export_onnx
from optimum_prune.errors import InputError
from optimum_prune.evaluation.speed import SpeedReport, measure_speed
from optimum_prune.hub.model_card import record_speed

FAST = {"prompt_len": 32, "new_tokens": 4, "repeats": 2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench") / "pruned"
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu", progress=False)
    pruner.prune()
    pruner.save_pretrained(folder)
    export_onnx(pruner.model, folder / "onnx", tokenizer=pruner.tokenizer)
    return folder


@pytest.mark.parametrize("engine", ["onnx", "transformers"])
def test_speed_beside_the_dense_model_on_the_same_engine(saved: Path, engine: str) -> None:
    folder = saved / "onnx" if engine == "onnx" else saved
    report = measure_speed(folder, STORIES_260K, threads=1, **FAST)
    assert report.engine.startswith("onnxruntime" if engine == "onnx" else "transformers")
    for values in (report.output, report.dense):
        assert values["decode_tokens_per_second_min"] <= values["decode_tokens_per_second"] > 0
        assert values["prefill_tokens_per_second"] <= values["prefill_tokens_per_second_max"]
    prefill, decode = report.ratios
    assert decode == pytest.approx(report.output["decode_tokens_per_second"] / report.dense["decode_tokens_per_second"])
    assert report.verdict.startswith(f"decode {decode:.2f}x: ") and f"; prefill {prefill:.2f}x: " in report.verdict
    assert "interleaved runs" in report.table() and "verdict: " in report.table()


def test_an_engine_that_cannot_time_the_folder_is_refused_before_any_work(saved: Path) -> None:
    """DeepSparse itself is exercised outside CI (it pins numpy<2 and onnx<1.15): docs/benchmarks.md, Deployment."""
    with pytest.raises(InputError, match="deepsparse times ONNX folders"):
        measure_speed(saved, engine="deepsparse")
    with pytest.raises(InputError, match="transformers times safetensors folders"):
        measure_speed(saved / "onnx", engine="transformers")
    with pytest.raises(InputError, match="Unknown engine 'tensorrt'"):
        measure_speed(saved / "onnx", engine="tensorrt")
    if importlib.util.find_spec("deepsparse") is None:
        with pytest.raises(InputError, match="DeepSparse is not installed: it pins numpy<2"):
            measure_speed(saved / "onnx", engine="deepsparse")


def test_the_result_goes_into_the_metadata_and_the_card(tmp_path: Path) -> None:
    timing = {f"{kind}_tokens_per_second{suffix}": value for kind, value in (("prefill", 900.0), ("decode", 40.0))
              for suffix in ("", "_min", "_max")}  # fmt: skip
    report = SpeedReport(
        "onnxruntime 1.32.0", "cpu", "int4 weights", 2, 1, 512, 128, 3, "x86_64, 2 CPUs", timing,
        {**timing, **{f"decode_tokens_per_second{suffix}": 20.0 for suffix in ("", "_min", "_max")}},
    ).to_dict()  # fmt: skip
    assert report["verdict"] == "decode 2.00x: faster; prefill 1.00x: no measurable difference (the spreads overlap)"
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"optimum_prune": {"method": "magnitude"}}))
    (folder / "README.md").write_text("# model\n\n## Speed\n\nold\n\n## How to load\n\nsnippet\n")
    record_speed(folder, report)
    record_speed(folder, report)  # replaced, not added twice
    metadata = json.loads((folder / "config.json").read_text())["optimum_prune"]
    assert metadata["speed"]["verdict"] == report["verdict"] and metadata["method"] == "magnitude"
    card = (folder / "README.md").read_text()
    assert card.count("## Speed") == 1 and "old" not in card and card.rstrip().endswith("snippet")
    assert "| dense base model |" in card and f"Verdict: {report['verdict']}." in card


def test_cli_bench_and_its_bad_input(saved: Path, capsys) -> None:
    flags = ["--prompt-len", "32", "--new-tokens", "4", "--repeats", "2", "--no-record"]
    assert run_main("bench", str(saved), "--against", str(STORIES_260K), *flags) == 0
    out = capsys.readouterr().out
    assert "speed on onnxruntime" in out and "verdict: " in out  # the onnx/ export of the folder is timed
    assert json.loads((saved / "onnx" / "config.json").read_text())["optimum_prune"]["speed"] is None
    assert run_main("bench", str(saved / "missing")) == 2
    assert "argument OUTPUT: no saved model in" in capsys.readouterr().err
    assert run_main("bench", str(saved), "--repeats", "0") == 2
    assert "argument --repeats: must be a positive integer" in capsys.readouterr().err


def test_benchmark_flag_records_the_speed_of_the_output(tmp_path: Path, capsys) -> None:
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--benchmark"]
    assert run_main(*flags) == 2
    assert "argument --benchmark: it times the saved output; add --output DIR." in capsys.readouterr().err
    assert run_main(*flags, "--output", str(tmp_path / "out")) == 0
    assert "verdict: " in capsys.readouterr().out
    speed = json.loads((tmp_path / "out" / "config.json").read_text())["optimum_prune"]["speed"]
    assert speed["engine"].startswith("transformers") and speed["dense"] is not None
