"""`XFPEmbedding`: a token embedding whose table is one stored XFP matrix, decoded row by row on lookup.

The table W_hat: [num_embeddings, embedding_dim] is stored like any XFP matrix (docs/FORMAT.md; rows are
token ids, columns the hidden size) and held as buffers exactly like `XFPLinear`'s (`xfp.runtime.stored`).
A lookup decodes only the rows it asks for, each once: the requested ids, made unique, select their rows
of every per-row part (`select_rows`), and the exact reference decoder (`xfp.format.reference.decode`)
decodes that smaller matrix. Decoding is row-local in both modes (a row's codes, codebook or group
scales, offsets and ids, kept values and outliers make that row and nothing else), so the result is
bit-identical to decoding the whole table and indexing it. Nothing is cached: the memory cost is the packed
table plus, during a call, the decoded float16 rows of the distinct ids of that call (and their index
temporaries), never the dense table.

A tied XFPEmbedding (`XFPEmbedding.tied(lm_head)`) reads the stored tensors of another module, as the
tied `XFPLinear` does.
"""

from __future__ import annotations

import torch
from torch import nn

from xfp.format.reference import Packed, PackedV2, PackedV2a, decode
from xfp.runtime.opaque import OpaqueForward, register
from xfp.runtime.stored import StoredMatrix, dtype_after, layout_kwargs

INDEX_DTYPES = (torch.int32, torch.int64)
"""Token id dtypes a lookup accepts (those nn.Embedding accepts)."""


class TokenLookup(nn.Module):
    """What the modules standing in for a token nn.Embedding share (`XFPEmbedding`, `HalfEmbedding`): rows come
    out in `dtype`, the dtype the dense weight would have had (the model's), which follows `module.to(dtype)`
    and the like while the stored tensors keep theirs; times `scale` for Gemma's `*TextScaledWordEmbedding`
    (the rows cast to `dtype`, then multiplied by `scale` rounded to `dtype`, as there). `padding_idx` is
    kept for code that reads it; as in nn.Embedding it does not change a lookup. Subclasses call
    `_set_output` in their constructor and `_output` on the rows they look up."""

    num_embeddings: int
    embedding_dim: int

    def _set_output(self, padding_idx: int | None, scale: float | None, dtype: torch.dtype | None) -> None:
        self.padding_idx = padding_idx
        self.scale = None if scale is None else float(scale)
        self.dtype = dtype or torch.get_default_dtype()

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dtype not in INDEX_DTYPES:
            raise TypeError(f"{type(self).__name__}: input_ids must be int32 or int64, got {input_ids.dtype}")

    def _output(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.dtype)
        if self.scale is not None:
            rows = rows * torch.tensor(self.scale, dtype=self.dtype, device=rows.device)
        return rows

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self.dtype = dtype_after(fn, self.dtype)
        return result

    def _lookup_repr(self) -> str:
        scale = "" if self.scale is None else f", scale={self.scale:g}"
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}{scale}"


