"""`optimum-prune frontier`: the Pareto front and the recommendations on a fixed table (checked by hand), a speed
within noise never counted as a speed-up, resume skipping finished candidates, bad input refused before work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import C4_SAMPLE, TINYSTORIES_656K, TINYSTORIES_VAL
from test_cli import run_main

from optimum_prune import frontier
from optimum_prune.errors import InputError
from optimum_prune.frontier import Constraints, Row, pareto

FASTER, SAME = ": faster", ": no measurable difference (the spreads overlap)"


def _row(pruning: str, kind: str, perplexity: float, megabytes: float, decode: float, verdict: str) -> Row:
    return Row(pruning, "llamacpp", kind, perplexity, int(megabytes * 1e6), decode, 10 * decode, decode / 100, verdict)


TABLE = [
    _row("dense", "q8_0", 34.0, 145.0, 100.0, "the baseline"),
    _row("dense", "q4_0", 37.0, 80.0, 160.0, f"1.60x{FASTER}"),
    _row("budget -30%", "q8_0", 60.0, 100.0, 140.0, f"1.40x{FASTER}"),  # dominated by dense q4_0 on both axes
    _row("budget -30%", "q4_0", 66.0, 56.0, 210.0, f"2.10x{FASTER}"),
    _row("budget -15%", "q4_0", 45.0, 68.0, 165.0, f"1.65x{SAME}"),  # faster median, spreads overlapping
]


def test_the_pareto_front_on_a_fixed_table() -> None:
    by_speed = [row.name for row in pareto(TABLE, "decode")]
    assert by_speed == [
        "dense, llamacpp q8_0",
        "dense, llamacpp q4_0",
        "budget -30%, llamacpp q4_0",
        "budget -15%, llamacpp q4_0",
    ]
    by_size = [row.name for row in pareto(TABLE, "bytes")]
    assert by_size == ["dense, llamacpp q8_0", "dense, llamacpp q4_0", "budget -30%, llamacpp q4_0",
                       "budget -15%, llamacpp q4_0"]  # fmt: skip


def test_recommendations_and_a_speed_within_noise_never_counts() -> None:
    dense = {"llamacpp": 34.0}
    lines = Constraints(max_perplexity="1.35x", min_speedup=1.62, max_size="60MB").recommendations(TABLE, dense)
    assert lines[0].startswith("perplexity at most 1.35x: budget -15%, llamacpp q4_0")  # 45.0 <= 45.9, fastest
    # 1.65x within noise does not reach 1.62x; the measurable 2.10x does
    assert lines[1].startswith("decode at least 1.62x, measurably: budget -30%, llamacpp q4_0")
    assert lines[2].startswith("a file of at most 60MB: budget -30%, llamacpp q4_0")
    assert lines[3] == "all of them: no candidate meets it"
    assert (
        Constraints(max_perplexity="40")
        .recommendations(TABLE, dense)[0]
        .startswith("perplexity at most 40: dense, llamacpp q4_0")
    )
    assert not TABLE[4].measurably_faster and TABLE[3].measurably_faster


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_perplexity": "fast"}, "give a ratio such as 1.2x"),
        ({"max_perplexity": "-2x"}, "give a ratio such as 1.2x"),
        ({"min_speedup": 0.0}, "must be a positive ratio"),
        ({"max_size": "big"}, "must be a size in bytes"),
    ],
)
def test_bad_constraints_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Constraints(**arguments)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engines", "tensorrt"], "Unknown engine 'tensorrt'"),
        (["--max-perplexity", "abc"], "give a ratio such as 1.2x"),
        (["--max-size", "lots"], "must be a size in bytes"),
        (["--candidates", "mlp=1.5"], "must be in [0, 1)"),
        (["--eval-windows", "0"], "--eval-windows must be a positive integer"),
    ],
)
def test_bad_flags_exit_2_before_work(flags: list[str], message: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(frontier, "run_frontier", lambda *a, **k: pytest.fail("started"))
    base = ["frontier", "--model", str(TINYSTORIES_656K), "--dataset", str(C4_SAMPLE), "--eval", str(TINYSTORIES_VAL)]
    assert run_main(*base, "--output", str(tmp_path / "f"), *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_a_small_frontier_runs_and_resumes_skipping_finished_candidates(tmp_path: Path, monkeypatch, capsys) -> None:
    flags = ["frontier", "--model", str(TINYSTORIES_656K), "--dataset", str(C4_SAMPLE), "--eval", str(TINYSTORIES_VAL)]
    flags += ["--output", str(tmp_path / "f"), "--engines", "onnxruntime", "--candidates", "mlp=0.5", "--num-samples"]
    flags += ["16", "--seq-len", "128", "--eval-windows", "1", "--repeats", "1", "--max-perplexity", "1.5x"]
    assert run_main(*flags, "--dry-run") == 0
    planned = capsys.readouterr().out
    assert "2 prunings x formats of onnxruntime = 6 candidates" in planned and "estimated: pruning " in planned
    measured = []
    speed = frontier_speed(monkeypatch, measured)
    assert run_main(*flags) == 0
    printed = capsys.readouterr().out
    assert "| dense, onnxruntime fp32 |" in printed and "Recommendations:" in printed
    rows = json.loads((tmp_path / "f" / "frontier.json").read_text())
    assert len(rows) == 6 and len(measured) == 6 and speed
    assert (tmp_path / "f" / "frontier.png").is_file()
    assert run_main(*flags) == 2  # a finished run is not overwritten
    assert "holds a frontier run: add --resume" in capsys.readouterr().err
    del rows["mlp=0.5 | onnxruntime int4"]  # as if stopped before the last candidate
    (tmp_path / "f" / "frontier.json").write_text(json.dumps(rows))
    assert run_main(*flags, "--resume") == 0
    assert len(measured) == 7  # only the missing candidate was measured again


def frontier_speed(monkeypatch, measured: list) -> bool:
    """`measure_speed` wrapped to count the candidates measured (the real one runs)."""
    from optimum_prune.evaluation import speed

    original = speed.measure_speed

    def counted(*args, **kwargs):
        measured.append(args[0])
        return original(*args, **{**kwargs, "prompt_len": 16, "new_tokens": 4})

    monkeypatch.setattr(speed, "measure_speed", counted)
    return True
