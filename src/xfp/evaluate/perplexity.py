"""Perplexity over fixed token windows, deterministic."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int


def token_windows(ids: list[int], ctx: int, stride: int, max_windows: int | None) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) for each window: a window scores only the tokens not scored by
    the one before it, and never its own first token (it has no context)."""
    if ctx < 2 or stride < 1 or stride > ctx:
        raise ValueError(f"need ctx >= 2 and 1 <= stride <= ctx, got ctx={ctx}, stride={stride}")
    windows = []
    scored_until = 1
    start = 0
    while start < len(ids) - 1:
        end = min(start + ctx, len(ids))
        windows.append((start, end, max(scored_until, start + 1)))
        scored_until = end
        if end == len(ids) or (max_windows is not None and len(windows) >= max_windows):
            break
        start += stride
    return windows


@torch.no_grad()
def perplexity(model, ids: list[int], ctx: int = 512, stride: int = 512, max_windows: int | None = None,
               progress: bool = True) -> Perplexity:
    """ids: the tokenized text (the caller decides BOS handling) -> perplexity over the windows."""
    total_nll, total_tokens = 0.0, 0
    windows = token_windows(ids, ctx, stride, max_windows)
    for start, end, first in tqdm(windows, desc="perplexity", disable=not progress, unit="window"):
        x = torch.tensor([ids[start:end]])
        logits = model(x).logits[0].float()
        targets = x[0, first - start:]
        logp = torch.log_softmax(logits[first - start - 1: end - start - 1], dim=-1)
        total_nll -= float(logp.gather(1, targets.unsqueeze(1)).sum())
        total_tokens += targets.numel()
    nll = total_nll / max(total_tokens, 1)
    return Perplexity(math.exp(nll), nll, total_tokens, len(windows))
