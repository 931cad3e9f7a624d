"""Batched, weighted 1-D Lloyd (k-means) per row, on sorted values and prefix sums.

Every row is sorted once. Each Lloyd step then costs O(rows * k * log cols): the boundaries between
neighbouring centroids split a sorted row into contiguous segments, and segment sums come from prefix
sums. A per-element mass lets outliers (mass 0) and, later, importance weights shape the fit without
re-sorting. No Python loop over rows; deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SortedRows:
    """values: [rows, cols] float32, each row ascending; order: [rows, cols] int64 with
    values = w.gather(1, order)."""

    values: torch.Tensor
    order: torch.Tensor


@dataclass(frozen=True)
class Prefix:
    """Prefix sums over a sorted row, float64, [rows, cols + 1], starting at 0: mass (m) and
    first moment (m*v)."""

    m: torch.Tensor
    mv: torch.Tensor


def sort_rows(w: torch.Tensor) -> SortedRows:
    """w: [rows, cols] float32 -> its rows sorted ascending (stable, so ties keep column order)."""
    values, order = torch.sort(w, dim=1, stable=True)
    return SortedRows(values, order)


def prefix_sums(values: torch.Tensor, mass: torch.Tensor) -> Prefix:
    """values, mass: [rows, cols] (mass in sorted order too) -> Prefix."""
    v = values.double()
    m = mass.double()

    def cum(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(torch.cumsum(x, dim=1), (1, 0))

    return Prefix(cum(m), cum(m * v))


def boundaries(centroids: torch.Tensor) -> torch.Tensor:
    """centroids: [rows, k] ascending -> decision thresholds: [rows, k-1] float32 (midpoints)."""
    c = centroids.double()
    return ((c[:, 1:] + c[:, :-1]) * 0.5).float()


def segment_edges(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Split each sorted row at its thresholds -> edges: [rows, k+1] int64.

    Segment j is values[edges[j]:edges[j+1]]: the elements with t[j-1] <= v < t[j]. This is the same
    rule `assign` uses, so segment statistics match the actual assignment.
    """
    rows, cols = values.shape
    inner = lower_bound(values, thresholds)
    zero = torch.zeros((rows, 1), dtype=torch.int64)
    end = torch.full((rows, 1), cols, dtype=torch.int64)
    return torch.cat([zero, inner, end], dim=1)


def lower_bound(values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Per row, how many sorted values are < each query (torch.searchsorted, right=False).

    values: [rows, cols] ascending, queries: [rows, q] -> [rows, q] int64. A vectorised binary search:
    with few queries per row it is an order of magnitude faster than batched torch.searchsorted.
    """
    cols = values.shape[1]
    lo = torch.zeros(queries.shape, dtype=torch.int64)
    hi = torch.full(queries.shape, cols, dtype=torch.int64)
    for _ in range(cols.bit_length()):
        mid = (lo + hi) >> 1
        below = torch.gather(values, 1, mid.clamp(max=cols - 1)) < queries
        active = lo < hi
        lo = torch.where(active & below, mid + 1, lo)
        hi = torch.where(active & ~below, mid, hi)
    return lo


def segment_totals(prefix: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """prefix: [rows, cols+1], edges: [rows, k+1] -> per-segment totals: [rows, k]."""
    at = torch.gather(prefix, 1, edges)
    return at[:, 1:] - at[:, :-1]


def init_quantiles(values: torch.Tensor, prefix: Prefix, k: int) -> torch.Tensor:
    """Centroids at the mass quantiles (j + 1/2) / k of each row -> [rows, k] float64."""
    total = prefix.m[:, -1:]
    targets = total * (torch.arange(k, dtype=torch.float64) + 0.5) / k
    idx = lower_bound(prefix.m[:, 1:], targets)
    idx = idx.clamp_(max=values.shape[1] - 1)
    return torch.gather(values, 1, idx).double()


def fit(values: torch.Tensor, prefix: Prefix, k: int, iterations: int) -> torch.Tensor:
    """Weighted Lloyd on sorted rows -> centroids: [rows, k] float64, ascending.

    An empty segment keeps its centroid. Stops early once no centroid moves.
    """
    c = init_quantiles(values, prefix, k)
    for _ in range(iterations):
        edges = segment_edges(values, boundaries(c))
        mass = segment_totals(prefix.m, edges)
        first = segment_totals(prefix.mv, edges)
        new = torch.where(mass > 0, first / mass.clamp_min(1e-300), c)
        new, _ = torch.sort(new, dim=1)
        if torch.equal(new, c):
            break
        c = new
    return c


def assign(rows: SortedRows, edges: torch.Tensor) -> torch.Tensor:
    """Nearest codebook entry of every weight, from the segments of its sorted row.

    edges: [rows, k+1] from `segment_edges` -> indices: [rows, cols] uint8 in the original column order.
    A value exactly on a threshold goes to the upper entry (as in `segment_edges`).
    """
    n_rows, n_cols = rows.values.shape
    marks = torch.zeros((n_rows, n_cols + 1), dtype=torch.int16)
    inner = edges[:, 1:-1]
    marks.scatter_add_(1, inner, torch.ones_like(inner, dtype=torch.int16))
    sorted_ids = torch.cumsum(marks[:, :n_cols], dim=1, dtype=torch.int16).to(torch.uint8)
    return torch.empty((n_rows, n_cols), dtype=torch.uint8).scatter_(1, rows.order, sorted_ids)
