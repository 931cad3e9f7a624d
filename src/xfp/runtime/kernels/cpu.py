"""The fused CPU kernel for V2 matrices: `y = x @ W_hat.T` straight from the packed tensors.

W_hat is never materialised. Batch rows are handled in two ways:

- up to `FUSED_MAX_M` activation rows (decode, batch 1): `xfp_v2_gemv` walks each matrix row once, turns
  its packed indices into float32 weights in SIMD registers through the row's codebook (a permute for up
  to 6 bits, a gather for 8) and multiplies them into every activation row, then adds the row's outlier
  corrections `(value - codebook[r, index]) * x[col]` (precomputed once per matrix by `prepare`);
- more rows (prefill): blocks of `tile_rows` matrix rows are decoded exactly into a float32 tile that stays
  in cache (1 MiB; 8 MiB from 64 rows on, where BLAS efficiency matters more), and multiplied with
  `torch.mm` (BLAS), block after block. The decoded matrix never exists whole.

Numerics (tested in tests/runtime/test_kernels.py): products and sums are float32. With
`s[r] = sum_c |x[c]| * (|W_hat[r, c]| + |codebook[r, index(r, c)]|)` and `u = 2**-24`, every output of the
fused path obeys `|y[r] - (x @ W_hat.T)[r]| <= (cols + 2 * outliers(r) + 16) * u * s[r]` (the textbook bound
for a float32 dot product of that length; in practice the error is far smaller). The tiled path
multiplies the exact float32 W_hat with BLAS, so its error is BLAS's own. Inputs in bfloat16/float16 are
computed in float32 and rounded once at the end.

Instruction set: chosen at run time, the best this CPU supports (AVX-512, else AVX2, else portable C++);
`XFP_CPU_ISA=avx512|avx2|scalar` forces one (tests use it to cover every path on one machine).
Threads: torch's own pool (`torch.set_num_threads`); each output row is computed by one thread in a fixed
order, so results do not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass

import torch

from xfp.format.reference import PackedV2
from xfp.format.spec import row_bytes

log = logging.getLogger(__name__)

NAME = "cpu"
ISA_ENV_VAR = "XFP_CPU_ISA"
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
"""Instruction sets the library is built for, by the name `XFP_CPU_ISA` takes."""

FUSED_MAX_M = 8
"""Activation rows up to which the fused kernel runs; above it, decoded tiles go through torch.mm."""

TILE_BYTES = (1 << 20, 8 << 20)
"""Bytes of one decoded float32 tile in the prefill path: (below TILE_LARGE_M rows of x, from it on).
Small batches are bound by decoding, so the tile stays in L2; large ones by BLAS, which runs better (its
per-call packing of x amortised) on taller tiles (measured: docs/PERFORMANCE.md)."""

TILE_LARGE_M = 64

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def library() -> ctypes.CDLL:
    """The compiled kernels (built on first use, then cached on disk). Raises RuntimeError if unavailable."""
    global _lib, _error
    if _lib is None and _error is None:
        with _lock:
            if _lib is None and _error is None:
                try:
                    _lib = _load()
                except Exception as exc:  # no compiler, failed build...: the reference path applies
                    _error = f"{type(exc).__name__}: {exc}"
                    log.warning("XFP: the fused CPU kernel is unavailable, using the reference kernel (%s)",
                                _error)
    if _lib is None:
        raise RuntimeError(f"the {NAME!r} kernel is unavailable: {_error}")
    return _lib


def unavailable_reason() -> str | None:
    """None if the kernels load (building them if needed), else why not."""
    try:
        library()
    except RuntimeError:
        return _error
    return None


def _load() -> ctypes.CDLL:
    from xfp.runtime.kernels.build import library_path

    lib = ctypes.CDLL(str(library_path()))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.xfp_isa_supported.argtypes = [ctypes.c_int]
    lib.xfp_isa_supported.restype = ctypes.c_int
    lib.xfp_v2_matrix_size.argtypes = []
    lib.xfp_v2_matrix_size.restype = i64
    if lib.xfp_v2_matrix_size() != ctypes.sizeof(_V2Matrix):
        raise RuntimeError(f"{library_path()} does not match this package's V2Matrix layout")
    lib.xfp_v2_gemv.argtypes = [ctypes.c_int, p, p, i64, i64, p, i64]
    lib.xfp_v2_gemv.restype = ctypes.c_int
    lib.xfp_v2_decode.argtypes = [ctypes.c_int, p, i64, i64, p, i64]
    lib.xfp_v2_decode.restype = ctypes.c_int
    return lib


class _V2Matrix(ctypes.Structure):
    """Mirror of `xfp::V2Matrix` (csrc/v2.h): what the C entry points read about one matrix."""

    _fields_ = [("codes", ctypes.c_void_p), ("codebook", ctypes.c_void_p), ("ol_rowptr", ctypes.c_void_p),
                ("ol_col", ctypes.c_void_p), ("ol_delta", ctypes.c_void_p), ("ol_val", ctypes.c_void_p),
                ("row_bytes", ctypes.c_int64), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32),
                ("bits", ctypes.c_int32)]


_supported: list[str] | None = None


def supported_isas() -> list[str]:
    """The instruction sets this CPU runs (and the library contains), best last."""
    global _supported
    if _supported is None:
        lib = library()
        _supported = [name for name, code in ISAS.items() if lib.xfp_isa_supported(code)]
    return list(_supported)


def isa() -> str:
    """`$XFP_CPU_ISA` if set (and supported), else the best supported instruction set."""
    have = _supported if _supported is not None else supported_isas()
    wanted = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not wanted or wanted == "auto":
        return have[-1]
    if wanted not in have:
        if wanted not in ISAS:
            raise ValueError(f"{ISA_ENV_VAR}={wanted!r} is not an instruction set; choose one of {['auto', *ISAS]}")
        raise ValueError(f"{ISA_ENV_VAR}={wanted!r}: this CPU (or build) runs only {have}")
    return wanted


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU tensors in float32/bfloat16/float16, where the kernels compile and load."""
    return device.type == "cpu" and dtype in _DTYPES and (_lib is not None or unavailable_reason() is None)


