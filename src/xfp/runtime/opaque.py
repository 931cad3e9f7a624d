"""XFP's modules as one opaque operator each under `torch.compile`: `OpaqueForward`.

The fused kernels are C++ reached through ctypes, which TorchDynamo cannot trace: every call of an XFP
module would break the compiled graph (a SmolLM2 decode step makes 211 such calls). So while being traced,
an XFP module's forward is one call of the operator `xfp::module_forward(x, handle)` instead. Its
implementation runs the module's eager forward (`run`): kernel selection, the fast path and its checks,
`XFP_KERNEL`, all as without compiling, so a compiled model multiplies by exactly the same products. Its
fake implementation (shapes and dtypes for tracing) is the module's `output_like`.

`xfp::fused_linear(x, stored, bias, handle)` is the C++ shortcut of an `XFPLinear` whose kernel state is
armed (xfp/runtime/kernels/csrc/ops.cpp): the fused GEMV without Python, eagerly and in compiled graphs,
falling back to `xfp::module_forward` wherever anything it was armed with no longer holds. Its schema and
fake implementation are here; its CPU kernel comes with the compiled kernels.

`handle` is an int naming a live module of this process (a registry of weak references; a copy or an
unpickled module gets its own). A graph holding the operator is therefore only meaningful in the process
that traced it: it is for `torch.compile`, not for exporting a model to another process. An input that
requires a gradient (with grad mode on) is traced through `run` as usual instead (the reference kernel,
the one differentiable kernel).
"""

from __future__ import annotations

import itertools
import weakref

import torch

OPERATOR = "xfp::module_forward"

FUSED = "xfp::fused_linear"

_LIBRARY = torch.library.Library("xfp", "FRAGMENT")  # the C++ kernels add their own (csrc/ops.cpp)
_LIBRARY.define("module_forward(Tensor x, int handle) -> Tensor")
_LIBRARY.define("fused_linear(Tensor x, Tensor[] stored, Tensor? bias, int handle) -> Tensor")

_MODULES: dict[int, weakref.ReferenceType] = {}
_HANDLES = itertools.count(1)


def register(module: "OpaqueForward") -> int:
    """A new handle naming `module` for as long as it lives."""
    handle = next(_HANDLES)
    _MODULES[handle] = weakref.ref(module, lambda _ref, handle=handle: forget(handle))
    return handle


def forget(handle: int) -> None:
    """Drop `handle`, and whatever the CPU kernels armed for it (csrc/ops.cpp)."""
    _MODULES.pop(handle, None)
    disarm(handle)


def disarm(handle: int) -> None:
    """Release what `xfp::arm` keeps for `handle` (nothing if the CPU kernels never loaded)."""
    try:
        torch.ops.xfp.disarm(handle)
    except Exception:  # not loaded (no such operator), or the interpreter is shutting down
        pass


def module_of(handle: int) -> "OpaqueForward":
    ref = _MODULES.get(handle)
    module = None if ref is None else ref()
    if module is None:
        raise RuntimeError(f"{OPERATOR}: module {handle} no longer exists (a compiled graph outlived its model, "
                           "or came from another process)")
    return module


def _module_forward(x: torch.Tensor, handle: int) -> torch.Tensor:
    return module_of(handle).run(x)


def _module_forward_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    return module_of(handle).output_like(x)


def _fused_linear_fake(x: torch.Tensor, stored: list[torch.Tensor], bias: torch.Tensor | None,
                       handle: int) -> torch.Tensor:
    return module_of(handle).output_like(x)


_LIBRARY.impl("module_forward", _module_forward, "CompositeExplicitAutograd")
torch.library.register_fake(OPERATOR, _module_forward_fake, lib=_LIBRARY)
torch.library.register_fake(FUSED, _fused_linear_fake, lib=_LIBRARY)


def without_stored_tensor_guards(entries) -> list[bool]:
    """A `guard_filter_fn` for torch.compile: keep every guard except those on XFP modules' stored tensors
    (sources `..._buffers['xfp_...']`). A compiled SmolLM2 step passes ~2700 of them to `xfp::fused_linear`
    (13 per V2a matrix), and checking each one's dtype, shape and strides before every step costs more than
    the guards are worth: the operator itself checks that they are the very tensors, at the very in-place
    versions, it was armed with, and runs the module's Python forward otherwise."""
    return ["_buffers['xfp_" not in entry.name for entry in entries]


class OpaqueForward:
    """Mixin for an nn.Module computing `run(x)`: its forward is `run` eagerly and one `xfp::module_forward`
    call under `torch.compile`. The subclass defines `run(x)` and `output_like(x)` (an empty tensor of the
    output's shape, dtype and device, made from x with `new_empty` so it works on fake tensors), and sets
    `self._opaque_handle = register(self)` in its constructor. Put it first among the bases."""

    _opaque_handle: int

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_like(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled()):
            return torch.ops.xfp.module_forward(x, self._opaque_handle)
        return self.run(x)

    def __setstate__(self, state: dict) -> None:  # copy.copy, copy.deepcopy, pickle: the copy is another module
        super().__setstate__(state)
        self._opaque_handle = register(self)


__all__ = ["FUSED", "OPERATOR", "OpaqueForward", "disarm", "forget", "module_of", "register",
           "without_stored_tensor_guards"]
