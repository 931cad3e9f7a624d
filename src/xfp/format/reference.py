"""The exact reference decoder: the oracle every kernel is tested against.

Pure torch, no tolerance: the decoded matrix is fully determined by the stored tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xfp.format.pack import unpack
from xfp.format.spec import V2Layout


@dataclass(frozen=True)
class PackedV2:
    """One V2 matrix exactly as stored (docs/FORMAT.md).

    codes: [rows, ceil(cols*bits/8)] uint8, codebook: [rows, 2**bits] float16,
    outlier_pos: [n] int32 flat positions row*cols+col (strictly increasing), outlier_val: [n] float16.
    """

    rows: int
    cols: int
    bits: int
    codes: torch.Tensor
    codebook: torch.Tensor
    outlier_pos: torch.Tensor
    outlier_val: torch.Tensor

    @property
    def layout(self) -> V2Layout:
        return V2Layout(self.rows, self.cols, self.bits, int(self.outlier_pos.numel()))

    def tensors(self) -> dict[str, torch.Tensor]:
        """part -> tensor, as written to disk."""
        return {
            "codes": self.codes,
            "codebook": self.codebook,
            "outlier_pos": self.outlier_pos,
            "outlier_val": self.outlier_val,
            "meta": self.layout.meta(),
        }


def reconstruct(indices: torch.Tensor, codebook: torch.Tensor, outlier_pos: torch.Tensor,
                outlier_val: torch.Tensor) -> torch.Tensor:
    """indices: [rows, cols] uint8, codebook: [rows, 2**b] fp16 -> W_hat: [rows, cols] float16."""
    w = torch.gather(codebook, 1, indices.long())
    if outlier_pos.numel():
        w.view(-1)[outlier_pos.long()] = outlier_val
    return w


def decode(packed: PackedV2) -> torch.Tensor:
    """Decode a stored V2 matrix -> W_hat: [rows, cols] float16, exactly."""
    indices = unpack(packed.codes, packed.bits, packed.cols)
    return reconstruct(indices, packed.codebook, packed.outlier_pos, packed.outlier_val)
