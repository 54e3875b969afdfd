"""benchmarks/memory.py: rows accumulate, a rerun replaces its row, and the reading follows the numbers."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO))

from benchmarks import memory  # noqa: E402


def _row(mode: str, peak: int, samples: int = 8) -> dict:
    return {
        "offload": mode, "samples": samples, "seq_len": 128, "layers": 24, "model_bytes": 1_000_000_000,
        "baseline_bytes": 300_000_000, "peak_rss_bytes": peak, "seconds": 10.0, "estimate_host_peak_bytes": peak,
        "estimate_seconds": 20.0, "activations_bytes": 4_000_000, "block_bytes": 50_000_000, "date": "2026-11-29",
        "command": "python benchmarks/memory.py",
    }  # fmt: skip


def test_rows_accumulate_and_render(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "RESULTS", tmp_path / "memory.json")
    memory.save_result(_row("cpu", 1_200_000_000))
    memory.save_result(_row("disk", 900_000_000))
    memory.save_result(_row("disk", 250_000_000))  # measured again: replaces the first disk row
    memory.save_result(_row("disk-activations", 280_000_000, samples=64))
    results = memory.load_results()
    assert [(r["offload"], r["samples"]) for r in results] == [("disk", 8), ("cpu", 8), ("disk-activations", 64)]
    markdown = memory.render(results)
    assert "| 24 blocks, 1.00 GB | 8 x 128 (4 MB) | `disk` | 0.25 GB | 0.25 |" in markdown
    assert "24 blocks, 8 x 128 tokens, `disk`: peak 0.25 x the model in all" in markdown
    assert "target of 0.3 x model + activations (0.30 GB) is met by the whole process" in markdown
    assert "24 blocks, 8 x 128 tokens, `cpu`: peak 1.20 x the model in all" in markdown
    assert markdown.count("not met by the whole process") == 1
    memory.save_result(_row("disk", 400_000_000, samples=64))
    markdown = memory.render(memory.load_results())
    assert (
        "- 24 blocks, 64 x 128 tokens: `offload_activations=True` lowered the peak from 0.40 GB to 0.28 GB" in markdown
    )
