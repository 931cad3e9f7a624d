"""Mode V2a: per-group normalisation, a per-matrix library of L codebooks, and the index assignment.

Steps for one matrix `w: [rows, cols]` at `bits`, group size G, library size L, and a set of outliers:

1. Groups (`normalise`): each row is cut into groups of G weights along the input dimension (the last
   one ragged). On a group's *coded* weights (neither outliers nor in a kept column), offset = (max + min)
   / 2 and scale = (max - min) / 2 (float64; both 0 for a group with no such weight; a constant group gets
   scale 0 and decodes to its offset). Each is stored as a uint8 code into a per-matrix table of 256
   float16 values (`scale_tables`): scales on a geometric grid (code 0 = exactly 0), offsets on a uniform
   grid symmetric about an exact 0; a group takes the nearest entry (scales: nearest in log). Normalised
   values z = (w - offset) / scale, with the decoded float16 offset and scale, are what the library is
   fitted on; outliers, kept columns and zero-scale groups take no part.
2. Library (`fit_library`), unweighted in normalised space:
   - L = 1: one 2**bits-level Lloyd codebook on every normalised value of the matrix;
   - L > 1 (the published V2a recipe): a 2**bits-level Lloyd codebook per group; those codebooks, as
     points in R^(2**bits) weighted by the group's fitted weights, are clustered into L prototypes by
     k-means++ (seeded, deterministic) then Lloyd; every group is then re-assigned to the library codebook
     with the least squared error over its own normalised values. Then up to LIBRARY_REFINEMENTS rounds
     (our addition): each library codebook is refitted on the pooled values of its groups and the groups
     re-assigned, kept while the total error falls.
   Pooled fits run Lloyd on a fine histogram of the values (`fit_pooled`); the library is stored as
   float16, each codebook ascending, and every error above is measured with the float16 entries.
3. Indices (`assign`): each weight takes the entry of its group's codebook whose *decoded* value
   (`xfp.format.reference.group_values`, exactly what the decoder computes) is nearest to it; ties go to
   the upper entry, thresholds are midpoints computed in float64 and rounded to float32 (the rule of
   `xfp.quantize.lloyd.assign`). The reconstruction judged by auto-select is read from the same decoded
   table, so it equals the reference decode of the stored tensors bit for bit: what was judged is what is
   stored (tests/quantize/test_library.py checks it for every width, group size and library size).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
import torch
import torch.nn.functional as F

from xfp.format.pack import pack
from xfp.format.reference import PackedV2a, group_values, kept_values
from xfp.format.spec import SCALE_TABLE, V2aLayout, n_groups
from xfp.quantize import lloyd

KMEANS_SEED = 0
"""Seed of the k-means++ draws that pick the initial library prototypes (L > 1)."""

KMEANS_ITERATIONS = 32
"""Lloyd iterations on the prototypes after k-means++ (stops earlier once no group changes cluster)."""

LIBRARY_REFINEMENTS = 2
"""L > 1: rounds of (refit each library codebook on the pooled values of its groups, re-assign every group),
each kept only if it lowers the total normalised error. Not in the published recipe; measured on a
heavy-tailed 256x1024 matrix at 3 bits, G = 128: relative error 0.274 -> 0.241 (L = 4), 0.221 -> 0.203 (L = 32)."""

ASSIGN_CHUNK = 1 << 22
"""Decoded table entries (rows x groups x 2**bits) built per step of `assign` (bounds memory)."""


@dataclass
class Groups:
    """One matrix cut into groups of `group` weights and normalised.

    w: [rows, cols] float32, the weights; outlier: [rows, cols] bool, True for the weights the groups do not
    code (sparse outliers and kept columns); scale, offset: [rows, groups] float16, the decoded values;
    scale_code, offset_code: [rows, groups] uint8 and scale_table, offset_table: [256] float16, as stored;
    z: [rows, cols] float32, the normalised values (0 where not fitted); fitted: [rows, cols] bool, True for
    the coded weights of groups with scale > 0.
    """

    group: int
    w: torch.Tensor
    outlier: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    z: torch.Tensor
    fitted: torch.Tensor
    scale_code: torch.Tensor
    scale_table: torch.Tensor
    offset_code: torch.Tensor
    offset_table: torch.Tensor

    @cached_property
    def histogram(self) -> tuple[lloyd.SortedRows, torch.Tensor]:
        """`histograms` of every fitted value of the matrix as one label (reused across widths)."""
        return histograms(self, torch.zeros(self.scale.shape, dtype=torch.int64), 1)

    @cached_property
    def sorted_groups(self) -> tuple[lloyd.SortedRows, torch.Tensor]:
        """Each group as one sorted row: (rows [rows*groups, group], mass in sorted order, 1 = fitted);
        the ragged tail is padded with zeros of mass 0."""
        rows, cols = self.z.shape
        pad = n_groups(cols, self.group) * self.group - cols
        flat = F.pad(self.z, (0, pad)).reshape(-1, self.group)
        sorted_rows = lloyd.sort_rows(flat)
        fitted = F.pad(self.fitted, (0, pad), value=False).reshape(-1, self.group)
        return sorted_rows, fitted.gather(1, sorted_rows.order).to(torch.float32)


@numba.njit(cache=True, parallel=True)
def _group_range(w, outlier, group, lo, hi, has):
    """Per group, min and max over its non-outlier weights (has = whether there is any)."""
    rows, cols = w.shape
    ng = lo.shape[1]
    for r in numba.prange(rows):
        for gi in range(ng):
            a, b = np.inf, -np.inf
            any_ = False
            for c in range(gi * group, min(cols, (gi + 1) * group)):
                if not outlier[r, c]:
                    x = w[r, c]
                    any_ = True
                    if x < a:
                        a = x
                    if x > b:
                        b = x
            lo[r, gi], hi[r, gi], has[r, gi] = a, b, any_


@numba.njit(cache=True, parallel=True)
def _normalise(w, outlier, group, scale, offset, z, fitted):
    """z = (w - offset) / scale in float32 for non-outlier weights of groups with scale > 0, else 0."""
    rows, cols = w.shape
    for r in numba.prange(rows):
        for c in range(cols):
            s = scale[r, c // group]
            if s > 0 and not outlier[r, c]:
                z[r, c] = (w[r, c] - offset[r, c // group]) / s
                fitted[r, c] = True
            else:
                z[r, c] = np.float32(0.0)
                fitted[r, c] = False


SCALE_RANGE = 2.0 ** -16
"""The geometric scale grid spans [max scale * SCALE_RANGE, max scale]; smaller scales take the grid's
smallest step or 0, whichever is nearer in log (0 only for groups of exactly zero range)."""


def _nearest(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table: [n] ascending float64, x: float64 -> the index of the nearest entry (ties to the upper)."""
    mids = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x, mids, right=True)


