"""Hot input columns: the few input channels whose errors the model amplifies, found from the weights alone.

Transformers carry "massive activations": a handful of residual-stream dimensions (and of MLP intermediate
neurons) whose activations are hundreds of times larger than the rest. An error in a weight that reads such
a channel is multiplied by it, so those columns decide much of the quantized model's quality while plain
per-row statistics (cosine, MSE) barely see them. Measured on SmolLM2-135M: one down_proj input neuron has
E[x^2] ~ 7e5 times the median, and quantizing its column like the others costs more KL than the rest of
the matrix together (docs/RESULTS.md, ablation).

They can be found without data, because the weights that *create* them are extreme:
- residual hot dimensions: the rows of the matrices that write into the residual stream (`WRITERS`:
  o_proj, down_proj and their aliases) where some weight exceeds `ratio` times the matrix's typical group
  absmax (the median over groups of 64 of max |w|), counted over all writers; a dimension flagged by at
  least `MIN_WRITERS` writers is hot. They become kept columns of every matrix that reads the residual
  stream (input size = the writers' output size: q/k/v, gate/up...).
- hot inputs of a writer: the columns of a writer matrix holding such an extreme weight (the neuron or head
  channel that fires massively).
Kept columns are stored apart in int8 with a float16 scale per column (mode V2a, docs/FORMAT.md), at most `MAX_FRACTION` of a matrix's
columns (the most extreme first).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

WRITERS = re.compile(r"\.(?:o_proj|down_proj|out_proj|dense_4h_to_h|c_proj|fc2|w2|wo)\.weight$")
"""Matrices that write into the residual stream (their output dimension is the hidden size)."""

MIN_WRITERS = 2
"""Writers that must flag a residual dimension for it to be hot (one extreme row alone is a weight
outlier, not a channel)."""

MAX_FRACTION = 0.02
"""At most this fraction of a matrix's columns are kept (rounded down, at least 1 when any is hot)."""

TYPICAL_GROUP = 64


def typical_absmax(w: torch.Tensor) -> float:
    """Median over groups of TYPICAL_GROUP weights along each row of max |w| (the last group ragged)."""
    rows, cols = w.shape
    pad = (-cols) % TYPICAL_GROUP
    a = torch.nn.functional.pad(w.abs().float(), (0, pad)).reshape(rows, -1, TYPICAL_GROUP).amax(-1)
    return float(a.median())


def extreme_rows(w: torch.Tensor, ratio: float) -> list[int]:
    """Rows of w holding a weight > ratio * typical_absmax(w)."""
    return torch.nonzero(w.abs().amax(1) > ratio * typical_absmax(w)).reshape(-1).tolist()


def extreme_columns(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """[k] int64: columns holding a weight > ratio * typical_absmax(w), most extreme first."""
    peak = w.abs().amax(0)
    cols = torch.nonzero(peak > ratio * typical_absmax(w)).reshape(-1)
    return cols[torch.sort(peak[cols], descending=True, stable=True).indices]


@dataclass
class HotColumns:
    """What `find` learned about a model: the hot residual dimensions and the hidden size they index.

    ratio: the threshold used (0 disables keeping columns); hidden: the writers' output size, or None.
    """

    ratio: float
    hidden: int | None = None
    residual: list[int] = field(default_factory=list)

    def columns(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """[m] int64 ascending: the columns of matrix `name` (weights w: [rows, cols]) to keep in float16."""
        if self.ratio <= 0 or w.dim() != 2:
            return torch.zeros(0, dtype=torch.int64)
        cols = w.shape[1]
        cap = max(1, int(MAX_FRACTION * cols))
        if WRITERS.search(name):
            picked = extreme_columns(w, self.ratio)[:cap]
        elif self.hidden is not None and cols == self.hidden and self.residual:
            peak = w.abs().amax(0)
            dims = torch.tensor(self.residual, dtype=torch.int64)
            picked = dims[torch.sort(peak[dims], descending=True, stable=True).indices][:cap]
        else:
            return torch.zeros(0, dtype=torch.int64)
        return torch.sort(picked).values

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "hidden": self.hidden, "residual": list(self.residual)}


def find(names: Iterable[str], load: Callable[[str], torch.Tensor], ratio: float) -> HotColumns:
    """Scan the writer matrices among `names` (2-D ones; `load(name)` gives float32) -> HotColumns."""
    if ratio <= 0:
        return HotColumns(ratio)
    votes: Counter[int] = Counter()
    sizes: Counter[int] = Counter()
    for name in names:
        if not WRITERS.search(name):
            continue
        w = load(name)
        if w.dim() != 2:
            continue
        sizes[w.shape[0]] += 1
        votes.update(extreme_rows(w, ratio))
    if not sizes:
        return HotColumns(ratio)
    hidden = sizes.most_common(1)[0][0]
    residual = sorted(d for d, n in votes.items() if n >= MIN_WRITERS and d < hidden)
    return HotColumns(ratio, hidden, residual)


__all__ = ["HotColumns", "MAX_FRACTION", "MIN_WRITERS", "WRITERS", "extreme_columns", "extreme_rows", "find",
           "typical_absmax"]
