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
