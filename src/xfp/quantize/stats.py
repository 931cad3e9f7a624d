"""Per-output-channel cosine similarity and the statistics a floor is judged by."""

from __future__ import annotations

import torch

from xfp.config import STATISTICS

_QUANTILES = {"p1": 0.01, "p5": 0.05, "median": 0.5}


def cosine_from_sums(dot: torch.Tensor, norm2_a: torch.Tensor, norm2_b: torch.Tensor) -> torch.Tensor:
    """Row cosines from <a,b>, |a|^2, |b|^2 ([rows] float64). Two zero rows are identical (1.0);
    exactly one zero row scores 0.0."""
    denom = torch.sqrt(norm2_a * norm2_b)
    cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(dot))
    both_zero = (norm2_a == 0) & (norm2_b == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos).clamp_(-1.0, 1.0)


def row_cosines(w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """w, w_hat: [rows, cols] -> cosine per row: [rows] float64."""
    a, b = w.double(), w_hat.double()
    return cosine_from_sums((a * b).sum(1), (a * a).sum(1), (b * b).sum(1))


def statistic(cos: torch.Tensor, name: str) -> float:
    """One statistic of per-channel cosines. Percentiles take the lower neighbour (an actual channel's
    value, never an interpolation above it): p1 is the cosine that 99% of the channels reach."""
    if name == "min":
        return float(cos.min())
    if name == "mean":
        return float(cos.mean())
    if name in _QUANTILES:
        return float(torch.quantile(cos, _QUANTILES[name], interpolation="lower"))
    raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}")


def all_statistics(cos: torch.Tensor) -> dict[str, float]:
    """Every statistic, for honest reports."""
    return {name: statistic(cos, name) for name in STATISTICS}
