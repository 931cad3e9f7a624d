"""The H-Process measurement table: for every matrix to quantize, each candidate configuration with its
honest bytes, its cosine statistics and a quality estimate, measured once and cached on disk.

Per matrix the candidates are those auto-select screens (`xfp.quantize.autoselect.measure_candidates`),
in its order, up to the one it would pick at the operator floor of the matrix's class: everything the
search may choose is cheaper or equal. The quality estimate is the relative squared error
||W - W_hat||^2 / ||W||^2 of the screened reconstruction.

Cache: one JSON file per matrix under `cache_dir/<key>/`, written atomically as soon as it is measured, so
an interrupted measurement resumes where it stopped. The key covers the source fingerprint, every config
field that changes a candidate (not the floors), and the hot columns. A cached matrix is reused when it
was measured up to a floor at least as high as the one asked now (or holds every candidate).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xfp.classify import TensorClass, classify
from xfp.config import QuantConfig
from xfp.errors import XFPError
from xfp.format import io
from xfp.format.spec import dense_bytes
from xfp.pipeline.run import hot_columns_of
from xfp.pipeline.worker import KEEP_DTYPES, is_float_label

TABLE_VERSION = 1

HEADER_BYTES_PER_ENTRY = 96
HEADER_BYTES_FIXED = 16384
"""Allowance for the safetensors header in the budget: each stored tensor costs its name plus about 70
bytes of JSON (dtype, shape, offsets), a quantized matrix stores 13 part tensors (`.xfp_codes`, ...) and
is listed once more in the metadata. Measured on SmolLM2 at 38%: 316,184 header bytes for 210 matrices and
62 kept tensors; this allowance gives 397,728 (`header_allowance`), so a plan never under-counts."""


def header_allowance(matrix_names: list[str], kept_names: list[str]) -> int:
    parts = 13 * sum(len(n) + HEADER_BYTES_PER_ENTRY for n in matrix_names) + sum(len(n) + 8 for n in matrix_names)
    return HEADER_BYTES_FIXED + parts + sum(len(n) + HEADER_BYTES_PER_ENTRY for n in kept_names)


@dataclass(frozen=True)
class Candidate:
    """One stored configuration of a matrix: width, group size, outlier count (from cap `budget`), honest
    bytes, cosine statistics of the reconstruction {statistic: value}, relative squared error."""

    bits: int
    group: int
    outliers: int
    budget: float
    bytes: int
    stats: dict
    error: float

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group": self.group, "outliers": self.outliers, "budget": self.budget,
                "bytes": self.bytes, "stats": dict(self.stats), "error": self.error}


@dataclass(frozen=True)
class MatrixTable:
    """The candidates of one matrix, in auto-select order. cls: "strict" or "lazy"; exhausted: every
    candidate was measured (none reached `measured_to`, the floor the measurement stopped at)."""

    name: str
    cls: str
    shape: tuple[int, int]
    candidates: tuple[Candidate, ...]
    measured_to: float
    exhausted: bool

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict:
        return {"name": self.name, "class": self.cls, "shape": list(self.shape), "measured_to": self.measured_to,
                "exhausted": self.exhausted, "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "MatrixTable":
        return cls(d["name"], d["class"], tuple(d["shape"]), tuple(Candidate(**c) for c in d["candidates"]),
                   d["measured_to"], d["exhausted"])


@dataclass(frozen=True)
class Table:
    """Everything the search needs about one source: the matrices, and the bytes that do not depend on the
    plan (kept tensors plus the header allowance). fp16_bytes: the whole source as float16."""

    source: str
    statistic: str
    config: QuantConfig
    quantize_embeddings: bool
    fp16_bytes: int
    kept_bytes: int
    header_bytes: int
    matrices: tuple[MatrixTable, ...]

    @property
    def fixed_bytes(self) -> int:
        """Bytes of the output folder's tensor files that no plan changes: kept tensors and headers."""
        return self.kept_bytes + self.header_bytes

    def to_dict(self) -> dict:
        return {"version": TABLE_VERSION, "source": self.source, "statistic": self.statistic,
                "config": self.config.to_dict(), "quantize_embeddings": self.quantize_embeddings,
                "fp16_bytes": self.fp16_bytes, "kept_bytes": self.kept_bytes, "header_bytes": self.header_bytes,
                "matrices": [m.to_dict() for m in self.matrices]}


