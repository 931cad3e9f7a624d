"""`XFPLinear`: a Linear layer whose weight is one stored XFP matrix, mode V2 or V2a (docs/FORMAT.md).

The module holds the stored tensors as buffers named exactly like the file's tensors (V2:
`<module>.xfp_codes`, `.xfp_codebook`, `.xfp_outlier_pos`, `.xfp_outlier_val`, `.xfp_meta`; V2a: `.xfp_codes`,
`.xfp_library`, `.xfp_scale`, `.xfp_scale_table`, `.xfp_offset`, `.xfp_offset_table`, `.xfp_ids`,
`.xfp_outlier_pos`, `.xfp_outlier_val`, `.xfp_kept_cols`, `.xfp_kept_val`, `.xfp_kept_scale`, `.xfp_meta`),
sized from the layout table (`xfp.format.spec`), so a folder's state dict loads into it with no renaming,
plus an optional dense `bias`. The dense matrix is never kept: every forward of a V2 matrix hands the packed
parts to the kernel chosen by `xfp.runtime.dispatch` (the fused CPU kernels serve both modes; elsewhere the
exact reference decode).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xfp.errors import FormatError
from xfp.format.io import validate_matrix
from xfp.format.reference import Packed, PackedV2, PackedV2a
from xfp.format.spec import Layout, make_layout, tensor_name
from xfp.runtime import dispatch

BUFFER_PREFIX = "xfp_"


def buffer_name(part: str) -> str:
    """`codes` -> `xfp_codes`: the buffer (and state-dict suffix) of one stored part."""
    return f"{BUFFER_PREFIX}{part}"


class XFPLinear(nn.Module):
    """y = x @ W_hat.T + bias, with W_hat: [out_features, in_features] decoded from the stored parts.

    Buffers: `make_layout(mode, out_features, in_features, bits, n_outliers, group=, library=).tensors()`,
    e.g. mode "v2": xfp_codes [out, ceil(in*bits/8)] uint8, xfp_codebook [out, 2**bits] float16,
    xfp_outlier_pos [n] int32, xfp_outlier_val [n] float16, xfp_meta [4] int32; mode "v2a" (group and
    library required, kept optional): xfp_codes, xfp_library [library, 2**bits] float16, xfp_scale and
    xfp_offset [out, ceil(in/group)] uint8 with xfp_scale_table and xfp_offset_table [256] float16, xfp_ids
    [out, ceil(in/group) or 0] uint8, the outliers, xfp_kept_cols [kept] int32, xfp_kept_val [out, kept]
    int8, xfp_kept_scale [kept] float16, xfp_meta [7] int32.
    bias: [out] in the model's dtype, or None.

    The float16 parts keep their dtype through `module.to(dtype)`, `.half()`, `.bfloat16()`...: they are the
    stored matrix, and a cast would change it. Device moves apply to them as usual.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, n_outliers: int, bias: bool = True, *,
                 mode: str = "v2", group: int | None = None, library: int | None = None, kept: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # raises ValueError on a bad shape, width, mode, group or library size
        layout = make_layout(mode, out_features, in_features, bits, n_outliers, group=group, library=library,
                             kept=kept)
        self.layout: Layout = layout
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        for part, (part_dtype, shape) in layout.tensors().items():
            self.register_buffer(buffer_name(part), torch.zeros(shape, dtype=part_dtype, device=device))
        self.xfp_meta = layout.meta().to(device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict = {}  # per-matrix kernel state (dispatch.state_for); not part of the state dict
        self._fast: dispatch.FastPath | None = None  # the CPU kernel's shortcut, remade when it no longer applies

    @property
    def mode(self) -> str:
        return self.layout.mode

    @classmethod
    def from_packed(cls, packed: Packed, bias: torch.Tensor | None = None) -> "XFPLinear":
        """A module holding `packed` (its tensors, not copies) and `bias`: [rows] (or None)."""
        layout = packed.layout
        parts = packed.tensors()
        for part, (dtype, shape) in layout.tensors().items():
            t = parts[part]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"packed.{part} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
        if bias is not None and tuple(bias.shape) != (packed.rows,):
            raise ValueError(f"bias must have shape [{packed.rows}], got {list(bias.shape)}")
        extra = layout.entry()
        module = cls(packed.cols, packed.rows, packed.bits, layout.n_outliers, bias is not None,
                     mode=layout.mode, group=extra.get("group"), library=extra.get("library"),
                     kept=extra.get("kept"), device="meta", dtype=None if bias is None else bias.dtype)
        for part in layout.parts:
            setattr(module, buffer_name(part), parts[part].to(packed.codes.device))
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @property
    def n_outliers(self) -> int:
        return int(self.xfp_outlier_pos.numel())

    def packed(self) -> Packed:
        """The stored matrix (the module's own tensors, not copies)."""
        if self.layout.mode == "v2a":
            b = self._buffers
            return PackedV2a(self.out_features, self.in_features, self.bits, self.layout.group, b["xfp_codes"],
                             b["xfp_library"], b["xfp_scale"], b["xfp_scale_table"], b["xfp_offset"],
                             b["xfp_offset_table"], b["xfp_ids"], b["xfp_outlier_pos"], b["xfp_outlier_val"],
                             b["xfp_kept_cols"], b["xfp_kept_val"], b["xfp_kept_scale"])
        b = self._buffers  # direct: this runs on every forward, and Module.__getattr__ is slow
        return PackedV2(self.out_features, self.in_features, self.bits, b["xfp_codes"], b["xfp_codebook"],
                        b["xfp_outlier_pos"], b["xfp_outlier_val"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        fast = self._fast
        if fast is not None:
            y = fast(x, self._parameters["bias"])
            if y is not None:
                return y
        packed = self.packed()
        y = dispatch.linear(x, packed, self.bias, cache=self._kernel_cache)
        self._fast = dispatch.fast_path(self._buffers, packed, x, self._kernel_cache)
        return y

    def validate(self, path: str | Path, name: str) -> Packed:
        """Check the loaded buffers against docs/FORMAT.md and this layer's shape, or raise FormatError.

        path: the file or folder named in messages; name: the matrix's stored weight name
        (`model.layers.0.mlp.up_proj.weight`).
        """
        parts = {part: getattr(self, buffer_name(part)) for part in self.layout.parts}
        packed = validate_matrix(Path(path), name, parts)
        stored = (packed.rows, packed.cols, packed.bits)
        expected = (self.out_features, self.in_features, self.bits)
        if stored != expected:
            raise FormatError(path, tensor_name(name, "meta"),
                              f"says {stored[0]}x{stored[1]} at {stored[2]} bits, but the layer is "
                              f"{expected[0]}x{expected[1]} at {expected[2]} bits")
        shape_keys = ("mode", "group", "library", "kept")
        stored_kind = {k: v for k, v in packed.layout.entry().items() if k in shape_keys}
        expected_kind = {k: v for k, v in self.layout.entry().items() if k in shape_keys}
        if stored_kind != expected_kind:
            raise FormatError(path, tensor_name(name, "meta"),
                              f"says {stored_kind}, but the layer was built for {expected_kind}")
        return packed

    def _apply(self, fn, recurse: bool = True):
        # Present the float16 parts as int16 so dtype casts (`to(dtype)`, `.half()`) skip them; device
        # moves and `to_empty` still apply. The bit patterns are untouched either way.
        float16 = [buffer_name(part) for part, (dtype, _) in self.layout.tensors().items() if dtype == torch.float16]
        for name in float16:
            self._buffers[name] = self._buffers[name].view(torch.int16)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in float16:
                self._buffers[name] = self._buffers[name].view(torch.float16)

    def extra_repr(self) -> str:
        entry = self.layout.entry()
        extra = (f", mode=v2a, group={entry['group']}, library={entry['library']}, kept={entry['kept']}"
                 if self.mode == "v2a" else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"outliers={self.n_outliers}{extra}, bias={self.bias is not None}")


__all__ = ["XFPLinear", "buffer_name"]
