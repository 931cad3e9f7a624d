"""Dense matrices kept at their stored float16 precision in a float32 model: `HalfEmbedding`, `HalfLinear`.

An XFP folder stores the matrices it does not quantize (by default the token embedding, which SmolLM2 and
Gemma tie to their lm_head) in float16. Loaded into a float32 model, transformers would widen such a
matrix to float32: twice its stored bytes in memory, and twice the bytes every decode step's lm_head reads.
These modules hold the float16 tensor itself (a buffer, so `model.dtype`, the first floating *parameter*,
stays the model's) and compute in float32 from it:

- `HalfEmbedding`: `weight[ids]`, cast to `dtype` (the model's; it follows `module.to(dtype)` like a dense
  weight would, while the stored float16 tensor keeps its dtype), times `scale` for Gemma's scaled embedding,
  exactly as nn.Embedding / `*TextScaledWordEmbedding` compute on the widened weight;
- `HalfLinear`: `x @ weight.float().T`, by the fused float16 GEMV of the CPU kernels
  (`xfp.runtime.kernels.cpu.half_linear`) where `xfp.runtime.dispatch` picks them, else by the reference
  `F.linear` on the widened weight. Float32 sums either way: the products are those of the widened weight,
  only the order of the additions differs. `HalfLinear.tied(embedding)` reads a HalfEmbedding's weight
  (the tied lm_head; no second copy, not a submodule: see `xfp.runtime.stored`).

Widening float16 to float32 is exact, so the model computes with the very values the folder stores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xfp.runtime import dispatch
from xfp.runtime.embedding import TokenLookup
from xfp.runtime.kernels import cpu as _cpu
from xfp.runtime.opaque import OpaqueForward, register
from xfp.runtime.stored import float16_held


class HalfEmbedding(TokenLookup):
    """y = weight[input_ids] in `dtype` (* scale), weight: [num_embeddings, embedding_dim] float16, a buffer.

    dtype, scale and padding_idx as `XFPEmbedding`'s (`xfp.runtime.embedding.TokenLookup`)."""

    def __init__(self, weight: torch.Tensor, *, dtype: torch.dtype | None = None, padding_idx: int | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        if weight.dtype != torch.float16 or weight.dim() != 2:
            raise ValueError(f"weight must be a float16 matrix, got {weight.dtype} {list(weight.shape)}")
        self.register_buffer("weight", weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self._set_output(padding_idx, scale, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [...] int32/int64 in [0, num_embeddings) -> [..., embedding_dim] in `dtype`; IndexError
        for an id out of range, as nn.Embedding."""
        self._check_ids(input_ids)
        return self._output(F.embedding(input_ids, self.weight))

    def _apply(self, fn, recurse: bool = True):
        with float16_held(self._buffers, ["weight"]):
            return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self._lookup_repr()}, stored=float16, dtype={self.dtype}"


class HalfLinear(OpaqueForward, nn.Module):
    """y = x @ weight.float().T, weight: [out_features, in_features] float16, its own buffer or (tied) the
    weight of a HalfEmbedding. The output has x's dtype. No bias (an lm_head has none)."""

    def __init__(self, weight: torch.Tensor | None = None, *, source: HalfEmbedding | None = None) -> None:
        super().__init__()
        if (weight is None) == (source is None):
            raise ValueError("give either weight or source")
        if source is not None and not isinstance(source, HalfEmbedding):
            raise ValueError(f"source must be a HalfEmbedding, got {type(source).__name__}")
        object.__setattr__(self, "_source", source)  # not a submodule: not in state_dict, named_modules, .to()
        if weight is not None:
            if weight.dtype != torch.float16 or weight.dim() != 2:
                raise ValueError(f"weight must be a float16 matrix, got {weight.dtype} {list(weight.shape)}")
            self.register_buffer("weight", weight)
        self.out_features, self.in_features = (weight if weight is not None else source.weight).shape
        self.bias = None
        self._opaque_handle = register(self)  # one operator under torch.compile (xfp.runtime.opaque)

    @classmethod
    def tied(cls, embedding: HalfEmbedding) -> "HalfLinear":
        """The lm_head reading `embedding`'s weight on every call (no copy)."""
        return cls(source=embedding)

    @property
    def is_tied(self) -> bool:
        return self._source is not None

    def half_weight(self) -> torch.Tensor:
        """The float16 matrix this module multiplies with (its own, or its source's)."""
        return self._buffers["weight"] if self._source is None else self._source._buffers["weight"]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype (the forward)."""
        w = self.half_weight()
        if dispatch.select(x.device, x.dtype) is dispatch.CPU and w.is_cpu and not (
                x.requires_grad and torch.is_grad_enabled()):
            return _cpu.half_linear(x, w)
        return F.linear(x, w.to(x.dtype))

    def output_like(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], self.out_features))

    def _apply(self, fn, recurse: bool = True):
        with float16_held(self._buffers, ["weight"]):
            return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        tied = ", tied" if self.is_tied else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, stored=float16{tied}"


__all__ = ["HalfEmbedding", "HalfLinear"]
