"""Scoring token windows: every model's next-token NLL and, against a reference (the source), the mean
KL(reference || model) of the next-token distributions and top-1 agreement, in one pass.

One pass means: window by window, the reference runs once and every candidate runs right after it on the
same input, so nothing per-window has to be kept (a full [positions, vocab] log-prob table is 100 MB per
window for SmolLM2, 535 MB for Gemma 3). Models are given as `activate` callables that return the module
to run; `xfp compare` uses this to swap each method's weights into one shared model.

Everything is float32 on CPU, greedy and unsampled; the windows are fixed by `token_windows`, so two runs
give the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from xfp.evaluate.perplexity import window_input

Activate = Callable[[], torch.nn.Module]
"""Returns the model to run now (e.g. after swapping a method's weights in)."""

KL_CHUNK = 128
"""Positions per slice when computing KL, to bound the [positions, vocab] temporaries."""


@dataclass
class Scores:
    """Sums over the scored positions of one model; the means are properties.

    kl_sum and top1_hits are None when there was no reference.
    """

    name: str
    nll_sum: float = 0.0
    tokens: int = 0
    windows: int = 0
    kl_sum: float | None = None
    top1_hits: int | None = None
    seconds: float = 0.0

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token, nats."""
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")

    @property
    def kl(self) -> float | None:
        """Mean KL(reference || model) per scored position, nats."""
        return None if self.kl_sum is None or not self.tokens else self.kl_sum / self.tokens

    @property
    def top1(self) -> float | None:
        """Fraction of scored positions where the model's argmax equals the reference's."""
        return None if self.top1_hits is None or not self.tokens else self.top1_hits / self.tokens

    def sums(self) -> list:
        """[nll_sum, tokens, windows, kl_sum, top1_hits, seconds]: what `from_sums` rebuilds (journals)."""
        return [self.nll_sum, self.tokens, self.windows, self.kl_sum, self.top1_hits, self.seconds]

    @classmethod
    def from_sums(cls, name: str, sums: list) -> "Scores":
        return cls(name, *sums)

    def add(self, other: "Scores") -> None:
        """Accumulate another set of windows scored for the same model."""
        self.nll_sum += other.nll_sum
        self.tokens += other.tokens
        self.windows += other.windows
        self.seconds += other.seconds
        if other.kl_sum is not None:
            self.kl_sum = (self.kl_sum or 0.0) + other.kl_sum
            self.top1_hits = (self.top1_hits or 0) + other.top1_hits

    def to_dict(self) -> dict:
        return {"name": self.name, "ppl": self.ppl, "nll": self.nll, "kl": self.kl, "top1": self.top1,
                "tokens": self.tokens, "windows": self.windows, "seconds": self.seconds}


def token_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logp: [n, vocab] log-probabilities, targets: [n] int64 -> [n] float64 negative log-likelihoods."""
    return -logp.gather(1, targets.unsqueeze(1)).squeeze(1).double()


def kl_divergence(logp_p: torch.Tensor, logp_q: torch.Tensor, chunk: int = KL_CHUNK) -> torch.Tensor:
    """logp_p, logp_q: [n, vocab] log-probabilities -> [n] float64 KL(p || q) = sum_v p_v (log p_v - log q_v).

    Terms with p_v == 0 count 0 (the limit), so an underflowed probability never makes a NaN.
    """
    if logp_p.shape != logp_q.shape:
        raise ValueError(f"KL needs equal shapes, got {tuple(logp_p.shape)} and {tuple(logp_q.shape)}")
    out = torch.empty(logp_p.shape[0], dtype=torch.float64)
    for i in range(0, logp_p.shape[0], chunk):
        lp, lq = logp_p[i:i + chunk], logp_q[i:i + chunk]
        p = lp.exp()
        terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=p.dtype))
        out[i:i + chunk] = terms.double().sum(-1)
    return out


def top1_agreement(scores_p: torch.Tensor, scores_q: torch.Tensor) -> torch.Tensor:
    """[n, vocab] logits or log-probs of two models -> [n] bool: same argmax (first index on ties)."""
    return scores_p.argmax(-1) == scores_q.argmax(-1)


def _scored_logp(model: torch.nn.Module, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[hi - lo, vocab] float32 log-probabilities predicting x[0, lo:hi]."""
    logits = model(x).logits[0, lo - 1:hi - 1]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def score_windows(ids: list[int], windows: list[tuple[int, int, int]], candidates: Mapping[str, Activate],
                  reference: Activate | None = None, *, reference_name: str = "source", bos_id: int | None = None,
                  progress: bool = True, desc: str = "scoring") -> dict[str, Scores]:
    """Score every candidate (and the reference) on `windows` of `ids` (see `token_windows`).

    Returns {name: Scores}, the reference first when given. With a reference, each candidate also gets
    KL(reference || candidate) and top-1 agreement over the same positions.
    """
    if reference is not None and reference_name in candidates:
        raise ValueError(f"a candidate is named like the reference ({reference_name!r})")
    offset = 0 if bos_id is None else 1
    names = ([reference_name] if reference is not None else []) + list(candidates)
    results = {name: Scores(name) for name in names}
    if reference is not None:
        for name in candidates:
            results[name].kl_sum, results[name].top1_hits = 0.0, 0
    bar = tqdm(total=len(windows) * len(names), desc=desc, disable=not progress, unit="pass")
    for start, end, first in windows:
        x = window_input(ids, start, end, bos_id)
        lo, hi = first - start + offset, end - start + offset  # scored positions of x
        targets = x[0, lo:hi]
        ref_logp = None
        for name in names:
            began = time.perf_counter()
            model = (reference if name == reference_name and reference is not None else candidates[name])()
            logp = _scored_logp(model, x, lo, hi)
            r = results[name]
            r.nll_sum += float(token_nll(logp, targets).sum())
            r.tokens += targets.numel()
            r.windows += 1
            if name == reference_name and reference is not None:
                ref_logp = logp
            elif ref_logp is not None:
                r.kl_sum += float(kl_divergence(ref_logp, logp).sum())
                r.top1_hits += int(top1_agreement(ref_logp, logp).sum())
            del logp
            r.seconds += time.perf_counter() - began
            bar.update(1)
    bar.close()
    return results
