"""The one table of the V2 layout: tensor names, dtypes, shapes and exact byte counts.

The writer, the loader's validation, the reports and (later) the H-Process all use this module, so that
"honest bits" means one thing everywhere: 8 * (every stored byte of a matrix) / (weights in it).
See docs/FORMAT.md, which this module implements.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from xfp.config import FORMAT_VERSION, SUPPORTED_BITS

MODE_V2 = 2
"""Value of meta[0] for mode V2 (one codebook per output channel)."""

PARTS = ("codes", "codebook", "outlier_pos", "outlier_val", "meta")
"""Suffixes of the tensors that store one quantized matrix, in the order they are written."""

META_FIELDS = ("mode", "rows", "cols", "bits")
"""The int32 entries of the `meta` tensor, in order."""

FILE_METADATA_KEY = "xfp"
"""The one header-metadata key of an XFP file: a JSON object {"format_version": 1, "matrices": [names]}.
One key, because safetensors writes header metadata in no fixed order and XFP files must be byte-stable."""


def file_metadata(matrix_names: list[str], version: int = FORMAT_VERSION) -> dict[str, str]:
    """The header metadata of an XFP file listing `matrix_names`."""
    return {FILE_METADATA_KEY: json.dumps({"format_version": version, "matrices": sorted(matrix_names)},
                                          sort_keys=True)}


def base_name(weight_name: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj`; other names are kept whole."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def tensor_name(weight_name: str, part: str) -> str:
    """Stored name of one part of a quantized matrix, e.g. `...up_proj.xfp_codes`."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; parts are {PARTS}")
    return f"{base_name(weight_name)}.xfp_{part}"


def row_bytes(cols: int, bits: int) -> int:
    """Bytes of one packed row: every row starts on a byte boundary."""
    return math.ceil(cols * bits / 8)


@dataclass(frozen=True)
class V2Layout:
    """Shapes, dtypes and sizes of one V2 matrix of `rows x cols` weights at `bits` with `n_outliers`."""

    rows: int
    cols: int
    bits: int
    n_outliers: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"matrix shape must be positive, got {self.rows}x{self.cols}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not 0 <= self.n_outliers <= self.rows * self.cols:
            raise ValueError(f"n_outliers must be in [0, {self.rows * self.cols}], got {self.n_outliers}")

    @property
    def entries(self) -> int:
        return 1 << self.bits

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """part -> (dtype, shape), exactly as stored."""
        return {
            "codes": (torch.uint8, (self.rows, row_bytes(self.cols, self.bits))),
            "codebook": (torch.float16, (self.rows, self.entries)),
            "outlier_pos": (torch.int32, (self.n_outliers,)),
            "outlier_val": (torch.float16, (self.n_outliers,)),
            "meta": (torch.int32, (len(META_FIELDS),)),
        }

    def nbytes(self) -> dict[str, int]:
        """part -> stored bytes."""
        return {
            part: math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            for part, (dtype, shape) in self.tensors().items()
        }

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes().values())

    @property
    def weights(self) -> int:
        return self.rows * self.cols

    @property
    def honest_bits(self) -> float:
        """Every stored byte: indices, codebooks, outlier values and positions, metadata."""
        return 8.0 * self.total_bytes / self.weights

    @property
    def index_bits(self) -> float:
        """Index bits only, as the published method reports its 'effective bits' (labelled as such)."""
        return float(self.bits)

    def meta(self) -> torch.Tensor:
        """meta: [4] int32 = (mode, rows, cols, bits)."""
        return torch.tensor([MODE_V2, self.rows, self.cols, self.bits], dtype=torch.int32)


def dense_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor kept as is."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


__all__ = [
    "FORMAT_VERSION",
    "MODE_V2",
    "PARTS",
    "META_FIELDS",
    "V2Layout",
    "base_name",
    "tensor_name",
    "row_bytes",
    "dense_bytes",
]
