"""`XFPLinear`: a Linear layer whose weight is one stored XFP matrix, mode V2 or V2a (docs/FORMAT.md).

The module holds the stored tensors as buffers named exactly like the file's tensors (V2:
`<module>.xfp_codes`, `.xfp_codebook`, `.xfp_outlier_pos`, `.xfp_outlier_val`, `.xfp_meta`; V2a: `.xfp_codes`,
`.xfp_library`, `.xfp_scale`, `.xfp_scale_table`, `.xfp_offset`, `.xfp_offset_table`, `.xfp_ids`,
`.xfp_outlier_pos`, `.xfp_outlier_val`, `.xfp_kept_cols`, `.xfp_kept_val`, `.xfp_kept_scale`, `.xfp_meta`),
sized from the layout table (`xfp.format.spec`), so a folder's state dict loads into it with no renaming,
plus an optional dense `bias` (`xfp.runtime.stored`). The dense matrix is never kept: every forward of a V2
matrix hands the packed parts to the kernel chosen by `xfp.runtime.dispatch` (the fused CPU kernels serve
both modes; elsewhere the exact reference decode).

`XFPLinear.tied(embedding)` reads the stored tensors of another module instead of holding its own: the
lm_head of a model with tied word embeddings whose folder stores the embedding only.
"""

from __future__ import annotations

import torch
from torch import nn

from xfp.format.reference import Packed
from xfp.runtime import dispatch
from xfp.runtime.kernels import cpu as _cpu
from xfp.runtime.opaque import OpaqueForward, disarm, register
from xfp.runtime.stored import BUFFER_PREFIX, StoredMatrix, buffer_name, layout_kwargs


class XFPLinear(OpaqueForward, StoredMatrix):
    """y = x @ W_hat.T + bias, with W_hat: [out_features, in_features] decoded from the stored parts.

    Buffers: `make_layout(mode, out_features, in_features, bits, n_outliers, group=, library=).tensors()`,
    e.g. mode "v2": xfp_codes [out, ceil(in*bits/8)] uint8, xfp_codebook [out, 2**bits] float16,
    xfp_outlier_pos [n] int32, xfp_outlier_val [n] float16, xfp_meta [4] int32; mode "v2a" (group and
    library required, kept optional): xfp_codes, xfp_library [library, 2**bits] float16, xfp_scale and
    xfp_offset [out, ceil(in/group)] uint8 with xfp_scale_table and xfp_offset_table [256] float16, xfp_ids
    [out, ceil(in/group) or 0] uint8, the outliers, xfp_kept_cols [kept] int32, xfp_kept_val [out, kept]
    int8, xfp_kept_scale [kept] float16, xfp_meta [7] int32. None when tied (`source`, `is_tied`).
    bias: [out] in the model's dtype, or None.

    The float16 parts keep their dtype through `module.to(dtype)`, `.half()`, `.bfloat16()`...: they are the
    stored matrix, and a cast would change it. Device moves apply to them as usual.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, n_outliers: int, bias: bool = True, *,
                 mode: str = "v2", group: int | None = None, library: int | None = None, kept: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 source: StoredMatrix | None = None) -> None:
        # raises ValueError on a bad shape, width, mode, group or library size
        super().__init__(out_features, in_features, bits, n_outliers, mode=mode, group=group, library=library,
                         kept=kept, device=device, source=source)
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict = {}  # per-matrix kernel state (dispatch.state_for); not part of the state dict
        self._fast: dispatch.FastPath | None = None  # the CPU kernel's shortcut, remade when it no longer applies
        self._opaque_handle = register(self)  # one operator under torch.compile (xfp.runtime.opaque)
        self._armed = False  # whether xfp::fused_linear may serve this module (its state armed in C++)

    @classmethod
    def from_packed(cls, packed: Packed, bias: torch.Tensor | None = None) -> "XFPLinear":
        """A module holding `packed` (its tensors, not copies) and `bias`: [rows] (or None)."""
        layout = packed.layout
        if bias is not None and tuple(bias.shape) != (packed.rows,):
            raise ValueError(f"bias must have shape [{packed.rows}], got {list(bias.shape)}")
        module = cls(packed.cols, packed.rows, packed.bits, layout.n_outliers, bias is not None,
                     **layout_kwargs(layout), device="meta", dtype=None if bias is None else bias.dtype)
        module._set_packed(packed)  # ValueError unless every part has its layout's dtype and shape
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @classmethod
    def tied(cls, source: StoredMatrix, bias: torch.Tensor | None = None) -> "XFPLinear":
        """A module computing x @ W_hat.T (+ bias) with the matrix `source` holds ([rows, cols]: out_features =
        rows, in_features = cols), reading `source`'s tensors on every call (no copy; see
        `xfp.runtime.stored`). bias: [rows] or None."""
        lay = source.layout
        if bias is not None and tuple(bias.shape) != (lay.rows,):
            raise ValueError(f"bias must have shape [{lay.rows}], got {list(bias.shape)}")
        module = cls(lay.cols, lay.rows, lay.bits, lay.n_outliers, bias is not None, **layout_kwargs(lay),
                     device="meta", dtype=None if bias is None else bias.dtype, source=source)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype.

        Once the CPU kernel has served this module, float32 inputs go straight to it from C++ while everything
        it was armed with holds (xfp/runtime/kernels/csrc): eagerly through `cpu.fast_linear`, else (compiling,
        or where that declines: a tensor subclass, a dispatch mode...) through the operator
        `xfp::fused_linear`, which calls `run` where the kernel no longer applies. Other inputs, or before
        that, `run` (as one operator under torch.compile)."""
        if self._armed and x.dtype is torch.float32 and not (x.requires_grad and torch.is_grad_enabled()):
            stored, bias = self.stored, self._parameters["bias"]
            if not torch.compiler.is_compiling():
                y = _cpu.fast_linear(x, stored, bias, self._opaque_handle)
                if y is not None:
                    return y
            return torch.ops.xfp.fused_linear(x, list(stored.values()), bias, self._opaque_handle)
        return OpaqueForward.forward(self, x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The forward in Python: the cached fast path while it holds, else `dispatch.linear`, after which the
        fast path and the C++ shortcut are remade for the kernel that served it."""
        fast = self._fast
        if fast is not None:
            y = fast(x, self._parameters["bias"])
            if y is not None:
                return y
        packed = self.packed()
        y = dispatch.linear(x, packed, self.bias, cache=self._kernel_cache)
        self._fast = fast = dispatch.fast_path(self.stored, packed, x, self._kernel_cache)
        if fast is not None:
            _cpu.arm(self._opaque_handle, fast.state, list(self.stored.values()))
            self._armed = True
        elif self._armed:  # e.g. XFP_KERNEL=reference now: no detour through the C++ operator, nothing held there
            disarm(self._opaque_handle)
            self._armed = False
        return y

    def __getstate__(self) -> dict:
        """For pickling and copies: the stored tensors and the module's settings, not its kernel state (the
        fast path holds a closure and C pointers; the copy prepares its own on its first call)."""
        state = self.__dict__.copy()
        state.update(_fast=None, _kernel_cache={}, _armed=False)
        return state

    def _apply(self, fn, recurse: bool = True):
        self._armed = False  # the C++ shortcut would hold the tensors this replaces
        disarm(self._opaque_handle)
        return super()._apply(fn, recurse)

    def output_like(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self._layout_repr()}, "
                f"bias={self.bias is not None}")


__all__ = ["BUFFER_PREFIX", "XFPLinear", "buffer_name"]
