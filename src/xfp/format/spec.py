"""The one table of the XFP layouts: tensor names, dtypes, shapes and exact byte counts.

The writer, the loader's validation, the runtime's buffers, the reports and the H-Process all use this
module, so that "honest bits" means one thing everywhere: 8 * (every stored byte of a matrix) / (weights
in it). See docs/FORMAT.md, which this module implements.

Two modes share one interface (`Layout`): `V2Layout` (one codebook per output channel) and `V2aLayout`
(groups of G weights with a scale and an offset each, coded as uint8 into per-matrix float16 tables,
indexing a per-matrix library of L codebooks; plus hot input columns kept apart in int8).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from xfp.config import FORMAT_VERSION, MAX_LIBRARY, SUPPORTED_BITS

MODE_V2 = 2
"""Value of meta[0] for mode V2 (one codebook per output channel)."""

MODE_V2A = 3
"""Value of meta[0] for mode V2a (per-group scale and offset, a library of L shared codebooks)."""

MODE_IDS = {"v2": MODE_V2, "v2a": MODE_V2A}
"""Mode name (as in QuantConfig.mode and quantization_config.matrices) -> meta[0]."""

MODE_NAMES = {v: k for k, v in MODE_IDS.items()}

PARTS = ("codes", "codebook", "outlier_pos", "outlier_val", "meta")
"""Suffixes of the tensors that store one V2 matrix, in the order they are written."""

V2A_PARTS = ("codes", "library", "scale", "scale_table", "offset", "offset_table", "ids", "outlier_pos", "outlier_val",
             "kept_cols", "kept_val", "kept_scale", "meta")
"""Suffixes of the tensors that store one V2a matrix, in the order they are written."""

ALL_PARTS = tuple(dict.fromkeys(PARTS + V2A_PARTS))
"""Every part suffix of any mode: a tensor `BASE.xfp_<part>` belongs to a quantized matrix."""

META_FIELDS = ("mode", "rows", "cols", "bits")
"""The int32 entries of a V2 `meta` tensor, in order."""

V2A_META_FIELDS = ("mode", "rows", "cols", "bits", "group", "library", "kept")
"""The int32 entries of a V2a `meta` tensor, in order."""

META_FIELDS_BY_MODE = {MODE_V2: META_FIELDS, MODE_V2A: V2A_META_FIELDS}

FILE_METADATA_KEY = "xfp"
"""The one header-metadata key of an XFP file: a JSON object {"format_version": 3, "matrices": [names]}.
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
    if part not in ALL_PARTS:
        raise ValueError(f"unknown part {part!r}; parts are {ALL_PARTS}")
    return f"{base_name(weight_name)}.xfp_{part}"


def row_bytes(cols: int, bits: int) -> int:
    """Bytes of one packed row: every row starts on a byte boundary."""
    return math.ceil(cols * bits / 8)


