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

Models with sandwich norms (Gemma 2/3: `post_attention_layernorm` and `post_feedforward_layernorm` normalise
each block's output before it joins the residual stream) break the first rule: a writer's extreme rows are
normalised away, and the stream's per-dimension energy is set by the post-norm gains instead. For them the
readers' kept columns come from a weights-only estimate of E[x_j^2] at each reader's input
(`sandwich_input_energy`): the scaled embedding's energy plus, per block written before, the square of its
post-norm gain (a normalised output has unit energy per dimension), times the square of the reader's own
pre-norm gain. A reader keeps the columns with the largest estimate times column energy (mean of W[:, j]^2).
Measured on Gemma-3-270M against a one-off E[x^2] trace (never used by the quantizer), the 2% kept this way
carry 25% of q/k/gate's input-weighted error against 3-10% for the first rule. o_proj keeps none there: its
input (attention mixtures of v) has no massive channel (E[x^2] max/median ~33, against 700-14000 elsewhere)
and dropping its kept columns saved 0.017 bits for a KL change of +0.006 at 4 bits and -0.02 at 3 bits
(4 windows, docs/RESULTS.md point 3). down_proj keeps the second rule.
Kept columns are stored apart in int8 with a float16 scale per column (mode V2a, docs/FORMAT.md), at most `MAX_FRACTION` of a matrix's
columns (the most extreme first).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from xfp.classify import family_for

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


SANDWICH_READERS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
                    "gate_proj": "pre_feedforward_layernorm", "up_proj": "pre_feedforward_layernorm"}
"""Sandwich-norm readers (`<block>.self_attn.q_proj` ...) and the norm, in the same block, that feeds them."""

_SANDWICH_BLOCK = re.compile(r"^(.*\.layers\.\d+)\.post_feedforward_layernorm\.weight$")


def sandwich_input_energy(tensor_names: Iterable[str], load: Callable[[str], torch.Tensor],
                          config: dict) -> dict[str, torch.Tensor]:
    """{reader norm name (`model.layers.5.input_layernorm`): [hidden] float64 estimated E[x_j^2] of its output,
    relative to the stream's mean}; empty unless the model has sandwich norms (module docstring)."""
    names = set(tensor_names)
    blocks = sorted((m.group(1) for n in names if (m := _SANDWICH_BLOCK.match(n))),
                    key=lambda b: int(b.rsplit(".", 1)[1]))
    embed = next((n for n in sorted(names) if n.endswith("embed_tokens.weight")), None)
    needed = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")
    if not blocks or embed is None or any(f"{b}.{k}.weight" not in names for b in blocks for k in needed):
        return {}
    offset = 1.0 if family_for(config) == "gemma" else 0.0  # Gemma's RMSNorm multiplies by (1 + weight)

    def gain2(norm: str) -> torch.Tensor:
        return (load(f"{norm}.weight").double().reshape(-1) + offset) ** 2

    emb = load(embed).double()
    stream = (emb * emb).mean(0) * (emb.shape[1] if offset else 1.0)  # Gemma scales embeddings by sqrt(hidden)
    energy = {}
    for b in blocks:
        energy[f"{b}.input_layernorm"] = gain2(f"{b}.input_layernorm") * stream / stream.mean()
        stream = stream + gain2(f"{b}.post_attention_layernorm")
        energy[f"{b}.pre_feedforward_layernorm"] = gain2(f"{b}.pre_feedforward_layernorm") * stream / stream.mean()
        stream = stream + gain2(f"{b}.post_feedforward_layernorm")
    return energy


def _sandwich_norm(name: str) -> str | None:
    """The norm feeding sandwich reader `name`, or None when `name` is no such reader."""
    m = re.match(r"^(.*\.layers\.\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$", name)
    if m is None or m.group(2) not in SANDWICH_READERS:
        return None
    return f"{m.group(1)}.{SANDWICH_READERS[m.group(2)]}"


@dataclass
class HotColumns:
    """What `find` learned about a model: the hot residual dimensions and the hidden size they index.

    ratio: the threshold used (0 disables keeping columns); hidden: the writers' output size, or None;
    reader_energy: sandwich-norm models only, `sandwich_input_energy`.
    """

    ratio: float
    hidden: int | None = None
    residual: list[int] = field(default_factory=list)
    reader_energy: dict[str, torch.Tensor] = field(default_factory=dict)

    def columns(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """[m] int64 ascending: the columns of matrix `name` (weights w: [rows, cols]) to keep in int8."""
        if self.ratio <= 0 or w.dim() != 2:
            return torch.zeros(0, dtype=torch.int64)
        cols = w.shape[1]
        cap = max(1, int(MAX_FRACTION * cols))
        if self.reader_energy:
            norm = _sandwich_norm(name)
            if norm in self.reader_energy and self.reader_energy[norm].numel() == cols:
                score = self.reader_energy[norm] * w.double().square().mean(0)
                picked = torch.sort(score, descending=True, stable=True).indices[:cap]
                return torch.sort(picked).values
            if name.endswith(".o_proj.weight"):
                return torch.zeros(0, dtype=torch.int64)
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
        out = {"ratio": self.ratio, "hidden": self.hidden, "residual": list(self.residual)}
        if self.reader_energy:
            out["sandwich_readers"] = sorted(self.reader_energy)
        return out


def find(names: Iterable[str], load: Callable[[str], torch.Tensor], ratio: float, *,
         tensor_names: Iterable[str] = (), config: dict | None = None) -> HotColumns:
    """Scan the writer matrices among `names` (2-D ones; `load(name)` gives float32) -> HotColumns.

    tensor_names / config: every tensor of the model and its config.json, for the sandwich-norm estimate
    (`sandwich_input_energy`; `load` must then also give the norms and the embedding)."""
    if ratio <= 0:
        return HotColumns(ratio)
    energy = sandwich_input_energy(tensor_names, load, config or {})
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
        return HotColumns(ratio, reader_energy=energy)
    hidden = sizes.most_common(1)[0][0]
    residual = sorted(d for d, n in votes.items() if n >= MIN_WRITERS and d < hidden)
    return HotColumns(ratio, hidden, residual, energy)


__all__ = ["HotColumns", "MAX_FRACTION", "MIN_WRITERS", "SANDWICH_READERS", "WRITERS", "extreme_columns",
           "extreme_rows", "find", "sandwich_input_energy", "typical_absmax"]
