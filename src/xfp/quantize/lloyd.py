"""Batched, weighted 1-D Lloyd (k-means) per row, on sorted values and prefix sums (numba).

Every row is sorted once (torch). Per row, prefix sums of the mass and of mass*value turn each Lloyd
step into k binary searches and k subtractions: O(k log cols) instead of O(cols * k). A per-element mass
lets outliers (mass 0), and later importance weights, shape the fit without re-sorting. Rows run in
parallel (numba prange); each row is independent, so the result is deterministic.

Decision rule shared by `fit`, `screen` and `assign`: thresholds are the midpoints of neighbouring
entries, computed in float64 and rounded to float32; a value v belongs to entry j when
t[j-1] <= v < t[j] (a value on a threshold goes to the upper entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch


@dataclass(frozen=True)
class SortedRows:
    """values: [rows, cols] float32, each row ascending; order: [rows, cols] int64 with
    values = w.gather(1, order)."""

    values: torch.Tensor
    order: torch.Tensor


def sort_rows(w: torch.Tensor) -> SortedRows:
    """w: [rows, cols] float32 -> its rows sorted ascending (stable, so ties keep column order)."""
    values, order = torch.sort(w, dim=1, stable=True)
    return SortedRows(values.contiguous(), order)


@numba.njit(cache=True, inline="always")
def _lower_bound(a, x, lo, hi):
    """First index i in [lo, hi) with a[i] >= x (hi if none); a ascending."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, inline="always")
def _prefix(v, m, cm, cmv):
    cm[0] = 0.0
    cmv[0] = 0.0
    for i in range(v.size):
        cm[i + 1] = cm[i] + m[i]
        cmv[i + 1] = cmv[i] + m[i] * np.float64(v[i])


@numba.njit(cache=True, inline="always")
def _edges(v, c, edges):
    k = c.size
    edges[0] = 0
    edges[k] = v.size
    for j in range(k - 1):
        t = np.float32((c[j] + c[j + 1]) * 0.5)
        edges[j + 1] = _lower_bound(v, t, edges[j], v.size)


@numba.njit(cache=True, parallel=True)
def _fit(values, mass, k, iterations, out):
    rows, cols = values.shape
    for r in numba.prange(rows):
        v = values[r]
        cm = np.empty(cols + 1)
        cmv = np.empty(cols + 1)
        _prefix(v, mass[r], cm, cmv)
        c = np.empty(k)
        for j in range(k):  # quantile initialisation on the cumulative mass
            target = cm[cols] * (j + 0.5) / k
            idx = _lower_bound(cm[1:], target, 0, cols)
            c[j] = v[min(idx, cols - 1)]
        edges = np.empty(k + 1, dtype=np.int64)
        new = np.empty(k)
        for _ in range(iterations):
            _edges(v, c, edges)
            for j in range(k):
                m = cm[edges[j + 1]] - cm[edges[j]]
                new[j] = (cmv[edges[j + 1]] - cmv[edges[j]]) / m if m > 0 else c[j]
            new.sort()
            same = True
            for j in range(k):
                if new[j] != c[j]:
                    same = False
                c[j] = new[j]
            if same:
                break
        out[r] = c


@numba.njit(cache=True, parallel=True)
def _screen(values, mass, codebook, dot, norm2):
    rows, cols = values.shape
    k = codebook.shape[1]
    for r in numba.prange(rows):
        v = values[r]
        cm = np.empty(cols + 1)
        cmv = np.empty(cols + 1)
        _prefix(v, mass[r], cm, cmv)
        edges = np.empty(k + 1, dtype=np.int64)
        c = codebook[r]
        _edges(v, c, edges)
        d = 0.0
        n = 0.0
        for j in range(k):
            d += c[j] * (cmv[edges[j + 1]] - cmv[edges[j]])
            n += c[j] * c[j] * (cm[edges[j + 1]] - cm[edges[j]])
        dot[r] = d
        norm2[r] = n


@numba.njit(cache=True, inline="always")
def thresholds_at_most(t, x):
    """How many of the ascending float32 thresholds t are <= x: the index of x's entry (ties go up)."""
    lo, hi = 0, t.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if t[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, parallel=True)
def _assign(w, codebook, out):
    rows, cols = w.shape
    k = codebook.shape[1]
    for r in numba.prange(rows):
        t = np.empty(k - 1, dtype=np.float32)
        for j in range(k - 1):
            t[j] = np.float32((codebook[r, j] + codebook[r, j + 1]) * 0.5)
        for i in range(cols):
            out[r, i] = thresholds_at_most(t, w[r, i])


def fit(rows: SortedRows, mass: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """Weighted Lloyd. mass: [rows, cols] in sorted order -> centroids: [rows, k] float64, ascending.

    An empty cluster keeps its centroid; stops early once no centroid moves.
    """
    out = np.empty((rows.values.shape[0], k))
    _fit(rows.values.numpy(), _np32(mass), k, iterations, out)
    return torch.from_numpy(out)


def screen(rows: SortedRows, mass: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, over the weights with mass: (sum m*w*c[idx], sum m*c[idx]^2) -> ([rows], [rows]) float64,
    computed from segment sums without building the reconstruction. codebook: [rows, k] ascending."""
    n = rows.values.shape[0]
    dot, norm2 = np.empty(n), np.empty(n)
    _screen(rows.values.numpy(), _np32(mass), codebook.double().numpy(), dot, norm2)
    return torch.from_numpy(dot), torch.from_numpy(norm2)


def assign(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest entry of an ascending codebook. w: [rows, cols] float32, codebook: [rows, k]
    -> indices: [rows, cols] uint8 (same rule as `fit` and `screen`)."""
    out = np.empty(tuple(w.shape), dtype=np.uint8)
    _assign(w.contiguous().numpy(), codebook.double().numpy(), out)
    return torch.from_numpy(out)


def _np32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).contiguous().numpy()
