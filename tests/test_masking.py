"""Mask selection: exact counts, per-matrix and per-row thresholds, N:M groups, bit packing."""

from __future__ import annotations

import re

import pytest
import torch

from optimum_prune.core.masks import (
    NMPattern,
    lowest_mask,
    nm_mask,
    pack_mask,
    prune_count,
    row_lowest_mask,
    split_count,
    unpack_mask,
)


def test_parse_patterns():
    assert NMPattern.parse("unstructured") is None
    assert NMPattern.parse(" Unstructured ") is None
    assert NMPattern.parse("2:4") == NMPattern(2, 4)
    assert NMPattern.parse(" 4 : 8 ") == NMPattern(4, 8)
    assert NMPattern(2, 4).sparsity == 0.5
    assert str(NMPattern(4, 8)) == "4:8"


@pytest.mark.parametrize("bad", ["3:2", "4:4", "0:4", "2:", "two:four", "2:4:8", ""])
def test_parse_rejects_bad_patterns(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        NMPattern.parse(bad)


@pytest.mark.parametrize(("total", "parts"), [(0, 3), (10, 3), (7, 7), (5, 8), (1000, 7)])
def test_split_count_sums_exactly(total, parts):
    counts = split_count(total, parts)
    assert counts.sum().item() == total
    assert counts.max() - counts.min() <= 1


def test_lowest_mask_is_one_threshold_per_matrix():
    scores = torch.rand(16, 32, generator=torch.Generator().manual_seed(0))
    scores[0] *= 10  # a row of large scores keeps everything
    mask = lowest_mask(scores, prune_count(scores.numel(), 0.5))
    assert mask.sum().item() == 256
    assert scores[mask].max() < scores[~mask].min()
    assert mask[0].sum() < 16  # rows do not get equal shares


def test_row_lowest_mask_compares_within_rows():
    scores = torch.rand(16, 32, generator=torch.Generator().manual_seed(0))
    scores[0] *= 10
    mask = row_lowest_mask(scores, 0.5)
    assert mask.sum(dim=1).tolist() == [16] * 16
    for row in range(16):
        assert scores[row][mask[row]].max() < scores[row][~mask[row]].min()


def test_row_lowest_mask_exact_total_when_rows_do_not_divide():
    scores = torch.rand(7, 10, generator=torch.Generator().manual_seed(1))
    mask = row_lowest_mask(scores, 0.55)
    assert mask.sum().item() == prune_count(70, 0.55) == 38
    assert set(mask.sum(dim=1).tolist()) <= {5, 6}


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4)])
def test_nm_mask_prunes_lowest_in_every_group(pattern):
    scores = torch.rand(8, 32, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(scores, pattern)
    groups = mask.view(8, -1, pattern.m)
    assert (groups.sum(dim=2) == pattern.m - pattern.n).all()
    values = scores.view(8, -1, pattern.m)
    pruned_max = values.masked_fill(~groups, -1).amax(dim=2)
    kept_min = values.masked_fill(groups, 2).amin(dim=2)
    assert (pruned_max < kept_min).all()


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1, 1), (17, 9)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_pack_is_little_endian_row_major():
    mask = torch.tensor([[True, False, False, False], [False, False, False, True]])
    assert pack_mask(mask).tolist() == [1 + 128]


def test_unpack_rejects_wrong_size():
    with pytest.raises(ValueError, match="cannot hold shape"):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), (4, 8))
