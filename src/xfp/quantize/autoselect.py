"""Auto-select: the cheapest stored configuration of one matrix whose cosine statistic meets its floor.

Candidates are ordered by their exact honest size, which is known before any fitting (the layout table
depends only on the shape, the width, the outlier count and, in mode V2a, the group and library sizes):
- mode "v2": index width x outlier budget. Each one is screened cheaply from prefix sums over the sorted
  rows; the first that passes is confirmed on the real reconstruction.
- mode "v2a": index width x group size x outlier budget. Each one is fitted and assigned (one pooled fit
  for L = 1) and screened from per-row sums taken during the assignment; the first that passes is packed
  and confirmed on the real reconstruction.
A matrix that misses its floor even at the widest escalation width is returned marked `meets_floor=False`,
never silently: the candidate with the best statistic is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xfp.config import QuantConfig
from xfp.errors import XFPError
from xfp.format.pack import pack
from xfp.format.reference import Packed, PackedV2, decoded_ends_finite, kept_values, reconstruct
from xfp.format.spec import Layout, V2aLayout, V2Layout
from xfp.quantize import library, lloyd, outliers
from xfp.quantize.stats import all_statistics, cosine_from_sums, row_cosines, statistic

FP16_MAX = 65504.0


@dataclass
class MatrixResult:
    """One quantized matrix with the evidence for its choice.

    stats: every cosine statistic of the stored reconstruction; tried: each candidate screened, cheapest
    first (bits, outliers, bytes, screened statistic); reconstruction: [rows, cols] float16, the in-memory
    W_hat the statistics were computed on (decoding the stored tensors must give it bit for bit);
    channel_cosines: [rows] float64, cosine of each original row with its reconstruction.
    """

    name: str
    packed: Packed
    reconstruction: torch.Tensor
    channel_cosines: torch.Tensor
    floor: float
    statistic: str
    stats: dict[str, float]
    meets_floor: bool
    tried: list[dict] = field(default_factory=list)

    @property
    def layout(self) -> Layout:
        return self.packed.layout

    def summary(self) -> dict:
        """A JSON-ready row for reports. Its "mode", "bits", "outliers" (and, in mode v2a, "group" and
        "library") are `layout.entry()`: what quantization_config.matrices[name] needs to size the buffers."""
        lay = self.layout
        return {
            "name": self.name,
            "shape": [lay.rows, lay.cols],
            **lay.entry(),
            "bytes": lay.total_bytes,
            "bytes_by_part": lay.nbytes(),
            "honest_bits": lay.honest_bits,
            "index_bits": lay.index_bits,
            "floor": self.floor,
            "statistic": self.statistic,
            "cosine": self.stats,
            "meets_floor": self.meets_floor,
            "tried": self.tried,
        }


def check_weight(w: torch.Tensor, name: str) -> None:
    """Refuse what cannot be quantized, with a message naming the tensor."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise XFPError(f"tensor '{name}': weights must be a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
    if w.dim() != 2:
        raise XFPError(f"tensor '{name}': weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise XFPError(f"tensor '{name}': weights are empty, shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise XFPError(f"tensor '{name}': weights contain NaN or Inf")
    if float(w.abs().max()) > FP16_MAX:
        raise XFPError(f"tensor '{name}': a weight exceeds the fp16 range (|w| > {FP16_MAX:g})")


@dataclass(frozen=True)
class _OutlierSet:
    pos: torch.Tensor  # [n] int64 flat, ascending
    mass: torch.Tensor  # [rows, cols] float32 in sorted order: 0 for outliers, 1 otherwise
    dot: torch.Tensor  # [rows] float64: sum over the row's outliers of w * fp16(w)
    norm2: torch.Tensor  # [rows] float64: sum over the row's outliers of fp16(w)^2


def _outlier_positions(w: torch.Tensor, config: QuantConfig, kept_cols: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The distinct outlier sets of the budgets: [n] int64 flat positions each, ascending."""
    found: dict[int, torch.Tensor] = {}
    for budget in sorted(set(config.outliers.budgets)):
        pos = outliers.select(w, config.outliers, budget, kept_cols)
        found.setdefault(pos.numel(), pos)  # caps keep the largest first, so equal counts mean equal sets
    return list(found.values())


def _outlier_sets(w: torch.Tensor, rows: lloyd.SortedRows, positions: list[torch.Tensor]) -> list[_OutlierSet]:
    n_rows, n_cols = w.shape
    flat = w.reshape(-1)
    sets: dict[int, _OutlierSet] = {}
    for pos in positions:
        is_out = torch.zeros(flat.numel(), dtype=torch.bool)
        is_out[pos] = True
        mass = (~is_out).reshape(n_rows, n_cols).gather(1, rows.order).to(torch.float32)
        val = flat[pos].double()
        val16 = flat[pos].half().double()
        row = pos // n_cols
        dot = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, row, val * val16)
        norm2 = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, row, val16 * val16)
        sets[pos.numel()] = _OutlierSet(pos, mass, dot, norm2)
    return list(sets.values())


def quantize_matrix(w: torch.Tensor, floor: float, config: QuantConfig, name: str = "tensor",
                    kept_cols: torch.Tensor | None = None) -> MatrixResult:
    """w: [out, in] floating -> the cheapest matrix in `config.mode` whose `config.statistic` cosine meets
    `floor` (or the best one, marked `meets_floor=False`).

    kept_cols: (mode v2a) input columns to store apart in int8 (`xfp.quantize.hot_columns`), int64
    ascending. The input is never modified.
    """
    check_weight(w, name)
    w32 = w.detach().to(torch.float32, copy=True)
    if kept_cols is not None and kept_cols.numel():
        if config.mode != "v2a":
            raise XFPError(f"tensor '{name}': kept columns need mode v2a")
        kept_cols = torch.unique(kept_cols.long())
        if int(kept_cols.min()) < 0 or int(kept_cols.max()) >= w32.shape[1]:
            raise XFPError(f"tensor '{name}': kept columns must lie in [0, {w32.shape[1]})")
    else:
        kept_cols = torch.zeros(0, dtype=torch.int64)
    positions = _outlier_positions(w32, config, kept_cols)
    if config.mode == "v2a":
        return _quantize_v2a(name, w32, positions, floor, config, kept_cols)
    n_rows, n_cols = w32.shape
    rows = lloyd.sort_rows(w32)
    norm2_w = (w32.double() ** 2).sum(1)
    sets = _outlier_sets(w32, rows, positions)
    tried: list[dict] = []
    best = None  # the highest screened statistic, kept in case no candidate meets the floor
    for widths in (config.bits, config.escalation_bits):
        candidates = sorted(
            ((V2Layout(n_rows, n_cols, b, s.pos.numel()), s) for b in widths for s in sets),
            key=lambda c: (c[0].total_bytes, c[0].bits),
        )
        for layout, oset in candidates:
            codebook = lloyd.fit(rows, oset.mass, layout.entries, config.lloyd_iterations).to(torch.float16)
            dot, norm2_hat = lloyd.screen(rows, oset.mass, codebook)
            cos = cosine_from_sums(dot + oset.dot, norm2_w, norm2_hat + oset.norm2)
            screened = statistic(cos, config.statistic)
            tried.append({"bits": layout.bits, "outliers": layout.n_outliers,
                          "bytes": layout.total_bytes, "screened": screened})
            if screened >= floor:
                result = _finish(name, w32, layout, oset, codebook, floor, config, tried)
                if result.meets_floor:
                    return result
            if best is None or screened > best[0]:
                best = (screened, layout, oset, codebook)
    _, layout, oset, codebook = best
    return _finish(name, w32, layout, oset, codebook, floor, config, tried)


def _finish(name: str, w32: torch.Tensor, layout: V2Layout, oset: _OutlierSet, codebook: torch.Tensor,
            floor: float, config: QuantConfig, tried: list[dict]) -> MatrixResult:
    """Build the real reconstruction of a candidate and judge it exactly."""
    indices = lloyd.assign(w32, codebook)
    pos32 = oset.pos.to(torch.int32)
    val16 = w32.reshape(-1)[oset.pos].to(torch.float16)
    w_hat = reconstruct(indices, codebook, pos32, val16)
    cosines = row_cosines(w32, w_hat)
    stats = all_statistics(cosines)
    packed = PackedV2(layout.rows, layout.cols, layout.bits, pack(indices, layout.bits), codebook, pos32, val16)
    meets = stats[config.statistic] >= floor
    return MatrixResult(name, packed, w_hat, cosines, floor, config.statistic, stats, meets, list(tried))


GROUPS_KEPT = 4
"""Normalised matrices (one per group size x outlier set, with their cached histograms and sorted groups)
auto-select keeps for reuse across widths; about 6 bytes per weight each, more when L > 1."""


def _quantize_v2a(name: str, w32: torch.Tensor, positions: list[torch.Tensor], floor: float,
                  config: QuantConfig, kept_cols: torch.Tensor) -> MatrixResult:
    """Mode v2a: candidates width x group size x outlier set, cheapest first; each is screened from per-row
    sums taken while assigning (the exact decoded values, summed in another order than `row_cosines`), and
    the first that passes is confirmed on the real reconstruction."""
    n_rows, n_cols = w32.shape
    flat = w32.reshape(-1)
    norm2_w = (w32.double() ** 2).sum(1)
    kept = w32[:, kept_cols]
    kept_hat = kept_values(*library.code_kept(kept)).double()
    kept_dot, kept_norm2 = (kept.double() * kept_hat).sum(1), (kept_hat ** 2).sum(1)
    outlier_sums = {}  # n -> (dot, norm2): [rows] float64 over the outliers and kept columns, as decoded
    for pos in positions:
        val, val16, row = flat[pos].double(), flat[pos].half().double(), pos // n_cols
        outlier_sums[pos.numel()] = (
            torch.zeros(n_rows, dtype=torch.float64).index_add_(0, row, val * val16) + kept_dot,
            torch.zeros(n_rows, dtype=torch.float64).index_add_(0, row, val16 * val16) + kept_norm2)
    cache: dict[tuple[int, int], library.Groups] = {}
    tried: list[dict] = []
    best = None  # (screened statistic, candidate, outlier positions), kept in case none meets the floor
    for widths in (config.bits, config.escalation_bits):
        candidates = sorted(
            ((V2aLayout(n_rows, n_cols, b, pos.numel(), g, config.library_size, kept_cols.numel()), pos)
             for b in widths for g in config.group_size for pos in positions),
            key=lambda c: (c[0].total_bytes, c[0].bits, c[0].group, c[0].n_outliers),
        )
        for layout, pos in candidates:
            key = (layout.group, layout.n_outliers)
            groups = cache.get(key)
            if groups is None:
                groups = library.normalise(w32, layout.group, library.outlier_mask((n_rows, n_cols), pos, kept_cols))
                while len(cache) >= GROUPS_KEPT:
                    cache.pop(next(iter(cache)))
                cache[key] = groups
            candidate = library.evaluate(layout, groups, config.lloyd_iterations)
            out_dot, out_norm2 = outlier_sums[layout.n_outliers]
            cos = cosine_from_sums(candidate.dot + out_dot, norm2_w, candidate.norm2 + out_norm2)
            screened = statistic(cos, config.statistic)
            tried.append({"bits": layout.bits, "group": layout.group, "outliers": layout.n_outliers,
                          "bytes": layout.total_bytes, "screened": screened})
            if screened >= floor:
                result = _finish_v2a(name, w32, candidate, pos, floor, config, tried, kept_cols)
                if result.meets_floor:
                    return result
            if best is None or screened > best[0]:
                best = (screened, candidate, pos)
    _, candidate, pos = best
    return _finish_v2a(name, w32, candidate, pos, floor, config, tried, kept_cols)


def _finish_v2a(name: str, w32: torch.Tensor, candidate: library.Candidate, pos: torch.Tensor, floor: float,
                config: QuantConfig, tried: list[dict], kept_cols: torch.Tensor) -> MatrixResult:
    """Pack a v2a candidate and judge its real reconstruction exactly."""
    packed, w_hat = library.build(candidate, pos.to(torch.int32), w32.reshape(-1)[pos].to(torch.float16), kept_cols)
    if not decoded_ends_finite(packed.library, packed.group_scale, packed.group_offset, packed.ids):
        raise XFPError(f"tensor '{name}': weights too close to the float16 limit for mode v2a "
                       "(a group's decoded range overflows float16); quantize it in mode v2")
    cosines = row_cosines(w32, w_hat)
    stats = all_statistics(cosines)
    meets = stats[config.statistic] >= floor
    return MatrixResult(name, packed, w_hat, cosines, floor, config.statistic, stats, meets, list(tried))


def measure_candidates(w: torch.Tensor, config: QuantConfig, stop_floor: float, name: str = "tensor",
                       kept_cols: torch.Tensor | None = None) -> list[dict]:
    """Mode v2a: every candidate auto-select would screen for `w` [out, in] at floor `stop_floor`, in its
    order (cheapest honest size first, escalation widths after), with honest bytes, every cosine statistic
    of the screened reconstruction and its relative squared error ||W - W_hat||^2 / ||W||^2. Stops after the
    first candidate whose `config.statistic` reaches `stop_floor` (the one `quantize_matrix` would pick), so
    it costs about one auto-select. Used by the H-Process table (`xfp.fit.table`); nothing is packed.

    Each row: bits, group, outliers (count), budget (the smallest outlier cap giving that count), bytes,
    stats {statistic: cosine}, error.
    """
    check_weight(w, name)
    if config.mode != "v2a":
        raise XFPError(f"tensor '{name}': measuring candidates needs mode v2a, got {config.mode!r}")
    w32 = w.detach().to(torch.float32, copy=True)
    kept_cols = torch.zeros(0, dtype=torch.int64) if kept_cols is None else torch.unique(kept_cols.long())
    n_rows, n_cols = w32.shape
    positions: dict[int, tuple[float, torch.Tensor]] = {}
    for budget in sorted(set(config.outliers.budgets)):
        pos = outliers.select(w32, config.outliers, budget, kept_cols)
        positions.setdefault(pos.numel(), (budget, pos))
    flat = w32.reshape(-1)
    norm2_w = (w32.double() ** 2).sum(1)
    kept = w32[:, kept_cols]
    kept_hat = kept_values(*library.code_kept(kept)).double()
    kept_dot, kept_norm2 = (kept.double() * kept_hat).sum(1), (kept_hat ** 2).sum(1)
    sums = {}
    for n, (_, pos) in positions.items():
        val, val16, row = flat[pos].double(), flat[pos].half().double(), pos // n_cols
        sums[n] = (torch.zeros(n_rows, dtype=torch.float64).index_add_(0, row, val * val16) + kept_dot,
                   torch.zeros(n_rows, dtype=torch.float64).index_add_(0, row, val16 * val16) + kept_norm2)
    total_w = float(norm2_w.sum())
    cache: dict[tuple[int, int], library.Groups] = {}
    rows: list[dict] = []
    for widths in (config.bits, config.escalation_bits):
        candidates = sorted(
            (V2aLayout(n_rows, n_cols, b, n, g, config.library_size, kept_cols.numel())
             for b in widths for g in config.group_size for n in positions),
            key=lambda lay: (lay.total_bytes, lay.bits, lay.group, lay.n_outliers),
        )
        for layout in candidates:
            key = (layout.group, layout.n_outliers)
            groups = cache.get(key)
            if groups is None:
                mask = library.outlier_mask((n_rows, n_cols), positions[layout.n_outliers][1], kept_cols)
                groups = library.normalise(w32, layout.group, mask)
                while len(cache) >= GROUPS_KEPT:
                    cache.pop(next(iter(cache)))
                cache[key] = groups
            candidate = library.evaluate(layout, groups, config.lloyd_iterations)
            out_dot, out_norm2 = sums[layout.n_outliers]
            dot, norm2_hat = candidate.dot + out_dot, candidate.norm2 + out_norm2
            cos = cosine_from_sums(dot, norm2_w, norm2_hat)
            error = float((norm2_w - 2 * dot + norm2_hat).sum()) / total_w if total_w > 0 else 0.0
            stats = all_statistics(cos)
            rows.append({"bits": layout.bits, "group": layout.group, "outliers": layout.n_outliers,
                         "budget": positions[layout.n_outliers][0], "bytes": layout.total_bytes,
                         "stats": stats, "error": max(error, 0.0)})
            if stats[config.statistic] >= stop_floor:
                return rows
    return rows
