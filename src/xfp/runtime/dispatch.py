"""Which kernel computes `x @ W_hat.T + bias` for an XFP matrix.

Every kernel computes the product with the matrix that `xfp.format.reference.decode` defines; the
reference kernel *is* that decoder followed by `torch.nn.functional.linear`, and it runs everywhere.
Faster kernels register here with the devices and dtypes they support and are tested against the
reference (tests/runtime/test_kernels.py):

- `cpu` (xfp.runtime.kernels.cpu): fused C++ kernels (AVX-512 / AVX2 / portable) compiled on first use;
  float32, bfloat16 and float16 inputs on the CPU.

`XFP_KERNEL=<name>` forces one kernel (an error if it cannot run the input); unset, empty or `auto` picks
the first registered kernel that supports the input, falling back to the reference (e.g. on another
device, for another dtype, or where the CPU kernels cannot be compiled). Inputs that require a gradient
(with grad mode on) always take the reference, the one differentiable kernel.

A kernel may derive per-matrix state once (`prepare`, e.g. outlier corrections); `linear(..., cache=)`
keeps it in a dict owned by the caller (`XFPLinear` keeps one per module), keyed by the stored tensors'
identity and version, so replacing or editing them in place recomputes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from xfp.format.reference import PackedV2, decode
from xfp.runtime.kernels import cpu as _cpu

ENV_VAR = "XFP_KERNEL"
AUTO = "auto"

LinearFn = Callable[[torch.Tensor, PackedV2, "torch.Tensor | None"], torch.Tensor]
"""(x: [..., cols] float, packed: one V2 matrix, bias: [rows] or None) -> [..., rows] in x's dtype."""

KernelFn = Callable[[torch.Tensor, PackedV2, "torch.Tensor | None", Any], torch.Tensor]
"""A kernel's entry: LinearFn plus the state its `prepare` made for this matrix."""


def _no_state(packed: PackedV2) -> None:
    return None


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Kernel:
    """A way to compute the XFP linear.

    supports(device, dtype): where it may run. linear(x, packed, bias, state): the product, with
    state = prepare(packed) (computed once per matrix when the caller passes a cache).
    unavailable(): None, or why the kernel cannot run on this machine at all (shown when it is forced).
    differentiable: whether autograd can go through it.
    """

    name: str
    linear: KernelFn
    supports: Callable[[torch.device, torch.dtype], bool]
    prepare: Callable[[PackedV2], Any] = field(default=_no_state)
    unavailable: Callable[[], "str | None"] = field(default=_always_available)
    differentiable: bool = False


def reference_linear(x: torch.Tensor, packed: PackedV2, bias: torch.Tensor | None) -> torch.Tensor:
    """Decode the whole matrix (float16, exact), cast it to x's dtype, then F.linear. No caching."""
    w = decode(packed).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


REFERENCE = Kernel("reference", lambda x, packed, bias, state: reference_linear(x, packed, bias),
                   lambda device, dtype: True, differentiable=True)
CPU = Kernel(_cpu.NAME, _cpu.linear, _cpu.supports, _cpu.prepare, _cpu.unavailable_reason)

_KERNELS: dict[str, Kernel] = {k.name: k for k in (CPU, REFERENCE)}


def kernel_names() -> list[str]:
    """The registered kernels, in the order `auto` tries them (reference last)."""
    return sorted(_KERNELS, key=lambda n: (n == REFERENCE.name, n))


_AUTO_ORDER = tuple(_KERNELS[name] for name in kernel_names())


def select(device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel for an input on `device` in `dtype`; `$XFP_KERNEL` overrides the automatic choice."""
    wanted = os.environ.get(ENV_VAR, AUTO).strip() or AUTO
    if wanted != AUTO:
        kernel = _KERNELS.get(wanted)
        if kernel is None:
            raise ValueError(f"{ENV_VAR}={wanted!r} is not a known kernel; choose one of {[AUTO, *kernel_names()]}")
        if not kernel.supports(device, dtype):
            reason = kernel.unavailable()
            if reason is not None:
                raise ValueError(f"{ENV_VAR}={wanted!r} cannot run on this machine: {reason}")
            raise ValueError(f"{ENV_VAR}={wanted!r} does not support {dtype} inputs on {device}")
        return kernel
    for kernel in _AUTO_ORDER:
        if kernel.supports(device, dtype):
            return kernel
    return REFERENCE


def fingerprint(packed: PackedV2) -> tuple:
    """Identity of the stored tensors (storage and in-place version): derived state is valid while it holds."""
    key = [packed.rows, packed.cols, packed.bits, packed.codes.device]
    for t in (packed.codes, packed.codebook, packed.outlier_pos, packed.outlier_val):
        try:
            key += (t.data_ptr(), t._version)
        except RuntimeError:  # inference tensors keep no version counter (and cannot be edited outside it)
            key += (t.data_ptr(), -1)
    return tuple(key)


def state_for(kernel: Kernel, packed: PackedV2, cache: dict | None) -> Any:
    """kernel.prepare(packed), reused from `cache` while the stored tensors are unchanged."""
    if cache is None:
        return kernel.prepare(packed)
    key = fingerprint(packed)
    hit = cache.get(kernel.name)
    if hit is not None and hit[0] == key:
        return hit[1]
    state = kernel.prepare(packed)
    cache[kernel.name] = (key, state)
    return state


def linear(x: torch.Tensor, packed: PackedV2, bias: torch.Tensor | None = None, *,
           cache: dict | None = None) -> torch.Tensor:
    """x: [..., cols] float -> x @ W_hat.T (+ bias): [..., rows] in x's dtype, by the selected kernel.

    cache: a dict the caller keeps per matrix (see the module doc); None derives kernel state every call.
    """
    kernel = select(x.device, x.dtype)
    if not kernel.differentiable and x.requires_grad and torch.is_grad_enabled():
        kernel = REFERENCE
    return kernel.linear(x, packed, bias, state_for(kernel, packed, cache))


__all__ = ["AUTO", "CPU", "ENV_VAR", "Kernel", "REFERENCE", "fingerprint", "kernel_names", "linear",
           "reference_linear", "select", "state_for"]