def n_groups(cols: int, group: int) -> int:
    """Groups per row of a V2a matrix: ceil(cols / group); the last one is ragged when group does not divide cols."""
    return -(-cols // group)


SCALE_TABLE = 256
"""Entries of a V2a matrix's scale table and of its offset table (a group's code is one uint8)."""


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Layout:
    """What every mode's layout offers: the stored tensors (exact dtypes and shapes), their bytes, honest bits.

    Subclasses are frozen dataclasses with at least `rows`, `cols`, `bits`, `n_outliers`, and define
    `mode` (the name), `mode_id` (meta[0]), `parts`, `tensors()` and `meta()`.
    """

    rows: int
    cols: int
    bits: int
    n_outliers: int
    mode: str
    mode_id: int
    parts: tuple[str, ...]

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """part -> (dtype, shape), exactly as stored, in `parts` order."""
        raise NotImplementedError

    def meta(self) -> torch.Tensor:
        """The `meta` tensor: int32 [len(fields)]."""
        raise NotImplementedError

    def entry(self) -> dict[str, Any]:
        """What sizes this matrix's buffers before its data is read (quantization_config.matrices[name],
        without "class"): {"mode", "bits", "outliers"} plus the mode's own fields."""
        raise NotImplementedError

    def _check_common(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"matrix shape must be positive, got {self.rows}x{self.cols}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not 0 <= self.n_outliers <= self.rows * self.cols:
            raise ValueError(f"n_outliers must be in [0, {self.rows * self.cols}], got {self.n_outliers}")

    @property
    def entries(self) -> int:
        """Entries of one codebook: 2**bits."""
        return 1 << self.bits

    def nbytes(self) -> dict[str, int]:
        """part -> stored bytes."""
        return {part: math.prod(shape) * _element_size(dtype) for part, (dtype, shape) in self.tensors().items()}

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes().values())

    @property
    def weights(self) -> int:
        return self.rows * self.cols

    @property
    def honest_bits(self) -> float:
        """Every stored byte (indices, codebooks, scales, offsets, ids, outliers, metadata) per weight."""
        return 8.0 * self.total_bytes / self.weights

    @property
    def index_bits(self) -> float:
        """Index bits only, as the published method reports its 'effective bits' (labelled as such)."""
        return float(self.bits)


@dataclass(frozen=True)
class V2Layout(Layout):
    """Shapes, dtypes and sizes of one V2 matrix of `rows x cols` weights at `bits` with `n_outliers`."""

    rows: int
    cols: int
    bits: int
    n_outliers: int

    mode = "v2"
    mode_id = MODE_V2
    parts = PARTS

    def __post_init__(self) -> None:
        self._check_common()

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {
            "codes": (torch.uint8, (self.rows, row_bytes(self.cols, self.bits))),
            "codebook": (torch.float16, (self.rows, self.entries)),
            "outlier_pos": (torch.int32, (self.n_outliers,)),
            "outlier_val": (torch.float16, (self.n_outliers,)),
            "meta": (torch.int32, (len(META_FIELDS),)),
        }

    def meta(self) -> torch.Tensor:
        """meta: [4] int32 = (mode, rows, cols, bits)."""
        return torch.tensor([MODE_V2, self.rows, self.cols, self.bits], dtype=torch.int32)

    def entry(self) -> dict[str, Any]:
        return {"mode": self.mode, "bits": self.bits, "outliers": self.n_outliers}


@dataclass(frozen=True)
class V2aLayout(Layout):
    """Shapes, dtypes and sizes of one V2a matrix: `rows x cols` weights at `bits`, groups of `group`
    weights along each row (the last one ragged if `group` does not divide `cols`), a library of `library`
    codebooks of 2**bits entries, `n_outliers` sparse outliers and `kept` whole input columns stored apart
    as int8 with one float16 scale per column. The `ids` part is [rows, 0] (no bytes) when library == 1.
    """

    rows: int
    cols: int
    bits: int
    n_outliers: int
    group: int
    library: int
    kept: int = 0

    mode = "v2a"
    mode_id = MODE_V2A
    parts = V2A_PARTS

    def __post_init__(self) -> None:
        self._check_common()
        if type(self.group) is not int or self.group < 1:
            raise ValueError(f"group must be an integer >= 1, got {self.group!r}")
        if type(self.library) is not int or not 1 <= self.library <= MAX_LIBRARY:
            raise ValueError(f"library must be an integer in [1, {MAX_LIBRARY}], got {self.library!r}")
        if type(self.kept) is not int or not 0 <= self.kept <= self.cols:
            raise ValueError(f"kept columns must be an integer in [0, {self.cols}], got {self.kept!r}")

    @property
    def groups(self) -> int:
        """Groups per row: ceil(cols / group)."""
        return n_groups(self.cols, self.group)

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {
            "codes": (torch.uint8, (self.rows, row_bytes(self.cols, self.bits))),
            "library": (torch.float16, (self.library, self.entries)),
            "scale": (torch.uint8, (self.rows, self.groups)),
            "scale_table": (torch.float16, (SCALE_TABLE,)),
            "offset": (torch.uint8, (self.rows, self.groups)),
            "offset_table": (torch.float16, (SCALE_TABLE,)),
            "ids": (torch.uint8, (self.rows, self.groups if self.library > 1 else 0)),
            "outlier_pos": (torch.int32, (self.n_outliers,)),
            "outlier_val": (torch.float16, (self.n_outliers,)),
            "kept_cols": (torch.int32, (self.kept,)),
            "kept_val": (torch.int8, (self.rows, self.kept)),
            "kept_scale": (torch.float16, (self.kept,)),
            "meta": (torch.int32, (len(V2A_META_FIELDS),)),
        }

    def meta(self) -> torch.Tensor:
        """meta: [7] int32 = (mode, rows, cols, bits, group, library, kept)."""
        return torch.tensor([MODE_V2A, self.rows, self.cols, self.bits, self.group, self.library, self.kept],
                            dtype=torch.int32)

    def entry(self) -> dict[str, Any]:
        return {"mode": self.mode, "bits": self.bits, "outliers": self.n_outliers, "group": self.group,
                "library": self.library, "kept": self.kept}


def make_layout(mode: str, rows: int, cols: int, bits: int, n_outliers: int, *, group: int | None = None,
                library: int | None = None, kept: int | None = None) -> Layout:
    """The layout of a matrix in mode "v2" or "v2a" (group and library: v2a only, required there)."""
    if mode == "v2":
        if group is not None or library is not None or kept:
            raise ValueError("group, library and kept columns apply to mode 'v2a' only")
        return V2Layout(rows, cols, bits, n_outliers)
    if mode == "v2a":
        if group is None or library is None:
            raise ValueError("mode 'v2a' needs a group size and a library size")
        return V2aLayout(rows, cols, bits, n_outliers, group, library, kept or 0)
    raise ValueError(f"mode must be one of {tuple(MODE_IDS)}, got {mode!r}")


def dense_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor kept as is."""
    return math.prod(shape) * _element_size(dtype)


__all__ = [
    "ALL_PARTS",
    "FORMAT_VERSION",
    "Layout",
    "META_FIELDS",
    "META_FIELDS_BY_MODE",
    "MODE_IDS",
    "MODE_NAMES",
    "MODE_V2",
    "MODE_V2A",
    "PARTS",
    "SCALE_TABLE",
    "V2A_META_FIELDS",
    "V2A_PARTS",
    "V2Layout",
    "V2aLayout",
    "base_name",
    "dense_bytes",
    "make_layout",
    "n_groups",
    "row_bytes",
    "tensor_name",
]
