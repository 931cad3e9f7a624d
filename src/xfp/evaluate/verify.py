"""Anyone can check the guarantee: per-channel cosines recomputed from the stored tensors and the source."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xfp.errors import XFPError
from xfp.format.reference import PackedV2, decode
from xfp.quantize.stats import all_statistics, row_cosines


@dataclass(frozen=True)
class Verdict:
    """Every cosine statistic of one matrix and whether the floor holds for the chosen statistic."""

    name: str
    floor: float
    statistic: str
    stats: dict[str, float]

    @property
    def holds(self) -> bool:
        return self.stats[self.statistic] >= self.floor


def verify_matrix(name: str, source: torch.Tensor, packed: PackedV2, floor: float, statistic: str) -> Verdict:
    """source: [rows, cols] the original weight; packed: its stored V2 matrix (already validated)."""
    if tuple(source.shape) != (packed.rows, packed.cols):
        raise XFPError(f"tensor '{name}': source shape {list(source.shape)} does not match the stored "
                       f"{[packed.rows, packed.cols]}")
    cos = row_cosines(source.float(), decode(packed))
    return Verdict(name, floor, statistic, all_statistics(cos))


class SourceMatrices:
    """The source weights of every matrix an XFP folder may store: a source tensor by its own name, or a
    routed expert by its stored name (`xfp.moe.experts`), read from a per-expert tensor or sliced out of a
    fused [E, N, K] stack (each fused tensor read once per run of consecutive experts)."""

    def __init__(self, source):
        from xfp.classify import classify
        from xfp.moe.experts import MemberLoader, plan, stored_members
        from xfp.pipeline.worker import is_float_label

        self.source = source
        cfg = source.config()
        names = source.tensor_names()
        decisions = [classify(n, source.tensor_shape(n), is_float_label(source.tensor_dtype(n)), cfg) for n in names]
        self._members = stored_members(plan(decisions, source.tensor_shape))
        self._names = set(names)
        self._loader = MemberLoader(source.load)

    def __contains__(self, name: str) -> bool:
        return name in self._members or name in self._names

    def load(self, name: str) -> torch.Tensor:
        """[rows, cols] float32 source weights of stored matrix `name`."""
        member = self._members.get(name)
        return self._loader(member) if member is not None else self.source.load(name)
