"""Expert stacks in `xfp.pipeline`: one work unit (one part file) per stack, flattened for the report.

`plan_units` turns the per-tensor decisions into units (`xfp.moe.experts.plan`); `process_stack` quantizes
one stack (`xfp.moe.select.quantize_stack`) into one part holding every expert's 2-D matrix; `flatten`
turns a stack's summary back into one row per stored matrix (each naming its stack), which is what
quantization_config, report.json and `xfp verify` see.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from xfp.classify import Decision, TensorClass
from xfp.config import QuantConfig
from xfp.format import io
from xfp.moe.experts import ExpertStack, MemberLoader, plan
from xfp.moe.select import quantize_stack
from xfp.quantize.hot_columns import HotColumns
from xfp.sources.base import TensorSource


def plan_units(source: TensorSource, decisions: list[Decision]) -> list[Decision | ExpertStack]:
    return plan(decisions, source.tensor_shape)


def hot_inputs(source: TensorSource, units: list[Decision | ExpertStack]) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The matrices `xfp.quantize.hot_columns.find` votes with, and their loader: every quantized tensor,
    and expert 0 of each stack (E copies of one layer's writer would otherwise out-vote the other layers)."""
    names: list[str] = []
    members = {}
    for u in units:
        if isinstance(u, ExpertStack):
            names.append(u.members[0].name)
            members[u.members[0].name] = u.members[0]
        elif u.cls is not TensorClass.KEEP:
            names.append(u.name)
    loader = MemberLoader(source.load)

    def load(name: str) -> torch.Tensor:
        return loader(members[name]) if name in members else source.load(name)

    return names, load


def process_stack(source: TensorSource, index: int, stack: ExpertStack, config: QuantConfig, tensor_path: Path,
                  summary_path: Path, hot: HotColumns | None, histogram: Callable[[torch.Tensor], list[int]]) -> dict:
    """Quantize every expert of `stack` into one part file; return the stack's summary."""
    floor = config.floor_strict if stack.cls is TensorClass.STRICT else config.floor_lazy
    loader = MemberLoader(source.load)
    names = [m.name for m in stack.members]

    def kept_of(name: str, w: torch.Tensor) -> torch.Tensor | None:
        return hot.columns(name, w) if hot is not None else None

    results, record = quantize_stack(names, lambda e: loader(stack.members[e]), floor, config, kept_of)
    experts = []
    for member, result in zip(stack.members, results):
        s = result.summary()
        s.update(index=index, name=member.name, reason=stack.reason, warning=stack.warning,
                 source_dtype=source.tensor_dtype(member.source), source=member.source, expert=member.expert,
                 source_fp16_bytes=2 * math.prod(s["shape"]), stack=stack.name, stack_select=record,
                 cosine_hist=histogram(result.channel_cosines))
        s["class"] = stack.cls.value
        experts.append(s)
    bits = sorted({s["bits"] for s in experts})
    summary = {"index": index, "name": stack.name, "class": stack.cls.value, "reason": stack.reason,
               "bits": f"{bits[0]}" if len(bits) == 1 else f"{bits[0]}-{bits[-1]}", "experts": experts}
    io.save(tensor_path, io.XFPFile(matrices={m.name: r.packed for m, r in zip(stack.members, results)}))
    io.atomic_write(summary_path, lambda tmp: tmp.write_text(json.dumps(summary)))
    return summary


def flatten(summaries: list[dict]) -> list[dict]:
    """Each stack summary replaced by its experts' rows, in order."""
    out = []
    for s in summaries:
        out.extend(s["experts"] if "experts" in s else [s])
    return out


def stack_report(tensors: list[dict]) -> list[dict]:
    """Per stack: experts, the selection record, bits and honest bits, bytes, cosine statistic spread."""
    stacks: dict[str, list[dict]] = {}
    for s in tensors:
        if "stack" in s:
            stacks.setdefault(s["stack"], []).append(s)
    out = []
    for name, rows in stacks.items():
        stat = rows[0]["statistic"]
        weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
        nbytes = sum(r["bytes"] for r in rows)
        chosen = [r["cosine"][stat] for r in rows]
        out.append({
            "name": name, "class": rows[0]["class"], "experts": len(rows), "shape": rows[0]["shape"],
            "select": rows[0]["stack_select"], "floor": rows[0]["floor"], "statistic": stat,
            "bits": {str(b): sum(r["bits"] == b for r in rows) for b in sorted({r["bits"] for r in rows})},
            "bytes": nbytes, "honest_bits": 8 * nbytes / weights,
            "honest_bits_min": min(r["honest_bits"] for r in rows), "honest_bits_max": max(r["honest_bits"] for r in rows),
            "cosine_min_over_experts": min(chosen), "cosine_median_over_experts": sorted(chosen)[len(chosen) // 2],
            "cosine_max_over_experts": max(chosen), "cosine_min": min(r["cosine"]["min"] for r in rows),
            "missed_floor": sum(not r["meets_floor"] for r in rows),
        })
    return out


__all__ = ["flatten", "hot_inputs", "plan_units", "process_stack", "stack_report"]
