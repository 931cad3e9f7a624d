"""Token windows over a text, and perplexity over them, deterministic.

Window arithmetic (`token_windows`): a window covers the text tokens `ids[start:end]`, at most `ctx` of
them, and windows start every `stride` tokens. A window scores only the tokens no earlier window scored.
Without a BOS token the first token of a window has no context and is not scored by it; with a BOS
token (`bos=True`) the model sees `[BOS] + ids[start:end]` (ctx + 1 positions) and every text token of the
window can be scored, the first one predicted from BOS alone. So with `stride == ctx`:
- BOS: every token of the text is scored exactly once;
- no BOS: every token except the first of each window is scored exactly once.
With `stride < ctx` (overlapping windows) every token from the first scorable one on is scored exactly
once, with at least `ctx - stride` tokens of context after the first window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int


def token_windows(ids: list[int] | int, ctx: int, stride: int, max_windows: int | None,
                  bos: bool = False) -> list[tuple[int, int, int]]:
    """(start, end, first scored text position) for each window over `ids` (or a token count).

    ctx: text tokens per window (BOS not counted); stride: distance between window starts;
    max_windows: stop after this many windows (None: cover the whole text).
    """
    n = ids if isinstance(ids, int) else len(ids)
    if ctx < 2 or stride < 1 or stride > ctx:
        raise ValueError(f"need ctx >= 2 and 1 <= stride <= ctx, got ctx={ctx}, stride={stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 (or None for the whole text), got {max_windows}")
    lead = 0 if bos else 1  # tokens at a window's start that it cannot score
    windows: list[tuple[int, int, int]] = []
    scored_until = 0
    start = 0
    while start < n - lead:
        end = min(start + ctx, n)
        windows.append((start, end, max(scored_until, start + lead)))
        scored_until = end
        if end == n or (max_windows is not None and len(windows) >= max_windows):
            break
        start += stride
    return windows


def window_input(ids: list[int], start: int, end: int, bos_id: int | None) -> torch.Tensor:
    """The model input of one window: [1, end - start (+1 with BOS)] int64."""
    head = [] if bos_id is None else [bos_id]
    return torch.tensor([head + list(ids[start:end])], dtype=torch.long)


def perplexity(model, ids: list[int], ctx: int = 512, stride: int = 512, max_windows: int | None = None,
               progress: bool = True, bos_id: int | None = None) -> Perplexity:
    """ids: the tokenized text, without special tokens -> perplexity over `token_windows`.

    bos_id: prepended to every window when given (see `xfp.evaluate.models.bos_to_prepend`).
    """
    from xfp.evaluate.scoring import score_windows

    windows = token_windows(ids, ctx, stride, max_windows, bos=bos_id is not None)
    scores = score_windows(ids, windows, {"model": lambda: model}, bos_id=bos_id, progress=progress)["model"]
    return Perplexity(scores.ppl, scores.nll, scores.tokens, scores.windows)


__all__ = ["Perplexity", "token_windows", "window_input", "perplexity"]
