"""Which kernel computes `x @ W_hat.T + bias` for an XFP matrix.

Every kernel computes the product with the matrix that `xfp.format.reference.decode` defines; the
reference kernel *is* that decoder followed by `torch.nn.functional.linear`, and it runs everywhere.
Faster kernels register here with the devices and dtypes they support and are tested against the
reference (tests/runtime/test_kernels.py):

- `cpu` (xfp.runtime.kernels.cpu): fused C++ kernels (AVX-512 / AVX2 / portable) compiled on first use,
  for both modes (V2 and V2a); float32, bfloat16 and float16 inputs on the CPU.

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

from xfp.format.reference import Packed, PackedV2a, decode
from xfp.runtime.kernels import cpu as _cpu

ENV_VAR = "XFP_KERNEL"
AUTO = "auto"

LinearFn = Callable[[torch.Tensor, Packed, "torch.Tensor | None"], torch.Tensor]
"""(x: [..., cols] float, packed: one matrix (V2 or V2a), bias: [rows] or None) -> [..., rows] in x's dtype."""

KernelFn = Callable[[torch.Tensor, Packed, "torch.Tensor | None", Any], torch.Tensor]
"""A kernel's entry: LinearFn plus the state its `prepare` made for this matrix."""


def _no_state(packed: Packed) -> None:
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
    prepare: Callable[[Packed], Any] = field(default=_no_state)
    unavailable: Callable[[], "str | None"] = field(default=_always_available)
    differentiable: bool = False


def reference_linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """Decode the whole matrix (float16, exact), cast it to x's dtype, then F.linear. No caching."""
    w = decode(packed).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


REFERENCE = Kernel("reference", lambda x, packed, bias, state: reference_linear(x, packed, bias),
                   lambda device, dtype: True, differentiable=True)
CPU = Kernel(_cpu.NAME, _cpu.linear, _cpu.supports, _cpu.prepare_any, _cpu.unavailable_reason)

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


_V2_PARTS = ("codes", "codebook", "outlier_pos", "outlier_val")
_V2A_PARTS = ("codes", "library", "scale", "scale_table", "offset", "offset_table", "ids", "outlier_pos", "outlier_val",
              "kept_cols", "kept_val", "kept_scale")


def stored_tensors(packed: Packed) -> tuple[torch.Tensor, ...]:
    """The stored tensors a kernel's state derives from (all but `meta`), in a fixed order."""
    return tuple(getattr(packed, part) for part in (_V2A_PARTS if isinstance(packed, PackedV2a) else _V2_PARTS))


def fingerprint(packed: Packed) -> tuple:
    """Identity of the stored tensors (storage and in-place version): derived state is valid while it holds."""
    key = [packed.mode, packed.rows, packed.cols, packed.bits, getattr(packed, "group", 0), packed.codes.device]
    for t in stored_tensors(packed):
        try:
            key += (t.data_ptr(), t._version)
        except RuntimeError:  # inference tensors keep no version counter (and cannot be edited outside it)
            key += (t.data_ptr(), -1)
    return tuple(key)


def state_for(kernel: Kernel, packed: Packed, cache: dict | None) -> Any:
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


def linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None, *,
           cache: dict | None = None) -> torch.Tensor:
    """x: [..., cols] float -> x @ W_hat.T (+ bias): [..., rows] in x's dtype, by the selected kernel.

    cache: a dict the caller keeps per matrix (see the module doc); None derives kernel state every call.
    """
    kernel = select(x.device, x.dtype)
    if not kernel.differentiable and x.requires_grad and torch.is_grad_enabled():
        kernel = REFERENCE
    return kernel.linear(x, packed, bias, state_for(kernel, packed, cache))


def environment_reader(*names: str) -> Callable[[], tuple]:
    """A function returning the current values of the environment variables `names` (None where unset), in
    a form only meant for comparing with an earlier reading. CPython keeps `os.environ`'s contents in the
    dict `os.environ._data` under encoded keys: reading that dict costs ~0.1 us a call against ~0.9 us per
    `os.environ.get` (which encodes the key and decodes the value every time), and it sees every change made
    through `os.environ`. Elsewhere, `os.environ.get`."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        keys = tuple(encode(name) for name in names)
        return lambda: tuple(map(data.get, keys))
    return lambda: tuple(map(os.environ.get, names))


_overrides = environment_reader(ENV_VAR, _cpu.ISA_ENV_VAR)
"""The kernel and instruction-set overrides as they are now (for FastPath's check)."""


class FastPath:
    """A module's shortcut to the CPU kernel, skipping selection, fingerprint and state lookup on each call.

    Made by `fast_path` after a call that `linear` served with the CPU kernel; `__call__` returns None
    (the caller then takes `linear`) unless everything that call depended on still holds: x on the CPU in a
    dtype the kernel takes, no gradient wanted, `$XFP_KERNEL` and `$XFP_CPU_ISA` unchanged
    (`environment_reader`), and the module's stored tensors the same objects at the same in-place versions.
    Its checks cost ~3 us a call, selection and state lookup ~20 us.
    """

    __slots__ = ("_buffers", "_ids", "_versions", "_env", "_run", "state")

    def __init__(self, buffers: dict, run: Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor],
                 state: Any = None) -> None:
        self._buffers = buffers
        self._ids = tuple(map(id, buffers.values()))
        self._versions = [t._version for t in buffers.values()]
        self._env = _overrides()
        self._run = run
        self.state = state  # the CPU kernel's state for the matrix (what `_cpu.arm` hands to C++)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if x.dtype not in _cpu.DTYPES or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            return None
        if _overrides() != self._env:
            return None
        values = self._buffers.values()
        if tuple(map(id, values)) != self._ids or [t._version for t in values] != self._versions:
            return None
        return self._run(x, bias)


def fast_path(buffers: dict, packed: Packed, x: torch.Tensor, cache: dict) -> FastPath | None:
    """A FastPath for the module whose stored tensors are `buffers` (its `_buffers`, holding `packed`), if
    `linear(x, packed, ..., cache=cache)` takes the CPU kernel and its state is in `cache`; else None."""
    try:
        if select(x.device, x.dtype) is not CPU or (x.requires_grad and torch.is_grad_enabled()):
            return None
        hit = cache.get(CPU.name)
        if hit is None or hit[0] != fingerprint(packed):
            return None
        return FastPath(buffers, _cpu.runner(packed, hit[1]), hit[1])
    except (RuntimeError, ValueError):  # inference tensors keep no version counter; an unusable override
        return None


__all__ = ["AUTO", "CPU", "FastPath", "fast_path", "ENV_VAR", "environment_reader", "Kernel", "REFERENCE", "fingerprint", "kernel_names", "linear",
           "reference_linear", "select", "state_for", "stored_tensors"]
