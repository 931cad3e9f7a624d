"""Typed, self-checking configuration of the quantizer.

Everything that changes what gets written is here, frozen, and validated on construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

FORMAT_VERSION = 1
"""Version of the on-disk layout described in docs/FORMAT.md."""

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
"""Index widths the packer and decoder support (2^b codebook entries)."""

STATISTICS = ("min", "p1", "p5", "median", "mean")
"""Per-output-channel cosine statistics a floor may be judged by."""

Statistic = Literal["min", "p1", "p5", "median", "mean"]


@dataclass(frozen=True)
class OutlierConfig:
    """Which weights leave the codebook and are stored exactly as fp16.

    rule "sigma": candidates are the weights with |w - mean| > k * std over the whole matrix.
    budgets: the caps (fractions of the matrix's elements) that auto-select may try; under a cap the
    largest deviations are kept first. A budget of 0 stores no outliers.
    """

    rule: Literal["sigma"] = "sigma"
    k: float = 4.0
    budgets: tuple[float, ...] = (0.0, 0.02)

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
    bits: candidate index widths, tried from the cheapest honest size upwards.
    escalation_bits: wider widths tried only when no width in `bits` meets the floor.
    """

    floor_strict: float = 0.99
    floor_lazy: float = 0.97
    statistic: Statistic = "p1"
    mode: Literal["v2"] = "v2"
    bits: tuple[int, ...] = (2, 3, 4)
    escalation_bits: tuple[int, ...] = (5, 6, 8)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    lloyd_iterations: int = 16

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
        if self.mode != "v2":
            raise ValueError(f"mode must be 'v2', got {self.mode!r}")
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"], d["escalation_bits"] = list(self.bits), list(self.escalation_bits)
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
        for key in ("bits", "escalation_bits"):
            if key in d:
                d[key] = tuple(d[key])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown XFP config keys: {sorted(unknown)}")
        return cls(outliers=outliers, **d)
