"""Calibration-free baselines, with honest sizes from the same byte arithmetic as XFP."""

from __future__ import annotations

import math

import torch


def rtn_asymmetric(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, float]:
    """Round-to-nearest with a per-group fp16 scale and fp16 offset (min), groups along the input dim.

    w: [rows, cols] -> (W_hat: [rows, cols] float32, honest bits/weight). A ragged last group is its own group.
    """
    rows, cols = w.shape
    groups = math.ceil(cols / group)
    pad = groups * group - cols
    x = torch.nn.functional.pad(w.float(), (0, pad), value=float("nan")).reshape(rows, groups, group)
    lo = torch.nan_to_num(x, nan=float("inf")).amin(-1, keepdim=True)
    hi = torch.nan_to_num(x, nan=float("-inf")).amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).half().float()
    lo = lo.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((x - lo) / safe), 0, levels)
    w_hat = (q * scale + lo).reshape(rows, groups * group)[:, :cols]
    stored_bytes = rows * math.ceil(cols * bits / 8) + rows * groups * 2 * 2
    return w_hat, 8.0 * stored_bytes / (rows * cols)
