"""Outlier selection: the weights that leave the codebook and are stored exactly as fp16."""

from __future__ import annotations

import torch

from xfp.config import OutlierConfig


def sigma_candidates(w: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [rows, cols] -> (flat positions with |w - mean| > k*std, their deviations), positions ascending."""
    flat = w.reshape(-1).double()
    mean = flat.mean()
    std = flat.std(correction=0)
    dev = (flat - mean).abs()
    pos = torch.nonzero(dev > k * std).reshape(-1)
    return pos, dev[pos]


def select(w: torch.Tensor, rule: OutlierConfig, budget: float, kept_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Outlier positions under a cap of `budget` * numel, largest deviations first; none in `kept_cols`
    (input columns stored whole, which need no outliers).

    -> positions: [n] int64, flat row*cols+col, strictly increasing.
    """
    cap = int(budget * w.numel())
    if cap == 0:
        return torch.empty(0, dtype=torch.int64)
    pos, dev = sigma_candidates(w, rule.k)
    if kept_cols is not None and kept_cols.numel():
        free = ~torch.isin(pos % w.shape[1], kept_cols.long())
        pos, dev = pos[free], dev[free]
    if pos.numel() > cap:
        keep = torch.sort(dev, descending=True, stable=True).indices[:cap]
        pos = torch.sort(pos[keep]).values
    return pos
