"""`XFPLinear`: a Linear layer whose weight is one stored XFP V2 matrix (docs/FORMAT.md).

The module holds the five stored tensors as buffers named exactly like the file's tensors
(`<module>.xfp_codes`, `.xfp_codebook`, `.xfp_outlier_pos`, `.xfp_outlier_val`, `.xfp_meta`), so a folder's
state dict loads into it with no renaming, plus an optional dense `bias`. The dense matrix is never kept:
every forward hands the packed parts to the kernel chosen by `xfp.runtime.dispatch`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xfp.errors import FormatError
from xfp.format.io import validate_matrix
from xfp.format.reference import PackedV2
from xfp.format.spec import MODE_V2, PARTS, V2Layout, tensor_name
from xfp.runtime import dispatch

BUFFER_PREFIX = "xfp_"
_FLOAT16_PARTS = ("codebook", "outlier_val")


def buffer_name(part: str) -> str:
    """`codes` -> `xfp_codes`: the buffer (and state-dict suffix) of one stored part."""
    return f"{BUFFER_PREFIX}{part}"


class XFPLinear(nn.Module):
    """y = x @ W_hat.T + bias, with W_hat: [out_features, in_features] decoded from the stored parts.

    Buffers (shapes from `V2Layout(out_features, in_features, bits, n_outliers)`):
    xfp_codes [out, ceil(in*bits/8)] uint8, xfp_codebook [out, 2**bits] float16,
    xfp_outlier_pos [n] int32, xfp_outlier_val [n] float16, xfp_meta [4] int32.
    bias: [out] in the model's dtype, or None.

    The float16 parts keep their dtype through `module.to(dtype)`, `.half()`, `.bfloat16()`...: they are the
    stored matrix, and a cast would change it. Device moves apply to them as usual.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, n_outliers: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        layout = V2Layout(out_features, in_features, bits, n_outliers)  # raises ValueError on a bad shape
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        for part, (part_dtype, shape) in layout.tensors().items():
            self.register_buffer(buffer_name(part), torch.zeros(shape, dtype=part_dtype, device=device))
        self.xfp_meta = torch.tensor([MODE_V2, out_features, in_features, bits], dtype=torch.int32, device=device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(cls, packed: PackedV2, bias: torch.Tensor | None = None) -> "XFPLinear":
        """A module holding `packed` (its tensors, not copies) and `bias`: [rows] (or None)."""
        layout = packed.layout
        parts = packed.tensors()
        for part, (dtype, shape) in layout.tensors().items():
            t = parts[part]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"packed.{part} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
        if bias is not None and tuple(bias.shape) != (packed.rows,):
            raise ValueError(f"bias must have shape [{packed.rows}], got {list(bias.shape)}")
        module = cls(packed.cols, packed.rows, packed.bits, layout.n_outliers, bias is not None,
                     device="meta", dtype=None if bias is None else bias.dtype)
        for part in PARTS:
            setattr(module, buffer_name(part), parts[part].to(packed.codes.device))
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @property
    def n_outliers(self) -> int:
        return int(self.xfp_outlier_pos.numel())

    def packed(self) -> PackedV2:
        """The stored matrix (the module's own tensors, not copies)."""
        return PackedV2(self.out_features, self.in_features, self.bits, self.xfp_codes, self.xfp_codebook,
                        self.xfp_outlier_pos, self.xfp_outlier_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        return dispatch.linear(x, self.packed(), self.bias)

    def validate(self, path: str | Path, name: str) -> PackedV2:
        """Check the loaded buffers against docs/FORMAT.md and this layer's shape, or raise FormatError.

        path: the file or folder named in messages; name: the matrix's stored weight name
        (`model.layers.0.mlp.up_proj.weight`).
        """
        parts = {part: getattr(self, buffer_name(part)) for part in PARTS}
        packed = validate_matrix(Path(path), name, parts)
        stored = (packed.rows, packed.cols, packed.bits)
        expected = (self.out_features, self.in_features, self.bits)
        if stored != expected:
            raise FormatError(path, tensor_name(name, "meta"),
                              f"says {stored[0]}x{stored[1]} at {stored[2]} bits, but the layer is "
                              f"{expected[0]}x{expected[1]} at {expected[2]} bits")
        return packed

    def _apply(self, fn, recurse: bool = True):
        # Present the float16 parts as int16 so dtype casts (`to(dtype)`, `.half()`) skip them; device
        # moves and `to_empty` still apply. The bit patterns are untouched either way.
        for part in _FLOAT16_PARTS:
            name = buffer_name(part)
            self._buffers[name] = self._buffers[name].view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            for part in _FLOAT16_PARTS:
                name = buffer_name(part)
                self._buffers[name] = self._buffers[name].view(torch.float16)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"outliers={self.n_outliers}, bias={self.bias is not None}")


__all__ = ["XFPLinear", "buffer_name"]
