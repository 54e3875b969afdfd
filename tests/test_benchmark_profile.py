"""benchmarks/profile_prune.py: its split of the pruning time adds up and counts the engine's passes."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, STORIES_260K

sys.path.insert(0, str(REPO))

from benchmarks import profile_prune  # noqa: E402


def test_time_split_adds_up_and_counts_passes() -> None:
    if not STORIES_260K.is_dir():
        pytest.skip("offline assets missing")
    wanda = profile_prune.profile("stories260k", "wanda", samples=2)
    assert wanda["forward"] > 0 and wanda["statistics"] > 0 and wanda["pruning"] > 0
    parts = wanda["forward"] + wanda["statistics"] + wanda["pruning"] + wanda["rest"]
    assert parts == pytest.approx(wanda["total"])
    assert wanda["rest"] >= 0
    assert wanda["passes"] == pytest.approx((2 * 5 - 1) / 5)  # 5 blocks, no outputs computed for the last
    magnitude = profile_prune.profile("stories260k", "magnitude", samples=2)
    assert magnitude["passes"] == 0 and magnitude["statistics"] == 0  # no calibration pass at all
    markdown = profile_prune.markdown([wanda], "command")
    assert "| stories260K (assets) | wanda | 2 x 512 |" in markdown
    assert f"wanda {wanda['forward']:.0f} s of {wanda['total']:.0f} s." in markdown
