"""Synthetic measurement tables: exact numbers, no model."""

from __future__ import annotations

import pytest

from xfp.config import QuantConfig
from xfp.fit.table import Candidate, MatrixTable, Table


def _make_table(matrices: list[tuple[str, list[tuple[int, float, float]]]], kept_bytes: int = 0) -> Table:
    """[(class, [(bytes, p1 statistic, error), ...])] -> a Table; candidate k gets bits 2 + k."""
    rows = []
    for n, (cls, cands) in enumerate(matrices):
        cs = tuple(Candidate(2 + k, 64, 0, 0.0, b, {"p1": s, "min": s}, e) for k, (b, s, e) in enumerate(cands))
        rows.append(MatrixTable(f"m{n}.weight", cls, (4, 8), cs, 0.99, False))
    return Table("synthetic", "p1", QuantConfig(), False, 10_000_000, kept_bytes, 0, tuple(rows))


@pytest.fixture
def make_table():
    return _make_table
