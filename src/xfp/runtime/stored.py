"""`StoredMatrix`: the part every XFP module shares, one stored matrix held as buffers (or another's, tied).

A module holds the stored tensors of one matrix, mode V2 or V2a (docs/FORMAT.md), as buffers named exactly
like the file's tensors (`<module>.xfp_codes`, `.xfp_codebook`, ..., `.xfp_meta`), sized from the layout
table (`xfp.format.spec`), so a folder's state dict loads into it with no renaming. The float16 parts keep
their dtype through `module.to(dtype)`, `.half()`, `.bfloat16()`...: they are the stored matrix, and a cast
would change it. Device moves apply to them as usual.

A *tied* module (`source=`) holds no buffers: it reads those of `source`, another StoredMatrix, on every
call. It is how one stored matrix serves as both the token embedding and the lm_head of a model with tied
word embeddings: no second copy, and moving `source` to another device moves what the tied module reads.
`source` is not a submodule (it is not in the tied module's state dict, `named_modules` or `.to()`): it is
held by the model where it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from xfp.errors import FormatError
from xfp.format.io import validate_matrix
from xfp.format.reference import Packed, PackedV2, PackedV2a
from xfp.format.spec import Layout, make_layout, tensor_name

BUFFER_PREFIX = "xfp_"


def buffer_name(part: str) -> str:
    """`codes` -> `xfp_codes`: the buffer (and state-dict suffix) of one stored part."""
    return f"{BUFFER_PREFIX}{part}"


def layout_kwargs(layout: Layout) -> dict:
    """The keyword arguments beyond (rows, cols, bits, n_outliers) that rebuild `layout` with `make_layout`:
    {"mode"} plus, in mode v2a, {"group", "library", "kept"}."""
    entry = layout.entry()
    return {"mode": layout.mode, "group": entry.get("group"), "library": entry.get("library"),
            "kept": entry.get("kept")}


@contextmanager
def float16_held(buffers: dict[str, torch.Tensor], names: Iterable[str]) -> Iterator[None]:
    """While inside, the float16 buffers `names` of a module's `buffers` are presented as int16 views, so the
    dtype casts of `module._apply` (`to(dtype)`, `.half()`, `.float()`) skip them while device moves and
    `to_empty` still apply; the bit patterns are untouched either way."""
    names = [n for n in names if n in buffers and buffers[n] is not None]
    for name in names:
        buffers[name] = buffers[name].view(torch.int16)
    try:
        yield
    finally:
        for name in names:
            buffers[name] = buffers[name].view(torch.float16)


def dtype_after(fn, dtype: torch.dtype) -> torch.dtype:
    """The dtype a float tensor of `dtype` has after `fn`, one of `module._apply`'s functions: how a module
    whose output dtype is an attribute follows the casts a dense weight would see."""
    return fn(torch.empty(0, dtype=dtype)).dtype


class StoredMatrix(nn.Module):
    """One stored matrix W_hat: [rows, cols] as buffers (see the module doc); subclasses add the forward.

    rows, cols, bits, n_outliers and the mode's fields (group, library, kept) size the buffers from
    `make_layout`; a bad combination raises ValueError. With `source`, the module holds no buffers and reads
    those of `source`, whose layout must be this one.
    """

    def __init__(self, rows: int, cols: int, bits: int, n_outliers: int, *, mode: str = "v2",
                 group: int | None = None, library: int | None = None, kept: int | None = None,
                 device: torch.device | str | None = None, source: "StoredMatrix | None" = None) -> None:
        super().__init__()
        layout = make_layout(mode, rows, cols, bits, n_outliers, group=group, library=library, kept=kept)
        self.layout: Layout = layout
        self.bits = bits
        if source is not None:
            if not isinstance(source, StoredMatrix) or source.is_tied:
                raise ValueError(f"source must be a StoredMatrix holding its own buffers, got {type(source).__name__}")
            if source.layout != layout:
                raise ValueError(f"source holds a {source.layout}, this module needs a {layout}")
        object.__setattr__(self, "_source", source)  # not a submodule: not in state_dict, named_modules, .to()
        if source is None:
            for part, (part_dtype, shape) in layout.tensors().items():
                self.register_buffer(buffer_name(part), torch.zeros(shape, dtype=part_dtype, device=device))
            self.xfp_meta = layout.meta().to(device)

    @property
    def mode(self) -> str:
        return self.layout.mode

    @property
    def source(self) -> "StoredMatrix | None":
        """The module whose buffers a tied module reads; None when this module holds its own."""
        return self._source

    @property
    def is_tied(self) -> bool:
        return self._source is not None

    @property
    def stored(self) -> dict[str, torch.Tensor]:
        """buffer name -> tensor of the stored matrix: this module's buffers, or its source's (tied)."""
        source = self._source
        return self._buffers if source is None else source._buffers

    @property
    def n_outliers(self) -> int:
        return int(self.stored["xfp_outlier_pos"].numel())

    def packed(self) -> Packed:
        """The stored matrix (the held tensors, not copies)."""
        b = self.stored  # direct: this runs on every forward, and Module.__getattr__ is slow
        lay = self.layout
        if lay.mode == "v2a":
            return PackedV2a(lay.rows, lay.cols, lay.bits, lay.group, b["xfp_codes"], b["xfp_library"], b["xfp_scale"],
                             b["xfp_scale_table"], b["xfp_offset"], b["xfp_offset_table"], b["xfp_ids"],
                             b["xfp_outlier_pos"], b["xfp_outlier_val"], b["xfp_kept_cols"], b["xfp_kept_val"],
                             b["xfp_kept_scale"])
        return PackedV2(lay.rows, lay.cols, lay.bits, b["xfp_codes"], b["xfp_codebook"], b["xfp_outlier_pos"],
                        b["xfp_outlier_val"])

    def _set_packed(self, packed: Packed) -> None:
        """Hold `packed`'s tensors (not copies) as the buffers; its layout must be this module's."""
        if packed.layout != self.layout:
            raise ValueError(f"packed is a {packed.layout}, this module holds a {self.layout}")
        parts = packed.tensors()
        for part, (dtype, shape) in self.layout.tensors().items():
            t = parts[part]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"packed.{part} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
        for part in self.layout.parts:
            setattr(self, buffer_name(part), parts[part].to(packed.codes.device))

    def validate(self, path: str | Path, name: str) -> Packed:
        """Check the held tensors against docs/FORMAT.md and this module's layout, or raise FormatError.

        path: the file or folder named in messages; name: the matrix's stored weight name
        (`model.layers.0.mlp.up_proj.weight`).
        """
        b = self.stored
        parts = {part: b[buffer_name(part)] for part in self.layout.parts}
        packed = validate_matrix(Path(path), name, parts)
        lay = self.layout
        stored = (packed.rows, packed.cols, packed.bits)
        expected = (lay.rows, lay.cols, lay.bits)
        if stored != expected:
            raise FormatError(path, tensor_name(name, "meta"),
                              f"says {stored[0]}x{stored[1]} at {stored[2]} bits, but the layer is "
                              f"{expected[0]}x{expected[1]} at {expected[2]} bits")
        shape_keys = ("mode", "group", "library", "kept")
        stored_kind = {k: v for k, v in packed.layout.entry().items() if k in shape_keys}
        expected_kind = {k: v for k, v in lay.entry().items() if k in shape_keys}
        if stored_kind != expected_kind:
            raise FormatError(path, tensor_name(name, "meta"),
                              f"says {stored_kind}, but the layer was built for {expected_kind}")
        return packed

    def _apply(self, fn, recurse: bool = True):
        # The float16 parts keep their dtype (float16_held). A tied module holds no parts: its source moves them.
        float16 = [buffer_name(part) for part, (dtype, _) in self.layout.tensors().items() if dtype == torch.float16]
        with float16_held(self._buffers, float16):
            return super()._apply(fn, recurse)

    def _layout_repr(self) -> str:
        entry = self.layout.entry()
        extra = (f", mode=v2a, group={entry['group']}, library={entry['library']}, kept={entry['kept']}"
                 if self.mode == "v2a" else "")
        tied = ", tied" if self.is_tied else ""
        return f"bits={self.bits}, outliers={self.n_outliers}{extra}{tied}"


__all__ = ["BUFFER_PREFIX", "StoredMatrix", "buffer_name", "dtype_after", "float16_held", "layout_kwargs"]
