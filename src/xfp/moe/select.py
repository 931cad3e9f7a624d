"""Auto-select for a routed expert stack: per expert, or one choice for the stack from a sample.

- `expert_select="expert"`: every expert is auto-selected on its own (`quantize_matrix`), like any matrix.
- `expert_select="stack"` (the published method): `expert_sample` evenly spaced experts are auto-selected on
  their own; the stack's choice is the most expensive of theirs (widest index width, then the smaller group
  size of that width, in mode v2a). Every expert of the stack is then quantized at that width and group size
  (the outlier budgets stay free) and judged on its own reconstruction: an expert that misses the floor
  escalates alone to the next wider widths. So the floor claim holds for every expert, not only the sample;
  the stack summary counts the experts that escalated.
- `stack_library=True` (mode v2a, L = 1, with "stack"): one codebook for the stack, fitted on the pooled
  normalised values of the sampled experts at the stack's width and group size, and used by every expert
  (each stores a copy: 2**bits float16 values, counted in its honest size). An expert that misses its floor
  with the shared codebook is auto-selected on its own (own codebook, same and wider widths).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from xfp.config import QuantConfig
from xfp.format.spec import V2aLayout
from xfp.quantize import library
from xfp.quantize.autoselect import MatrixResult, _finish_v2a, _outlier_positions, check_weight, quantize_matrix
from xfp.quantize.stats import cosine_from_sums, statistic


def sample_experts(n: int, k: int) -> list[int]:
    """k evenly spaced expert indices of 0..n-1 (all of them when k >= n), ascending, distinct."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _choice(result: MatrixResult) -> tuple[int, int]:
    """(bits, -group): larger is more expensive; the group is 0 in mode v2."""
    return result.layout.bits, -int(result.layout.entry().get("group") or 0)


def _restricted(config: QuantConfig, bits: int, group: int | None) -> QuantConfig:
    """`config` at one width (escalating to the wider ones) and, in v2a, one group size."""
    widths = sorted(b for b in config.bits + config.escalation_bits if b > bits)
    return dataclasses.replace(config, bits=(bits,), escalation_bits=tuple(widths),
                               group_size=(group,) if group else config.group_size)


def quantize_stack(names: list[str], load: Callable[[int], torch.Tensor], floor: float, config: QuantConfig,
                   kept_of: Callable[[str, torch.Tensor], torch.Tensor | None]) -> tuple[list[MatrixResult], dict]:
    """The experts of one stack (expert e stored as names[e], its weights load(e): [rows, cols]) ->
    (one result per expert, in order; the stack's selection record for the report).

    kept_of(name, w): the kept hot columns of that matrix (mode v2a), or None."""
    n = len(names)
    if config.expert_select == "expert":
        results = []
        for e in range(n):
            w = load(e)
            results.append(quantize_matrix(w, floor, config, names[e], kept_of(names[e], w)))
        return results, {"select": "expert"}
    sample = sample_experts(n, config.expert_sample)
    fitted = {}
    for e in sample:
        w = load(e)
        fitted[e] = quantize_matrix(w, floor, config, names[e], kept_of(names[e], w))
    bits, neg_group = max(_choice(r) for r in fitted.values())
    group = -neg_group or None
    stack_config = _restricted(config, bits, group)
    shared = _shared_codebook(names, load, sample, bits, group, config, kept_of) if config.stack_library else None
    results, escalated, own_codebook = [], [], []
    for e in range(n):
        if shared is None and e in fitted and _choice(fitted[e]) == (bits, neg_group):
            results.append(fitted[e])  # a sampled expert already at the stack's choice
            continue
        w = load(e)
        kept = kept_of(names[e], w)
        result = None
        if shared is not None:
            result = _with_codebook(names[e], w, shared.clone(), group, floor, config, kept)
            if result is None:
                own_codebook.append(e)
        if result is None:
            result = quantize_matrix(w, floor, stack_config, names[e], kept)
        if result.layout.bits > bits:
            escalated.append(e)
        results.append(result)
    record = {"select": "stack", "sample": sample, "bits": bits, "group": group, "escalated": escalated}
    if shared is not None:
        record["stack_library"] = True
        record["own_codebook"] = own_codebook
    return results, record


def _shared_codebook(names: list[str], load: Callable[[int], torch.Tensor], sample: list[int], bits: int,
                     group: int | None, config: QuantConfig,
                     kept_of: Callable[[str, torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
    """[1, 2**bits] float16: one codebook fitted on the sampled experts' normalised values (kept columns
    left out; no outliers)."""
    ws, masks = [], []
    for e in sample:
        w = load(e).float()
        kept = kept_of(names[e], w)
        ws.append(w)
        masks.append(library.outlier_mask(tuple(w.shape), torch.zeros(0, dtype=torch.int64), kept))
    groups = library.normalise(torch.cat(ws), group, torch.cat(masks))
    codebook, _ = library.fit_library(groups, bits, 1, config.lloyd_iterations)
    return codebook


def _with_codebook(name: str, w: torch.Tensor, codebook: torch.Tensor, group: int, floor: float,
                   config: QuantConfig, kept: torch.Tensor | None) -> MatrixResult | None:
    """The cheapest outlier set at which `w`, coded with the shared `codebook`, meets the floor; None if none."""
    check_weight(w, name)
    w32 = w.detach().to(torch.float32, copy=True)
    kept = torch.zeros(0, dtype=torch.int64) if kept is None or not kept.numel() else torch.unique(kept.long())
    rows, cols = w32.shape
    bits = codebook.shape[1].bit_length() - 1
    norm2_w = (w32.double() ** 2).sum(1)
    kept_hat = library.kept_values(*library.code_kept(w32[:, kept])).double()
    kept_dot, kept_norm2 = (w32[:, kept].double() * kept_hat).sum(1), (kept_hat ** 2).sum(1)
    flat = w32.reshape(-1)
    tried = []
    candidates = sorted(((V2aLayout(rows, cols, bits, pos.numel(), group, 1, kept.numel()), pos)
                         for pos in _outlier_positions(w32, config, kept)), key=lambda c: c[0].total_bytes)
    for layout, pos in candidates:
        groups = library.normalise(w32, group, library.outlier_mask((rows, cols), pos, kept))
        ids = torch.zeros((rows, groups.scale.shape[1]), dtype=torch.uint8)
        candidate = library.Candidate(layout, groups, codebook, ids, *library.assign(groups, codebook, ids))
        val, val16, row = flat[pos].double(), flat[pos].half().double(), pos // cols
        out_dot = torch.zeros(rows, dtype=torch.float64).index_add_(0, row, val * val16) + kept_dot
        out_norm2 = torch.zeros(rows, dtype=torch.float64).index_add_(0, row, val16 * val16) + kept_norm2
        screened = statistic(cosine_from_sums(candidate.dot + out_dot, norm2_w, candidate.norm2 + out_norm2),
                             config.statistic)
        tried.append({"bits": bits, "group": group, "outliers": layout.n_outliers, "bytes": layout.total_bytes,
                      "screened": screened, "stack_library": True})
        if screened >= floor:
            result = _finish_v2a(name, w32, candidate, pos, floor, config, tried, kept)
            if result.meets_floor:
                return result
    return None


__all__ = ["quantize_stack", "sample_experts"]
