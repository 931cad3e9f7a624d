"""XFP's modules as one opaque operator each under `torch.compile`: `OpaqueForward`.

The fused kernels are C++ reached through ctypes, which TorchDynamo cannot trace: every call of an XFP
module would break the compiled graph (a SmolLM2 decode step makes 211 such calls). So while being traced,
an XFP module's forward is one call of the operator `xfp::module_forward(x, handle)` instead. Its
implementation runs the module's eager forward (`run`): kernel selection, the fast path and its checks,
`XFP_KERNEL`, all as without compiling, so a compiled model multiplies by exactly the same products. Its
fake implementation (shapes and dtypes for tracing) is the module's `output_like`.

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

_LIBRARY = torch.library.Library("xfp", "DEF")
_LIBRARY.define("module_forward(Tensor x, int handle) -> Tensor")

_MODULES: dict[int, weakref.ReferenceType] = {}
_HANDLES = itertools.count(1)


def register(module: "OpaqueForward") -> int:
    """A new handle naming `module` for as long as it lives."""
    handle = next(_HANDLES)
    _MODULES[handle] = weakref.ref(module, lambda _ref, handle=handle: _MODULES.pop(handle, None))
    return handle


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


_LIBRARY.impl("module_forward", _module_forward, "CompositeExplicitAutograd")
torch.library.register_fake(OPERATOR, _module_forward_fake, lib=_LIBRARY)


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


__all__ = ["OPERATOR", "OpaqueForward", "module_of", "register"]
