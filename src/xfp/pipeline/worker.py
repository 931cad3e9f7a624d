"""One unit of work: read one source tensor, quantize or keep it, write it as a part file.

Pure function of (source, tensor name, decision, config): the same inputs give the same bytes, which is
what lets an interrupted run resume and still produce the files of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from xfp.classify import Decision, TensorClass
from xfp.config import QuantConfig
from xfp.format import io
from xfp.format.spec import dense_bytes
from xfp.moe.experts import ExpertStack
from xfp.moe.pipeline import process_stack
from xfp.quantize.autoselect import quantize_matrix
from xfp.quantize.hot_columns import HotColumns
from xfp.sources.base import TensorSource

KEEP_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""A kept float tensor stays in its stored dtype; one stored in a GGUF block type is kept as float16."""

COSINE_HIST_EDGES = [0.0] + [10.0 ** (e / 4) for e in range(-28, 1)]
"""Bin edges of 1 - cosine (1e-7 .. 1, four bins a decade), for the per-class distribution plot."""


NON_FLOAT_LABELS = frozenset({"BOOL", "U8", "U16", "U32", "U64", "I8", "I16", "I32", "I64"})
"""Storage labels of integer/bool data (safetensors and GGUF); every other label (F32, BF16, Q4_K,
IQ4_NL...) holds real numbers."""


def is_float_label(label: str) -> bool:
    return label.upper() not in NON_FLOAT_LABELS


def part_paths(workdir: Path, index: int) -> tuple[Path, Path]:
    """(tensor file, summary file) of the index-th tensor; the summary is written last, so its presence
    means the part is complete."""
    return workdir / f"{index:05d}.safetensors", workdir / f"{index:05d}.json"


def cosine_histogram(cos: torch.Tensor) -> list[int]:
    gap = (1.0 - cos.double()).clamp_min(0.0)
    edges = torch.tensor(COSINE_HIST_EDGES[1:-1], dtype=torch.float64)
    bins = torch.bucketize(gap, edges, right=True)
    return torch.bincount(bins, minlength=len(COSINE_HIST_EDGES) - 1).tolist()


def process_tensor(source: TensorSource, index: int, decision: Decision, config: QuantConfig,
                   workdir: Path, hot: HotColumns | None = None) -> dict:
    """Quantize or keep one tensor; write its part file and summary; return the summary.

    hot: the model's hot input columns (kept whole in float16 in mode v2a), or None for none."""
    name = decision.name
    tensor_path, summary_path = part_paths(workdir, index)
    if isinstance(decision, ExpertStack):  # routed experts of one projection: one part (xfp.moe)
        return process_stack(source, index, decision, config, tensor_path, summary_path, hot, cosine_histogram)
    label = source.tensor_dtype(name)
    shape = list(source.tensor_shape(name))
    summary = {"index": index, "name": name, "class": decision.cls.value, "reason": decision.reason,
               "warning": decision.warning, "source_dtype": label, "shape": shape,
               "source_fp16_bytes": 2 * math.prod(shape)}
    if decision.cls is TensorClass.KEEP:
        if is_float_label(label):
            tensor = source.load(name).to(KEEP_DTYPES.get(label, torch.float16))
        else:
            tensor = _load_raw(source, name)
        content = io.XFPFile(dense={name: tensor})
        summary.update(stored_dtype=str(tensor.dtype).removeprefix("torch."),
                       bytes=dense_bytes(tuple(tensor.shape), tensor.dtype))
    else:
        floor = config.floor_strict if decision.cls is TensorClass.STRICT else config.floor_lazy
        w = source.load(name)
        kept = hot.columns(name, w) if hot is not None else None
        result = quantize_matrix(w, floor, config, name, kept)
        content = io.XFPFile(matrices={name: result.packed})
        summary.update(result.summary())
        summary["class"] = decision.cls.value
        summary["cosine_hist"] = cosine_histogram(result.channel_cosines)
    io.save(tensor_path, content)
    io.atomic_write(summary_path, lambda tmp: tmp.write_text(json.dumps(summary)))
    return summary


def _load_raw(source: TensorSource, name: str) -> torch.Tensor:
    """Integer/bool tensors are kept bit for bit through the source's raw reader when it has one."""
    raw = getattr(source, "load_raw", None)
    if raw is None:
        from xfp.errors import SourceError

        raise SourceError(f"{source.path}: tensor '{name}' has non-float type {source.tensor_dtype(name)}, "
                          "which XFP cannot carry over")
    return raw(name)


_WORKER_SOURCE: TensorSource | None = None


def init_worker(src: str, threads: int) -> None:
    """Process-pool initializer: each worker opens the source once."""
    global _WORKER_SOURCE
    from xfp.sources.base import open_source

    torch.set_num_threads(threads)
    _WORKER_SOURCE = open_source(src)


def run_in_worker(index: int, decision: Decision, config: QuantConfig, workdir: str,
                  hot: HotColumns | None = None) -> dict:
    assert _WORKER_SOURCE is not None
    return process_tensor(_WORKER_SOURCE, index, decision, config, Path(workdir), hot)
