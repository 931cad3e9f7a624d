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


def select(w: torch.Tensor, rule: OutlierConfig, budget: float) -> torch.Tensor:
    """Outlier positions under a cap of `budget` * numel, largest deviations first.

    -> positions: [n] int64, flat row*cols+col, strictly increasing.
    """
    cap = int(budget * w.numel())
    if cap == 0:
        return torch.empty(0, dtype=torch.int64)
    pos, dev = sigma_candidates(w, rule.k)
    if pos.numel() > cap:
        keep = torch.sort(dev, descending=True, stable=True).indices[:cap]
        pos = torch.sort(pos[keep]).values
    return pos