def cache_key(fingerprint: str, config: QuantConfig, hot: dict) -> str:
    """A digest of what changes a candidate: the source, the config without its floors, the hot columns."""
    d = config.to_dict()
    d.pop("floor_strict")
    d.pop("floor_lazy")
    blob = json.dumps({"v": TABLE_VERSION, "source": fingerprint, "config": d, "hot": hot}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    from xfp.sources.fetch import cache_dir

    return cache_dir() / "fit-tables"


def measure(src: str | Path, config: QuantConfig, *, quantize_embeddings: bool = False,
            cache_dir: Path | None = None, progress: bool = True) -> Table:
    """Measure (or read from the cache) the table of the source `src` (HF folder or GGUF file)."""
    from xfp.quantize.autoselect import measure_candidates
    from xfp.sources.base import open_source

    if config.mode != "v2a":
        raise XFPError(f"xfp fit measures mode v2a only, got mode {config.mode!r}")
    source = open_source(Path(src))
    model_config = source.config()
    decisions = [classify(n, source.tensor_shape(n), is_float_label(source.tensor_dtype(n)), model_config,
                          quantize_embeddings=quantize_embeddings) for n in source.tensor_names()]
    hot = hot_columns_of(source, decisions, config)
    folder = Path(cache_dir or default_cache_dir()) / cache_key(source.fingerprint(), config, hot.to_dict())
    folder.mkdir(parents=True, exist_ok=True)
    fp16 = kept = 0
    kept_names = []
    matrices = []
    todo = [d for d in decisions if d.cls is not TensorClass.KEEP]
    bar = tqdm(total=len(todo), desc="measure", unit="matrix", disable=not progress, dynamic_ncols=True)
    for d in decisions:
        shape = tuple(source.tensor_shape(d.name))
        fp16 += 2 * math.prod(shape)
        label = source.tensor_dtype(d.name)
        if d.cls is TensorClass.KEEP:
            if is_float_label(label):  # as `xfp.pipeline.worker.process_tensor` keeps it
                kept += dense_bytes(shape, KEEP_DTYPES.get(label, torch.float16))
            else:
                kept += _raw_bytes(source, d.name)
            kept_names.append(d.name)
            continue
        if len(shape) != 2:
            raise XFPError(f"tensor '{d.name}': xfp fit handles 2-D matrices only, got shape {list(shape)}")
        cls = d.cls.value
        floor = config.floor_strict if d.cls is TensorClass.STRICT else config.floor_lazy
        path = folder / (hashlib.sha256(d.name.encode()).hexdigest()[:24] + ".json")
        entry = _read(path)
        if entry is None or entry.name != d.name or (not entry.exhausted and entry.measured_to < floor):
            w = source.load(d.name)
            rows = measure_candidates(w, config, floor, d.name, hot.columns(d.name, w))
            cands = tuple(Candidate(**r) for r in rows)
            exhausted = cands[-1].stats[config.statistic] < floor
            entry = MatrixTable(d.name, cls, shape, cands, floor, exhausted)
            io.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(entry.to_dict())))
        elif entry.cls != cls:
            entry = MatrixTable(entry.name, cls, entry.shape, entry.candidates, entry.measured_to, entry.exhausted)
        matrices.append(entry)
        bar.update(1)
    bar.close()
    header = header_allowance([m.name for m in matrices], kept_names)
    return Table(str(src), config.statistic, config, quantize_embeddings, fp16, kept, header, tuple(matrices))


def _read(path: Path) -> MatrixTable | None:
    try:
        return MatrixTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable (an interrupted write never leaves a partial file): measure again


def _raw_bytes(source, name: str) -> int:
    t = source.load_raw(name)
    return t.numel() * t.element_size()
