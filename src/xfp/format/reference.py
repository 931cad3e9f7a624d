"""The exact reference decoder: the oracle every kernel is tested against.

Pure torch, no tolerance: the decoded matrix is fully determined by the stored tensors (docs/FORMAT.md,
"Decoding"). Works on any device; `decode` accepts a matrix of either mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from xfp.format.pack import unpack
from xfp.format.spec import V2aLayout, V2Layout

DECODE_CHUNK = 1 << 22
"""Weights decoded per step in mode V2a (bounds the float32 temporaries, about 50 MiB)."""


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

    mode = "v2"

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


@dataclass(frozen=True)
class PackedV2a:
    """One V2a matrix exactly as stored (docs/FORMAT.md).

    codes: [rows, ceil(cols*bits/8)] uint8 (packed like V2), library: [L, 2**bits] float16,
    scale, offset: [rows, ceil(cols/group)] uint8 codes into scale_table, offset_table: [256] float16,
    ids: [rows, ceil(cols/group)] uint8 when L > 1, [rows, 0] when L == 1, outlier_pos: [n] int32,
    outlier_val: [n] float16, kept_cols: [m] int32 strictly increasing, kept_val: [rows, m] int8 in
    [-127, 127], kept_scale: [m] float16 >= 0.
    """

    rows: int
    cols: int
    bits: int
    group: int
    codes: torch.Tensor
    library: torch.Tensor
    scale: torch.Tensor
    scale_table: torch.Tensor
    offset: torch.Tensor
    offset_table: torch.Tensor
    ids: torch.Tensor
    outlier_pos: torch.Tensor
    outlier_val: torch.Tensor
    kept_cols: torch.Tensor
    kept_val: torch.Tensor
    kept_scale: torch.Tensor

    mode = "v2a"

    @property
    def library_size(self) -> int:
        return int(self.library.shape[0])

    @property
    def layout(self) -> V2aLayout:
        return V2aLayout(self.rows, self.cols, self.bits, int(self.outlier_pos.numel()), self.group,
                         self.library_size, int(self.kept_cols.numel()))

    @property
    def group_scale(self) -> torch.Tensor:
        """[rows, groups] float16: each group's decoded scale, scale_table[scale]."""
        return self.scale_table[self.scale.long()]

    @property
    def group_offset(self) -> torch.Tensor:
        """[rows, groups] float16: each group's decoded offset, offset_table[offset]."""
        return self.offset_table[self.offset.long()]

    @property
    def kept_values(self) -> torch.Tensor:
        """[rows, m] float16: the kept columns as decoded, kept_values(q, s)."""
        return kept_values(self.kept_val, self.kept_scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        """part -> tensor, as written to disk."""
        return {
            "codes": self.codes,
            "library": self.library,
            "scale": self.scale,
            "scale_table": self.scale_table,
            "offset": self.offset,
            "offset_table": self.offset_table,
            "ids": self.ids,
            "outlier_pos": self.outlier_pos,
            "outlier_val": self.outlier_val,
            "kept_cols": self.kept_cols,
            "kept_val": self.kept_val,
            "kept_scale": self.kept_scale,
            "meta": self.layout.meta(),
        }


Packed = Union[PackedV2, PackedV2a]
"""A stored matrix of any mode."""


def _put_outliers(w: torch.Tensor, outlier_pos: torch.Tensor, outlier_val: torch.Tensor) -> torch.Tensor:
    if outlier_pos.numel():
        w.view(-1)[outlier_pos.long()] = outlier_val
    return w


def reconstruct(indices: torch.Tensor, codebook: torch.Tensor, outlier_pos: torch.Tensor,
                outlier_val: torch.Tensor) -> torch.Tensor:
    """V2. indices: [rows, cols] uint8, codebook: [rows, 2**b] fp16 -> W_hat: [rows, cols] float16."""
    w = torch.gather(codebook, 1, indices.long())
    return _put_outliers(w, outlier_pos, outlier_val)


def group_values(library: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The V2a decoding rule, elementwise: library entries c, scales s, offsets o (float16, broadcastable)
    -> float16(float32(c) * float32(s) + float32(o)).

    The product of two float16 numbers is exact in float32, so a fused multiply-add gives the same float32
    value as a multiply then an add; the one float32 rounding is followed by one rounding to float16
    (to nearest, ties to even, fp16 subnormals kept).
    """
    return torch.addcmul(offset.float(), library.float(), scale.float()).half()


def kept_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kept-column rule: int8 q [rows, m], float16 scale [m] -> float16(float32(q) * float32(scale)), one
    rounding (the product of an int8 and a float16 is exact in float32)."""
    return (q.float() * scale.float()).half()


def decoded_ends_finite(library: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether every V2a group decodes to finite values for *every* entry of its codebook.

    Decoding is monotone in the entry (scale >= 0), so a group's extreme values come from its codebook's
    smallest and largest entries: two evaluations per group bound the whole matrix.
    library: [L, k] fp16, scale/offset: [rows, groups] fp16, ids: [rows, groups] uint8 or [rows, 0]."""
    group_ids = ids.long() if ids.shape[1] else torch.zeros(scale.shape, dtype=torch.long, device=scale.device)
    lo = library.float().amin(1).half()[group_ids]
    hi = library.float().amax(1).half()[group_ids]
    return bool(torch.isfinite(group_values(lo, scale, offset)).all() and torch.isfinite(group_values(hi, scale, offset)).all())


def reconstruct_v2a(indices: torch.Tensor, library: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    ids: torch.Tensor, group: int, outlier_pos: torch.Tensor, outlier_val: torch.Tensor,
                    kept_cols: torch.Tensor | None = None, kept_values: torch.Tensor | None = None) -> torch.Tensor:
    """V2a. indices: [rows, cols] uint8, library: [L, 2**b] fp16, scale/offset: [rows, groups] fp16 (the
    decoded group scales and offsets), ids: [rows, groups] uint8 (or [rows, 0] when L == 1)
    -> W_hat: [rows, cols] float16, where W_hat[r, c] = group_values(library[id, index], scale[r, g],
    offset[r, g]), g = c // group, id = ids[r, g] (0 when L == 1); then the outliers are put back, then the
    kept columns: W_hat[:, kept_cols[j]] = kept_values[:, j] (float16, decoded by `kept_values`)."""
    rows, cols = indices.shape
    k = library.shape[1]
    flat_library = library.reshape(-1)
    g = torch.arange(cols, device=indices.device) // group
    out = torch.empty((rows, cols), dtype=torch.float16, device=indices.device)
    step = max(1, DECODE_CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        flat = indices[r0:r1].long()
        if ids.shape[1]:
            flat = flat + ids[r0:r1].long()[:, g] * k
        out[r0:r1] = group_values(flat_library[flat], scale[r0:r1][:, g], offset[r0:r1][:, g])
    _put_outliers(out, outlier_pos, outlier_val)
    if kept_cols is not None and kept_cols.numel():
        out[:, kept_cols.long()] = kept_values
    return out


def decode(packed: Packed) -> torch.Tensor:
    """Decode a stored matrix of either mode -> W_hat: [rows, cols] float16, exactly."""
    indices = unpack(packed.codes, packed.bits, packed.cols)
    if isinstance(packed, PackedV2a):
        return reconstruct_v2a(indices, packed.library, packed.group_scale, packed.group_offset, packed.ids,
                               packed.group, packed.outlier_pos, packed.outlier_val, packed.kept_cols, packed.kept_values)
    return reconstruct(indices, packed.codebook, packed.outlier_pos, packed.outlier_val)


__all__ = ["DECODE_CHUNK", "Packed", "PackedV2", "PackedV2a", "decode", "decoded_ends_finite", "group_values", "kept_values",
           "reconstruct", "reconstruct_v2a"]
