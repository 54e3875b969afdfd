"""benchmarks/quality.py: its grids, one real row on stories260K, and the markdown it renders."""

from __future__ import annotations

import math
import sys

import pytest
from conftest import REPO, STORIES_260K

sys.path.insert(0, str(REPO))

from benchmarks import quality  # noqa: E402
from benchmarks.quality import Row, grid  # noqa: E402


def test_grids_cover_the_issues() -> None:
    issue2 = grid("issue2", "stories260k")
    assert [r.method for r in issue2].count("dense") == 1
    assert {(r.method, r.sparsity) for r in issue2[1:]} == {
        (m, s) for m in ("magnitude", "wanda", "sparsegpt") for s in ("50%", "2:4", "70%")
    }
    owl = grid("owl", "stories260k")
    assert len(owl) == 12 and sum(r.allocation == "owl" for r in owl) == 6
    sweep = grid("owl-sweep", "stories260k")
    assert len({r.key for r in sweep}) == 8  # the OWL hyperparameters are part of the key
    sweep_80 = grid("owl-sweep-80", "stories260k")
    assert {(r.method, r.sparsity, r.allocation) for r in sweep_80} == {("wanda", "80%", "owl")}
    assert len({r.key for r in sweep_80}) == 3
    with pytest.raises(ValueError, match="Unknown grid"):
        grid("owl2", "stories260k")


def test_run_row_prunes_and_evaluates_stories260k() -> None:
    if not STORIES_260K.is_dir():
        pytest.skip("offline assets missing")
    dense = quality.run_row(Row("stories260k", "dense"), num_samples=2, seq_len=64, eval_windows=2)
    pruned = quality.run_row(Row("stories260k", "wanda", "2:4"), num_samples=2, seq_len=64, eval_windows=2)
    assert dense["prune_seconds"] is None and dense["global_sparsity"] == 0.0
    assert pruned["global_sparsity"] == pytest.approx(0.5)
    assert pruned["prune_seconds"] > 0 and pruned["peak_rss_bytes"] > 0
    assert math.isfinite(pruned["perplexity"]) and pruned["perplexity"] > dense["perplexity"] > 1.0


def test_results_accumulate_and_render(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    written: dict[str, str] = {}
    monkeypatch.setattr(quality, "write_section", lambda name, markdown: written.update({name: markdown}))
    settings = {"num_samples": 2, "seq_len": 64, "eval_windows": 2, "date": "2026-01-01 00:00 UTC"}
    measured = {"global_sparsity": 0.7, "prune_seconds": 3.0, "peak_rss_bytes": 2**20, "eval_seconds": 1.0}
    quality.save_result(Row("stories260k", "wanda", "70%"), {**settings, **measured, "perplexity": 90.0})
    quality.save_result(Row("stories260k", "wanda", "70%", "owl"), {**settings, **measured, "perplexity": 60.0})
    quality.save_result(
        Row("stories260k", "sparsegpt", "70%"), {**settings, "error": "subprocess exited with status 1"}
    )
    assert len(quality.load_results("stories260k")) == 3

    quality.render("quality-tiny")
    markdown = written["quality-tiny"]
    assert "| wanda | 70% | 90.00 | 60.00 |  |" in markdown
    assert "wanda 70%: OWL lower than uniform (60.00 vs 90.00, x0.67)" in markdown
    assert "failed (subprocess exited with status 1)" in markdown
    assert "| dense | 0% | uniform | not run |" in markdown

    sweep_row = Row("stories260k", "wanda", "70%", "owl", 7.0, 0.2)
    quality.save_result(sweep_row, {**settings, **measured, "perplexity": 70.0})
    quality.render("quality-tiny")
    markdown = written["quality-tiny"]
    assert "| wanda | 70% | uniform |  | 90.00 |" in markdown
    assert "| wanda | 70% | owl | m=5, lambda=0.08 | 60.00 |" in markdown
    assert "| wanda | 70% | owl | m=7, lambda=0.2 | 70.00 |" in markdown
    assert "`--num-samples 2 --seq-len 64 --eval-windows 2`" in markdown