def _select_outliers(pos: torch.Tensor, val: torch.Tensor, rows: torch.Tensor,
                     cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The outliers of the selected rows, renumbered for the sub-matrix of those rows.

    pos: [n] int32 flat positions r*cols+c, strictly increasing (docs/FORMAT.md, checked on load), val: [n],
    rows: [k] int64 sorted, unique -> (pos: [m] int32 positions i*cols+c in the k-row matrix, val: [m])."""
    if pos.numel() == 0 or rows.numel() == 0:
        return pos[:0], val[:0]
    flat = pos.long()
    start = torch.searchsorted(flat, rows * cols)  # each row's outliers are one run of the sorted positions
    count = torch.searchsorted(flat, (rows + 1) * cols) - start
    total = int(count.sum())
    if total == 0:
        return pos[:0], val[:0]
    new_row = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)
    first = torch.cumsum(count, 0) - count  # where each row's run starts in the output
    index = torch.arange(total, device=rows.device) - first[new_row] + start[new_row]
    return (new_row * cols + flat[index] % cols).to(torch.int32), val[index]


def select_rows(packed: Packed, rows: torch.Tensor) -> Packed:
    """The matrix made of rows `rows` ([k] int64, sorted, unique, each in [0, packed.rows)) of `packed`, in
    that order, as a stored matrix of the same mode: decode(select_rows(p, rows)) == decode(p)[rows] exactly.

    Per-row parts are indexed, shared parts (V2a library, tables, kept columns and scales) kept as they are;
    the outliers of the selected rows are renumbered. `packed.outlier_pos` must be strictly increasing, as
    the format requires and the loader checks."""
    k = int(rows.numel())
    pos, val = _select_outliers(packed.outlier_pos, packed.outlier_val, rows, packed.cols)
    if isinstance(packed, PackedV2a):
        ids = packed.ids[rows] if packed.ids.shape[1] else packed.ids[:k]
        return PackedV2a(k, packed.cols, packed.bits, packed.group, packed.codes[rows], packed.library,
                         packed.scale[rows], packed.scale_table, packed.offset[rows], packed.offset_table, ids, pos,
                         val, packed.kept_cols, packed.kept_val[rows], packed.kept_scale)
    return PackedV2(k, packed.cols, packed.bits, packed.codes[rows], packed.codebook[rows], pos, val)


def decode_rows(packed: Packed, ids: torch.Tensor) -> torch.Tensor:
    """ids: [...] integer, each in [0, packed.rows) -> W_hat[ids]: [..., cols] float16, exactly
    `decode(packed)[ids]`, decoding each distinct row once."""
    flat = ids.reshape(-1).to(packed.codes.device, torch.int64)
    rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    if rows.numel() == 0:
        return torch.empty((*ids.shape, packed.cols), dtype=torch.float16, device=packed.codes.device)
    return decode(select_rows(packed, rows))[inverse].reshape(*ids.shape, packed.cols)


class XFPEmbedding(OpaqueForward, TokenLookup, StoredMatrix):
    """y = W_hat[input_ids] (* scale), W_hat: [num_embeddings, embedding_dim] decoded from the stored parts.

    Buffers: those of `make_layout(mode, num_embeddings, embedding_dim, bits, n_outliers, ...)`, as
    `XFPLinear`'s (or none when tied). The output is in `dtype`, the dtype the dense embedding would have
    had: the model's; `module.to(dtype)` and the like change it (the stored float16 parts stay as they are).
    scale: None, or the factor of a scaled embedding (Gemma's multiplies its lookup by `embed_scale`,
    sqrt(hidden_size)); padding_idx: as nn.Embedding's (see `TokenLookup`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, n_outliers: int, *,
                 padding_idx: int | None = None, scale: float | None = None, mode: str = "v2",
                 group: int | None = None, library: int | None = None, kept: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 source: StoredMatrix | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, bits, n_outliers, mode=mode, group=group, library=library,
                         kept=kept, device=device, source=source)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._set_output(padding_idx, scale, dtype)
        self._opaque_handle = register(self)  # one operator under torch.compile (xfp.runtime.opaque)

    @classmethod
    def from_packed(cls, packed: Packed, *, dtype: torch.dtype | None = None, padding_idx: int | None = None,
                    scale: float | None = None) -> "XFPEmbedding":
        """A module holding `packed` (its tensors, not copies): a table of packed.rows embeddings of packed.cols."""
        lay = packed.layout
        module = cls(lay.rows, lay.cols, lay.bits, lay.n_outliers, padding_idx=padding_idx, scale=scale,
                     **layout_kwargs(lay), device="meta", dtype=dtype)
        module._set_packed(packed)  # ValueError unless every part has its layout's dtype and shape
        return module

    @classmethod
    def tied(cls, source: StoredMatrix, *, dtype: torch.dtype | None = None, padding_idx: int | None = None,
             scale: float | None = None) -> "XFPEmbedding":
        """An embedding over the matrix `source` holds (rows = num_embeddings), reading `source`'s tensors on
        every call (no copy; see `xfp.runtime.stored`)."""
        lay = source.layout
        return cls(lay.rows, lay.cols, lay.bits, lay.n_outliers, padding_idx=padding_idx, scale=scale,
                   **layout_kwargs(lay), device="meta", dtype=dtype, source=source)

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [...] int32/int64, each in [0, num_embeddings) -> [..., embedding_dim] in `dtype` (the
        forward).

        Raises TypeError for other id dtypes and IndexError for an id out of range, as nn.Embedding does."""
        self._check_ids(input_ids)
        if input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                raise IndexError(f"XFPEmbedding: index out of range: id {bad} is not in [0, {self.num_embeddings})")
        return self._output(decode_rows(self.packed(), input_ids))

    def output_like(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.new_empty((*input_ids.shape, self.embedding_dim), dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"{self._lookup_repr()}, {self._layout_repr()}, dtype={self.dtype}"


__all__ = ["INDEX_DTYPES", "TokenLookup", "XFPEmbedding", "decode_rows", "select_rows"]
