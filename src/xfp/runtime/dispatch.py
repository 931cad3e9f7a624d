"""Which kernel computes `x @ W_hat.T + bias` for an XFP matrix.

Every kernel computes the product with the matrix that `xfp.format.reference.decode` defines; the
reference kernel *is* that decoder followed by `torch.nn.functional.linear`, and it runs everywhere.
Faster kernels (CPU, Triton) register here later, each with the devices and dtypes it supports, and are
tested against the reference. `XFP_KERNEL=<name>` forces one kernel; unset (or `auto`) picks the first
registered kernel that supports the input, falling back to the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xfp.format.reference import PackedV2, decode

ENV_VAR = "XFP_KERNEL"
AUTO = "auto"

LinearFn = Callable[[torch.Tensor, PackedV2, "torch.Tensor | None"], torch.Tensor]
"""(x: [..., cols] float, packed: one V2 matrix, bias: [rows] or None) -> [..., rows] in x's dtype."""


@dataclass(frozen=True)
class Kernel:
    """A way to compute the XFP linear; `supports(device, dtype)` says where it may run."""

    name: str
    linear: LinearFn
    supports: Callable[[torch.device, torch.dtype], bool]


def reference_linear(x: torch.Tensor, packed: PackedV2, bias: torch.Tensor | None) -> torch.Tensor:
    """Decode the whole matrix (float16, exact), cast it to x's dtype, then F.linear. No caching."""
    w = decode(packed).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


REFERENCE = Kernel("reference", reference_linear, lambda device, dtype: True)

_KERNELS: dict[str, Kernel] = {REFERENCE.name: REFERENCE}


def kernel_names() -> list[str]:
    """The registered kernels, in the order `auto` tries them (reference last)."""
    return sorted(_KERNELS, key=lambda n: (n == REFERENCE.name, n))


def select(device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel for an input on `device` in `dtype`; `$XFP_KERNEL` overrides the automatic choice."""
    wanted = os.environ.get(ENV_VAR, AUTO).strip() or AUTO
    if wanted != AUTO:
        kernel = _KERNELS.get(wanted)
        if kernel is None:
            raise ValueError(f"{ENV_VAR}={wanted!r} is not a known kernel; choose one of {[AUTO, *kernel_names()]}")
        if not kernel.supports(device, dtype):
            raise ValueError(f"{ENV_VAR}={wanted!r} does not support {dtype} inputs on {device}")
        return kernel
    for name in kernel_names():
        if _KERNELS[name].supports(device, dtype):
            return _KERNELS[name]
    return REFERENCE


def linear(x: torch.Tensor, packed: PackedV2, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., cols] float -> x @ W_hat.T (+ bias): [..., rows] in x's dtype, by the selected kernel."""
    return select(x.device, x.dtype).linear(x, packed, bias)


__all__ = ["ENV_VAR", "Kernel", "REFERENCE", "kernel_names", "linear", "reference_linear",
           "select"]
