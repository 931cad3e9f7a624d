"""Writing a plan as a normal XFP folder: each matrix's chosen candidate is pinned by a one-candidate
QuantConfig (one width, one group size, one outlier cap) handed to `xfp.pipeline.quantize_model` as a
per-tensor override, so auto-select screens exactly that candidate and stores it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xfp.config import QuantConfig
from xfp.fit.search import Plan
from xfp.fit.table import Candidate, Table


def pinned_config(base: QuantConfig, c: Candidate, statistic: str) -> QuantConfig:
    """A config whose only candidate is `c`; its floors are the candidate's own statistic, so the stored
    matrix reports it as met (the plan, not a floor, decided it)."""
    floor = c.stats[statistic]
    return dataclasses.replace(base, floor_strict=floor, floor_lazy=floor, bits=(c.bits,), escalation_bits=(),
                               group_size=(c.group,),
                               outliers=dataclasses.replace(base.outliers, budgets=(c.budget,)))


def overrides(table: Table, plan: Plan) -> dict[str, QuantConfig]:
    return {m.name: pinned_config(table.config, m.candidates[i], table.statistic)
            for m, i in zip(table.matrices, plan.choice)}


def base_config(table: Table, plan: Plan) -> QuantConfig:
    """The folder-level config: the table's, with the plan's floor pair."""
    return dataclasses.replace(table.config, floor_strict=plan.floors.strict,
                               floor_lazy=min(plan.floors.lazy, plan.floors.strict))


def write_plan(src: str | Path, out: str | Path, table: Table, plan: Plan, *, force: bool = True,
               progress: bool = False) -> dict:
    """Quantize `src` into `out` following `plan`; returns the pipeline's report."""
    from xfp.pipeline import quantize_model

    return quantize_model(src, out, base_config(table, plan), force=force, progress=progress,
                          quantize_embeddings=table.quantize_embeddings, overrides=overrides(table, plan))


__all__ = ["pinned_config", "overrides", "base_config", "write_plan"]
