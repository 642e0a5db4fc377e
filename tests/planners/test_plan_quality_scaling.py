"""The Megatron-LM scaling study of ``bench/plan_quality.py --scaling``: the table's numbers agree with the paper's
own formula, Megatron-LM's configuration is built as the paper describes it, and on a small row plait's plan is
predicted no slower than it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def scaling() -> ModuleType:
    """bench/plan_quality_scaling.py as a module (it imports bench/plan_quality.py)."""
    sys.path.insert(0, str(BENCH))
    try:
        import plan_quality_scaling
    finally:
        sys.path.remove(str(BENCH))
    return plan_quality_scaling


def test_the_rows_are_the_papers_configurations(scaling: ModuleType) -> None:
    rows = scaling.SCALING_ROWS
    assert len(rows) == 10 and rows[0].gpus == 32 and rows[-1].gpus == 3072
    for row in rows:
        assert round(scaling.paper_params(row) / 1e9, 1) == row.params_b, row  # as the paper rounds them
        assert row.dp * row.tp * row.pp == row.gpus and row.gpus % 8 == 0 and row.batch % row.dp == 0
        assert row.layers % row.pp == 0 and row.hidden % row.heads == 0
    assert [(r.tp, r.pp, r.dp) for r in rows[-2:]] == [(8, 35, 9), (8, 64, 6)]


def test_megatrons_stages_split_the_blocks_evenly_with_embedding_first_and_head_last(scaling: ModuleType) -> None:
    row = scaling.SCALING_ROWS[-2]  # 105 blocks on 35 stages
    ranges = scaling.megatron_ranges(row)
    assert len(ranges) == 35 and ranges[0] == (0, 4) and ranges[-1] == (103, 107)
    assert all(b - a == 3 for a, b in ranges[1:-1]) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))


def test_plait_is_no_slower_than_megatrons_configuration_on_a_small_row(scaling: ModuleType) -> None:
    # 4 blocks, 2 stages x 2-way tensor parallel x 4-way data parallel on 2 DGX-A100 nodes, batch 32
    row = scaling.ScalingRow(0.1, 8, 512, 4, 2, 2, 16, 32)
    result = scaling.run_scaling_row(row)
    m = result.megatron
    assert (m["tp"], m["pp"], m["dp"], m["num_micro"], m["rank_micro"]) == (2, 2, 4, 8, 1)
    assert m["recompute"] == "all" and m["schedule"] == "1f1b" and m["fits"]
    assert result.plait is not None and result.plait["fits"]
    assert result.ratio is not None and result.ratio >= 1 - 1e-9, (result.plait, m)
    assert "| 0.1B | 16 | 32 |" in scaling.scaling_table([result])