def scale_tables(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """True group scales (>= 0) and offsets, float64 [rows, groups] -> (scale_code uint8, scale_table [256]
    float16, offset_code uint8, offset_table [256] float16): module doc, step 1."""
    n = SCALE_TABLE
    top = float(scale.max()) if scale.numel() else 0.0
    if top > 0:
        grid = top * SCALE_RANGE ** (torch.arange(n - 2, -1, -1, dtype=torch.float64) / (n - 2))
        s_table = torch.cat([torch.zeros(1, dtype=torch.float64), grid]).half()
    else:
        s_table = torch.zeros(n, dtype=torch.float16)
    s_table = torch.sort(s_table.float()).values.half()
    positive = s_table.double().clamp_min(1e-300).log()
    code = _nearest(positive, scale.clamp_min(1e-300).log())
    code = torch.where(scale > 0, code.clamp_min(1), 0)
    reach = float(offset.abs().max()) if offset.numel() else 0.0
    step = reach / (n // 2 - 1) if reach > 0 else 1.0
    # entry 0 (-128 steps) lies beyond R: clamped to the float16 range, it stays finite when R is near 65504
    top16 = torch.finfo(torch.float16).max
    o_table = ((torch.arange(n, dtype=torch.float64) - n // 2) * step).clamp(-top16, top16).half()
    o_code = _nearest(o_table.double(), offset)
    return code.to(torch.uint8), s_table, o_code.to(torch.uint8), o_table


def normalise(w: torch.Tensor, group: int, outlier: torch.Tensor) -> Groups:
    """w: [rows, cols] float32, outlier: [rows, cols] bool (True for weights the groups do not code)
    -> the matrix's groups (see the module doc)."""
    rows, cols = w.shape
    w = w.contiguous()
    ng = n_groups(cols, group)
    lo, hi = np.empty((rows, ng)), np.empty((rows, ng))
    has = np.empty((rows, ng), dtype=np.bool_)
    w_np, out_np = w.numpy(), outlier.contiguous().numpy()
    _group_range(w_np, out_np, group, lo, hi, has)
    lo, hi, has = torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(has)
    scale_code, scale_table, offset_code, offset_table = scale_tables(torch.where(has, (hi - lo) / 2, 0.0),
                                                                      torch.where(has, (hi + lo) / 2, 0.0))
    scale, offset = scale_table[scale_code.long()], offset_table[offset_code.long()]
    z = np.empty((rows, cols), dtype=np.float32)
    fitted = np.empty((rows, cols), dtype=np.bool_)
    _normalise(w_np, out_np, group, scale.float().numpy(), offset.float().numpy(), z, fitted)
    return Groups(group, w, outlier.contiguous(), scale, offset, torch.from_numpy(z), torch.from_numpy(fitted),
                  scale_code, scale_table, offset_code, offset_table)


HISTOGRAM_BINS = 1 << 16
"""Histogram bins shared by a library's codebooks when one is fitted on pooled values (L = 1, and the
refinement rounds of L > 1): max(HISTOGRAM_BINS // L, MIN_BINS) equal bins per codebook over the range of
the fitted values. Lloyd runs on the bins (each bin's mean, weighted by its count): a bin straddling a
decision threshold goes to one side whole; the centroids are still exact means of the values they hold."""

MIN_BINS = 1 << 12


@numba.njit(cache=True)
def _label_bin_sums(z, fitted, labels, group, counts, sums):
    """Per label (the library id of each group), counts and sums of the fitted values in equal bins over
    [min, max] of all fitted values. counts, sums: [n_labels, bins] float64, zeroed. -> (lo, width)."""
    rows, cols = z.shape
    bins = counts.shape[1]
    lo, hi = np.inf, -np.inf
    for r in range(rows):
        for c in range(cols):
            if fitted[r, c]:
                lo = min(lo, z[r, c])
                hi = max(hi, z[r, c])
    if lo > hi:
        return 0.0, 1.0
    width = max(np.float64(hi) - np.float64(lo), 1e-30) / bins
    for r in range(rows):
        for c in range(cols):
            if fitted[r, c]:
                x = np.float64(z[r, c])
                b = min(bins - 1, int((x - lo) / width))
                label = labels[r, c // group]
                counts[label, b] += 1.0
                sums[label, b] += x
    return np.float64(lo), width


def histograms(groups: Groups, labels: torch.Tensor, n_labels: int) -> tuple[lloyd.SortedRows, torch.Tensor]:
    """The fitted normalised values of each label's groups as one histogram row: (bin means, ascending,
    [n_labels, bins] float32, the bin centre where empty; counts [n_labels, bins] float32).
    labels: [rows, groups] int64 in [0, n_labels)."""
    bins = max(HISTOGRAM_BINS // n_labels, MIN_BINS)
    counts, sums = np.zeros((n_labels, bins)), np.zeros((n_labels, bins))
    lo, width = _label_bin_sums(groups.z.numpy(), groups.fitted.numpy(), labels.contiguous().numpy(), groups.group,
                                counts, sums)
    centres = lo + (np.arange(bins) + 0.5) * width
    means = np.where(counts > 0, sums / np.maximum(counts, 1.0), centres)
    # a bin's mean lies in its bin: ascending, up to float32 ties that maximum.accumulate keeps ordered
    values = np.maximum.accumulate(means.astype(np.float32), axis=1)
    return (lloyd.SortedRows(torch.from_numpy(values), torch.empty(0, dtype=torch.int64)),
            torch.from_numpy(counts.astype(np.float32)))


def fit_pooled(groups: Groups, labels: torch.Tensor | None, n_labels: int, k: int,
               iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd codebook per label on the pooled fitted values of the groups carrying it.

    labels: [rows, groups] int64 in [0, n_labels), or None for one label over the whole matrix (its
    histogram is kept on `groups` for the next width) -> (codebooks: [n_labels, k] float64 ascending,
    has_values: [n_labels] bool; a label with no values gets a fixed grid on [-1, 1])."""
    rows, counts = groups.histogram if labels is None else histograms(groups, labels, n_labels)
    codebooks = lloyd.fit(rows, counts, k, iterations)
    has_values = counts.sum(1) > 0
    grid = torch.linspace(-1.0, 1.0, k, dtype=torch.float64)
    return torch.where(has_values.unsqueeze(1), codebooks, grid), has_values


# -- fitting the library ---------------------------------------------------------------------------


@numba.njit(cache=True, parallel=True)
def _best_codebooks(values, mass, library, best, best_err):
    """values: [n, g] float32 rows ascending, mass: [n, g], library: [L, k] float64 rows ascending ->
    best[n]: the codebook with the least sum of mass * (v - nearest entry)^2 over the row (lloyd's tie
    rule for "nearest"; ties between codebooks to the lower id), best_err[n]: that sum.

    Per row, prefix sums of m, m*v, m*v^2 make each codebook's error k binary searches and k sums."""
    n, g = values.shape
    n_lib, k = library.shape
    for r in numba.prange(n):
        v = values[r]
        m = mass[r]
        s0 = np.empty(g + 1)
        s1 = np.empty(g + 1)
        s2 = np.empty(g + 1)
        s0[0] = s1[0] = s2[0] = 0.0
        for i in range(g):
            x = np.float64(v[i])
            s0[i + 1] = s0[i] + m[i]
            s1[i + 1] = s1[i] + m[i] * x
            s2[i + 1] = s2[i] + m[i] * x * x
        best[r], best_err[r] = 0, np.inf
        for li in range(n_lib):
            c = library[li]
            start = 0
            e = 0.0
            for j in range(k):
                if j < k - 1:  # values below the threshold t[j] (float32 midpoint) belong to entries <= j
                    t = np.float32((c[j] + c[j + 1]) * 0.5)
                    lo, hi = start, g
                    while lo < hi:
                        mid = (lo + hi) >> 1
                        if v[mid] < t:
                            lo = mid + 1
                        else:
                            hi = mid
                    end = lo
                else:
                    end = g
                if end > start:
                    e += (s2[end] - s2[start]) - 2.0 * c[j] * (s1[end] - s1[start]) + c[j] * c[j] * (s0[end] - s0[start])
                start = end
            if e < best_err[r]:
                best[r], best_err[r] = li, e


@numba.njit(cache=True)
def _kmeans(points, weight, n_clusters, draws, iterations, centers, labels):
    """Weighted k-means++ then Lloyd on points: [n, k] float64; draws: [n_clusters] uniforms in [0, 1).

    Deterministic: sequential sums in index order, ties go to the lower cluster. Points with weight 0 never
    seed a cluster nor move one. centers: [n_clusters, k] out; labels: [n] int64 out.
    """
    n, k = points.shape
    d2 = np.empty(n)
    for i in range(n):
        d2[i] = np.inf
    for c in range(n_clusters):
        total = 0.0
        for i in range(n):
            total += weight[i] * (1.0 if c == 0 else d2[i])
        pick = -1
        if total > 0:
            target = draws[c] * total
            acc = 0.0
            for i in range(n):
                acc += weight[i] * (1.0 if c == 0 else d2[i])
                if acc > target and weight[i] > 0:
                    pick = i
                    break
            if pick < 0:  # rounding at the very end of the sum
                for i in range(n - 1, -1, -1):
                    if weight[i] > 0:
                        pick = i
                        break
        if pick < 0:  # every weighted point already coincides with a center: duplicate the first
            for j in range(k):
                centers[c, j] = centers[0, j] if c > 0 else 0.0
            continue
        for j in range(k):
            centers[c, j] = points[pick, j]
        for i in range(n):
            d = 0.0
            for j in range(k):
                x = points[i, j] - centers[c, j]
                d += x * x
            if d < d2[i]:
                d2[i] = d
    sums = np.empty((n_clusters, k))
    mass = np.empty(n_clusters)
    for i in range(n):
        labels[i] = -1
    for _ in range(iterations):
        changed = False
        for i in range(n):
            best, best_d = 0, np.inf
            for c in range(n_clusters):
                d = 0.0
                for j in range(k):
                    x = points[i, j] - centers[c, j]
                    d += x * x
                if d < best_d:
                    best, best_d = c, d
            if labels[i] != best:
                labels[i] = best
                changed = True
        if not changed:
            break
        sums[:] = 0.0
        mass[:] = 0.0
        for i in range(n):
            c = labels[i]
            mass[c] += weight[i]
            for j in range(k):
                sums[c, j] += weight[i] * points[i, j]
        for c in range(n_clusters):
            if mass[c] > 0:
                for j in range(k):
                    centers[c, j] = sums[c, j] / mass[c]


def _ascending_fp16(codebooks: torch.Tensor) -> torch.Tensor:
    """[L, k] float -> float16, each row ascending (as stored)."""
    return torch.sort(codebooks.to(torch.float16).float(), dim=1).values.half()


def fit_library(groups: Groups, bits: int, library_size: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (library: [L, 2**bits] float16, each row ascending; ids: [rows, groups] uint8, all 0 when L == 1)."""
    k = 1 << bits
    rows, ng = groups.scale.shape
    if library_size == 1:
        return _ascending_fp16(fit_pooled(groups, None, 1, k, iterations)[0]), torch.zeros((rows, ng), dtype=torch.uint8)
    sorted_rows, mass = groups.sorted_groups
    per_group = lloyd.fit(sorted_rows, mass, k, iterations)  # [rows*groups, k] float64
    draws = np.random.Generator(np.random.PCG64(KMEANS_SEED)).random(library_size)
    centers = np.zeros((library_size, k))
    labels = np.empty(per_group.shape[0], dtype=np.int64)
    _kmeans(per_group.numpy(), mass.double().sum(1).numpy(), library_size, draws, KMEANS_ITERATIONS, centers, labels)
    library = _ascending_fp16(torch.from_numpy(centers))
    ids, err = best_codebooks(groups, library)
    for _ in range(LIBRARY_REFINEMENTS):
        refit, has_values = fit_pooled(groups, ids.long(), library_size, k, iterations)
        candidate = torch.where(has_values.unsqueeze(1), _ascending_fp16(refit), library)
        new_ids, new_err = best_codebooks(groups, candidate)
        if not new_err < err:
            break
        library, ids, err = candidate, new_ids, new_err
    return library, ids


def best_codebooks(groups: Groups, library: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each group's library codebook with the least squared error over its fitted normalised values
    (ties to the lower id) -> (ids: [rows, groups] uint8, the total of those errors).
    library: [L, k] float16, rows ascending."""
    rows, ng = groups.scale.shape
    sorted_rows, mass = groups.sorted_groups
    best, best_err = np.empty(rows * ng, dtype=np.uint8), np.empty(rows * ng)
    _best_codebooks(sorted_rows.values.numpy(), mass.numpy(), library.double().numpy(), best, best_err)
    return torch.from_numpy(best).view(rows, ng), float(best_err.sum())


# -- indices, packing -------------------------------------------------------------------------------


@numba.njit(cache=True, parallel=True)
def _assign(w, outlier, table, group, idx, w_hat, dot, norm2):
    """Per weight: index = how many thresholds of its group are <= w (ties up), thresholds being the
    midpoints of the group's decoded table (float64, rounded to float32); w_hat = table[index].
    Per row, over the non-outlier weights: dot = sum w * w_hat, norm2 = sum w_hat^2 (float64)."""
    rows, cols = w.shape
    ng, k = table.shape[1], table.shape[2]
    for r in numba.prange(rows):
        t = np.empty(k - 1, dtype=np.float32)
        d_sum, n_sum = 0.0, 0.0
        for gi in range(ng):
            d = table[r, gi]
            for j in range(k - 1):
                t[j] = np.float32((np.float64(d[j]) + np.float64(d[j + 1])) * 0.5)
            for c in range(gi * group, min(cols, (gi + 1) * group)):
                x = w[r, c]
                if k <= 16:  # branch-free count of thresholds <= x
                    lo = 0
                    for j in range(k - 1):
                        lo += t[j] <= x
                else:
                    lo = lloyd.thresholds_at_most(t, x)
                idx[r, c] = lo
                v = d[lo]
                w_hat[r, c] = v
                if not outlier[r, c]:
                    d_sum += np.float64(x) * np.float64(v)
                    n_sum += np.float64(v) * np.float64(v)
        dot[r] = d_sum
        norm2[r] = n_sum


@dataclass
class Candidate:
    """One fitted V2a candidate before packing.

    indices: [rows, cols] uint8; w_hat: [rows, cols] float32, the decoded values before the outliers are
    put back (each exactly a float16); dot, norm2: [rows] float64, sums over the non-outlier weights of
    w * w_hat and w_hat^2 (for a cheap screen of the per-row cosines)."""

    layout: V2aLayout
    groups: Groups
    library: torch.Tensor
    ids: torch.Tensor
    indices: torch.Tensor
    w_hat: torch.Tensor
    dot: torch.Tensor
    norm2: torch.Tensor


def assign(groups: Groups, library: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index of every weight: the entry whose decoded value is nearest (module doc, step 3).

    library: [L, k] float16 rows ascending, ids: [rows, groups] uint8 -> (indices: [rows, cols] uint8,
    w_hat: [rows, cols] float32, each value the float16 `group_values` of its entry, scale and offset,
    dot and norm2: [rows] float64 over the non-outlier weights, see `Candidate`).
    """
    rows, cols = groups.w.shape
    ng, k = groups.scale.shape[1], library.shape[1]
    idx = np.empty((rows, cols), dtype=np.uint8)
    w_hat = np.empty((rows, cols), dtype=np.float32)
    dot, norm2 = np.empty(rows), np.empty(rows)
    step = max(1, ASSIGN_CHUNK // (ng * k))
    w, outlier = groups.w.numpy(), groups.outlier.numpy()
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codebooks = library[ids[r0:r1].long()]  # [r, groups, k]
        table = group_values(codebooks, groups.scale[r0:r1].unsqueeze(-1), groups.offset[r0:r1].unsqueeze(-1))
        _assign(w[r0:r1], outlier[r0:r1], table.float().contiguous().numpy(), groups.group, idx[r0:r1],
                w_hat[r0:r1], dot[r0:r1], norm2[r0:r1])
    return tuple(torch.from_numpy(a) for a in (idx, w_hat, dot, norm2))


def evaluate(layout: V2aLayout, groups: Groups, iterations: int) -> Candidate:
    """Fit the library and assign every weight: a candidate, ready to be screened or built."""
    library, ids = fit_library(groups, layout.bits, layout.library, iterations)
    return Candidate(layout, groups, library, ids, *assign(groups, library, ids))


KEPT_SCALE_MAX = 515.5
"""The largest float16 kept-column scale s with 127 * s finite in float16 (127 * 516 rounds to inf)."""


def code_kept(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept columns [rows, m] float32 -> (int8 [rows, m], float16 scale [m]): per column, scale = absmax / 127
    (rounded to float16, 1 for an all-zero column) and q = round(w / scale) clamped to [-127, 127]."""
    scale = (columns.abs().amax(0) / 127).half() if columns.numel() else torch.zeros(columns.shape[1], dtype=torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # absmax near 65504 rounds the scale up to 516, and 127 * 516 overflows float16: cap it at 515.5
    scale = torch.minimum(scale, torch.tensor(KEPT_SCALE_MAX, dtype=torch.float16))
    q = torch.round(columns / scale.float()).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def build(candidate: Candidate, outlier_pos: torch.Tensor, outlier_val: torch.Tensor,
          kept_cols: torch.Tensor | None = None) -> tuple[PackedV2a, torch.Tensor]:
    """Packing and the reconstruction -> (stored matrix, W_hat: [rows, cols] float16), W_hat equal to
    `decode(packed)` bit for bit (module doc, step 3).

    outlier_pos: [n] int32 flat ascending (the candidate's outliers), outlier_val: [n] float16;
    kept_cols: [m] int32 ascending, the input columns stored apart in int8 (`code_kept`; none when None)."""
    lay, groups = candidate.layout, candidate.groups
    w_hat = candidate.w_hat.half()
    if outlier_pos.numel():
        w_hat.view(-1)[outlier_pos.long()] = outlier_val
    kept_cols = torch.zeros(0, dtype=torch.int32) if kept_cols is None else kept_cols.to(torch.int32)
    kept_val, kept_scale = code_kept(groups.w[:, kept_cols.long()])
    if kept_cols.numel():
        w_hat[:, kept_cols.long()] = kept_values(kept_val, kept_scale)
    ids = candidate.ids if lay.library > 1 else torch.zeros((lay.rows, 0), dtype=torch.uint8)
    packed = PackedV2a(lay.rows, lay.cols, lay.bits, lay.group, pack(candidate.indices, lay.bits), candidate.library,
                       groups.scale_code, groups.scale_table, groups.offset_code, groups.offset_table, ids,
                       outlier_pos, outlier_val, kept_cols, kept_val, kept_scale)
    return packed, w_hat


def outlier_mask(shape: tuple[int, int], outlier_pos: torch.Tensor, kept_cols: torch.Tensor | None = None) -> torch.Tensor:
    """[n] flat positions (and [m] kept columns) -> [rows, cols] bool, True where the groups do not code."""
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[outlier_pos.long()] = True
    mask = mask.view(shape)
    if kept_cols is not None and kept_cols.numel():
        mask[:, kept_cols.long()] = True
    return mask


def quantize(w: torch.Tensor, layout: V2aLayout, outlier_pos: torch.Tensor, iterations: int = 16,
             kept_cols: torch.Tensor | None = None) -> tuple[PackedV2a, torch.Tensor]:
    """w: [rows, cols] float32, outlier_pos: [n] int64 flat ascending (none in a kept column), kept_cols: [m]
    int64 ascending -> (stored V2a matrix, W_hat float16)."""
    groups = normalise(w, layout.group, outlier_mask(tuple(w.shape), outlier_pos, kept_cols))
    candidate = evaluate(layout, groups, iterations)
    return build(candidate, outlier_pos.to(torch.int32), w.reshape(-1)[outlier_pos].to(torch.float16), kept_cols)


__all__ = ["Candidate", "Groups", "assign", "best_codebooks", "build", "evaluate", "fit_library", "normalise",
           "outlier_mask", "quantize"]