@dataclass(frozen=True)
class V2State:
    """What the kernel derives once per matrix (cached on the module by `dispatch`).

    ol_rowptr: [rows+1] int32, ol_col: [n] int32 (outliers of row r are ol_rowptr[r]:ol_rowptr[r+1]),
    ol_delta: [n] float32 = value - codebook[r, index(r, col)] (added by the fused product),
    ol_val: [n] float32 = value (written into decoded tiles).
    codes, codebook: the matrix's own tensors (contiguous), kept alive for `matrix`, the C view of it all;
    source: the PackedV2 tensors it was made from (a state only serves the matrix it was made for).
    """

    ol_rowptr: torch.Tensor
    ol_col: torch.Tensor
    ol_delta: torch.Tensor
    ol_val: torch.Tensor
    codes: torch.Tensor
    codebook: torch.Tensor
    source: tuple[torch.Tensor, torch.Tensor]
    matrix: _V2Matrix
    address: int

    def check(self, packed: PackedV2) -> None:
        if packed.codes is not self.source[0] or packed.codebook is not self.source[1]:
            raise ValueError("this kernel state was prepared for another matrix; call prepare(packed)")


def indices_at(codes: torch.Tensor, bits: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """codes: [R, ceil(C*bits/8)] uint8; rows, cols: [n] int64 -> the stored indices there: [n] int64."""
    bit = cols * bits
    byte = bit >> 3
    nbytes = codes.shape[1]
    lo = codes[rows, byte].long()
    hi = codes[rows, (byte + 1).clamp(max=nbytes - 1)].long() * (byte + 1 < nbytes)
    return ((lo | (hi << 8)) >> (bit & 7)) & ((1 << bits) - 1)


def prepare(packed: PackedV2) -> V2State:
    """Outliers of `packed` by row, with their corrections against the codebook (float64, rounded once)."""
    if packed.codes.device.type != "cpu":
        raise ValueError(f"the {NAME!r} kernel needs the matrix on the CPU, not {packed.codes.device}")
    expected = packed.layout.tensors()  # the stored dtypes and shapes (the C side reads raw memory)
    for part in ("codes", "codebook", "outlier_pos", "outlier_val"):
        t = getattr(packed, part)
        dtype, shape = expected[part]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"packed.{part} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    pos = packed.outlier_pos.long()
    rows, cols = pos // packed.cols, pos % packed.cols
    rowptr = torch.zeros(packed.rows + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(rows, minlength=packed.rows).cumsum(0)
    index = indices_at(packed.codes, packed.bits, rows, cols)
    base = packed.codebook[rows, index].double()
    val = packed.outlier_val.double()
    ol_rowptr, ol_col = rowptr.to(torch.int32), cols.to(torch.int32)
    ol_delta, ol_val = (val - base).float(), val.float()
    codes, codebook = packed.codes.contiguous(), packed.codebook.contiguous()
    matrix = _V2Matrix(codes.data_ptr(), codebook.data_ptr(), ol_rowptr.data_ptr(), ol_col.data_ptr(),
                       ol_delta.data_ptr(), ol_val.data_ptr(), row_bytes(packed.cols, packed.bits), packed.rows,
                       packed.cols, packed.bits)
    return V2State(ol_rowptr, ol_col, ol_delta, ol_val, codes, codebook, (packed.codes, packed.codebook), matrix,
                   ctypes.addressof(matrix))


def gemv(x: torch.Tensor, packed: PackedV2, state: V2State, isa_name: str) -> torch.Tensor:
    """x: [m, cols] float32 contiguous -> x @ W_hat.T: [m, rows] float32, fused (any m; best for small m)."""
    state.check(packed)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != packed.cols or not x.is_contiguous():
        raise ValueError(f"x must be float32 contiguous [m, {packed.cols}], got {x.dtype} {list(x.shape)}")
    m = x.shape[0]
    y = torch.empty(m, packed.rows, dtype=torch.float32)
    if library().xfp_v2_gemv(ISAS[isa_name], state.address, x.data_ptr(), m, packed.cols, y.data_ptr(),
                             packed.rows) != 0:
        raise RuntimeError(f"xfp_v2_gemv refused its arguments ({packed.rows}x{packed.cols}, {packed.bits} bits)")
    return y


def decode_rows(packed: PackedV2, state: V2State, r0: int, r1: int, out: torch.Tensor, isa_name: str) -> None:
    """out[: r1 - r0] = W_hat[r0:r1] as float32 (exact); out: [>= r1-r0, cols] float32 contiguous."""
    state.check(packed)
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape[0] < r1 - r0 or out.shape[1] != packed.cols:
        raise ValueError(f"out must be float32 contiguous [>= {r1 - r0}, {packed.cols}], got {out.dtype} "
                         f"{list(out.shape)}")
    if library().xfp_v2_decode(ISAS[isa_name], state.address, r0, r1, out.data_ptr(), packed.cols) != 0:
        raise RuntimeError(f"xfp_v2_decode refused its arguments (rows {r0}:{r1} of {packed.rows})")


def tile_rows(cols: int, m: int) -> int:
    """Matrix rows per decoded tile for m activation rows: TILE_BYTES of float32, a multiple of 16, >= 16."""
    nbytes = TILE_BYTES[m >= TILE_LARGE_M]
    return max(16, nbytes // (4 * cols) // 16 * 16)


def tiled(x: torch.Tensor, packed: PackedV2, state: V2State, isa_name: str) -> torch.Tensor:
    """x: [m, cols] float32 contiguous -> [m, rows] float32, by decoded tiles and torch.mm."""
    step = min(packed.rows, tile_rows(packed.cols, x.shape[0]))
    tile = torch.empty(step, packed.cols, dtype=torch.float32)
    yt = torch.empty(packed.rows, x.shape[0], dtype=torch.float32)  # y transposed: row blocks are contiguous
    xt = x.t()
    for r0 in range(0, packed.rows, step):
        r1 = min(packed.rows, r0 + step)
        decode_rows(packed, state, r0, r1, tile, isa_name)
        torch.mm(tile[: r1 - r0], xt, out=yt[r0:r1])
    return yt.t().contiguous()


def linear(x: torch.Tensor, packed: PackedV2, bias: torch.Tensor | None, state: V2State) -> torch.Tensor:
    """x: [..., cols] float32/bfloat16/float16 on the CPU -> x @ W_hat.T (+ bias): [..., rows] in x's dtype."""
    cols = packed.cols
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} features, the matrix has {cols} columns")
    x2 = x.reshape(-1, cols)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    chosen = isa()
    y = gemv(x2, packed, state, chosen) if x2.shape[0] <= FUSED_MAX_M else tiled(x2, packed, state, chosen)
    if bias is not None:
        y += bias.to(torch.float32)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], packed.rows)


__all__ = ["FUSED_MAX_M", "ISAS", "ISA_ENV_VAR", "NAME", "V2State", "decode_rows", "gemv", "indices_at", "isa",
           "library", "linear", "prepare", "supported_isas", "supports", "tiled", "unavailable_reason"]
