"""Typed, self-checking configuration of the quantizer.

Everything that changes what gets written is here, frozen, and validated on construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

FORMAT_VERSION = 3
"""Version of the on-disk layout described in docs/FORMAT.md (2: adds mode V2a; 3: V2a scales and offsets
as uint8 codes into per-matrix tables, hot input columns kept apart in int8)."""

READABLE_FORMAT_VERSIONS = (1, 2, 3)
"""Versions this XFP reads: versions 1 and 2 for their mode-V2 matrices, which version 3 stores the same way
(docs/FORMAT.md, "Versioning"); a version-2 V2a matrix is refused."""

MODES = ("v2", "v2a")
"""Storage modes: "v2", one Lloyd codebook per output channel; "v2a", groups of G weights along the input
dimension with their own fp16 scale and offset, indexing a per-matrix library of L shared codebooks."""

Mode = Literal["v2", "v2a"]

MAX_LIBRARY = 256
"""Largest V2a library: a group's library id is one uint8."""

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
"""Index widths the packer and decoder support (2^b codebook entries)."""

STATISTICS = ("min", "p1", "p5", "median", "mean")
"""Per-output-channel cosine statistics a floor may be judged by."""

Statistic = Literal["min", "p1", "p5", "median", "mean"]

EXPERT_SELECT = ("expert", "stack")
"""Auto-select of routed expert stacks: per expert, or one choice per stack from a sample (`xfp.moe.select`)."""

ExpertSelect = Literal["expert", "stack"]


@dataclass(frozen=True)
class OutlierConfig:
    """Which weights leave the codebook and are stored exactly as fp16.

    rule "sigma": candidates are the weights with |w - mean| > k * std over the whole matrix.
    budgets: the caps (fractions of the matrix's elements) that auto-select may try; under a cap the
    largest deviations are kept first. A budget of 0 stores no outliers.
    """

    rule: Literal["sigma"] = "sigma"
    k: float = 4.0
    budgets: tuple[float, ...] = (0.0, 0.003)

    def __post_init__(self) -> None:
        if self.rule != "sigma":
            raise ValueError(f"outlier rule must be 'sigma', got {self.rule!r}")
        if not self.k > 0:
            raise ValueError(f"outlier k must be > 0, got {self.k}")
        if not self.budgets or any(not 0.0 <= f <= 0.5 for f in self.budgets):
            raise ValueError(f"outlier budgets must be fractions in [0, 0.5], got {self.budgets}")


@dataclass(frozen=True)
class QuantConfig:
    """How auto-select quantizes each matrix.

    floor_strict / floor_lazy: lower bounds on the cosine `statistic` of per-output-channel cosine
    similarity (original row vs reconstruction), for the strict class (attention, dense MLP, shared
    experts) and the lazy class (routed experts).
    mode: "v2" (per-channel codebooks) or "v2a" (per-group scale/offset + a library of shared codebooks).
    bits: candidate index widths, tried from the cheapest honest size upwards.
    escalation_bits: wider widths tried only when no width in `bits` meets the floor.
    group_size: (v2a only) candidate group sizes G, weights per group along the input dimension; auto-select
    tries every width x group size x outlier budget, cheapest exact honest size first.
    library_size: (v2a only) L, the number of codebooks in a matrix's library (1 = one codebook per matrix).
    keep_columns: (v2a only) the ratio that marks hot input columns, kept apart in int8
    (`xfp.quantize.hot_columns`); 0 keeps none.
    expert_select: how routed expert stacks (`xfp.moe`) are auto-selected: "expert", each expert on its own;
    "stack", one width and group size for the whole stack, the most expensive choice among `expert_sample`
    evenly spaced experts (the published method), every expert then checked and escalated alone if it misses.
    stack_library: (v2a, expert_select "stack", library_size 1) one codebook per expert stack, fitted on the
    sampled experts and stored with every expert.
    """

    floor_strict: float = 0.99
    floor_lazy: float = 0.97
    statistic: Statistic = "p1"
    mode: Mode = "v2a"
    bits: tuple[int, ...] = (2, 3, 4)
    escalation_bits: tuple[int, ...] = (5, 6, 8)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    lloyd_iterations: int = 16
    group_size: tuple[int, ...] = (64, 128, 256)
    library_size: int = 1
    keep_columns: float = 5.0
    expert_select: ExpertSelect = "expert"
    expert_sample: int = 4
    stack_library: bool = False

    def __post_init__(self) -> None:
        for name in ("floor_strict", "floor_lazy"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a cosine in [-1, 1], got {value}")
        if self.floor_lazy > self.floor_strict:
            raise ValueError(
                f"floor_lazy ({self.floor_lazy}) must not exceed floor_strict ({self.floor_strict})"
            )
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        widths = self.bits + self.escalation_bits
        if not self.bits:
            raise ValueError("bits must name at least one width")
        bad = [b for b in widths if b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"unsupported bit widths {bad}; supported: {SUPPORTED_BITS}")
        if len(set(widths)) != len(widths):
            raise ValueError(f"bit widths repeat: {widths}")
        if self.lloyd_iterations < 1:
            raise ValueError(f"lloyd_iterations must be >= 1, got {self.lloyd_iterations}")
        if not self.group_size or any(type(g) is not int or g < 1 for g in self.group_size):
            raise ValueError(f"group_size must name at least one group size, each an integer >= 1, got {self.group_size}")
        if len(set(self.group_size)) != len(self.group_size):
            raise ValueError(f"group sizes repeat: {self.group_size}")
        if isinstance(self.keep_columns, bool) or not isinstance(self.keep_columns, (int, float)) \
                or not 0 <= self.keep_columns < float("inf"):
            raise ValueError(f"keep_columns must be a ratio >= 0 (0 = none), got {self.keep_columns!r}")
        if type(self.library_size) is not int or not 1 <= self.library_size <= MAX_LIBRARY:
            raise ValueError(f"library_size must be an integer in [1, {MAX_LIBRARY}], got {self.library_size!r}")
        if self.expert_select not in EXPERT_SELECT:
            raise ValueError(f"expert_select must be one of {EXPERT_SELECT}, got {self.expert_select!r}")
        if type(self.expert_sample) is not int or self.expert_sample < 1:
            raise ValueError(f"expert_sample must be an integer >= 1, got {self.expert_sample!r}")
        if type(self.stack_library) is not bool:
            raise ValueError(f"stack_library must be true or false, got {self.stack_library!r}")
        if self.stack_library and (self.expert_select != "stack" or self.mode != "v2a" or self.library_size != 1):
            raise ValueError("stack_library needs expert_select 'stack', mode 'v2a' and library_size 1, got "
                             f"{self.expert_select!r}, {self.mode!r}, {self.library_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"], d["escalation_bits"] = list(self.bits), list(self.escalation_bits)
        d["group_size"] = list(self.group_size)
        d["outliers"]["budgets"] = list(self.outliers.budgets)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        d.pop("format_version", None)
        d.pop("quant_method", None)
        outliers = dict(d.pop("outliers", {}))
        if "budgets" in outliers:
            outliers["budgets"] = tuple(outliers["budgets"])
        outliers = OutlierConfig(**outliers)
        for key in ("bits", "escalation_bits", "group_size"):
            if key in d:
                d[key] = tuple(d[key])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown XFP config keys: {sorted(unknown)}")
        return cls(outliers=outliers, **d)
