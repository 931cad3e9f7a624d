"""The fused CPU kernels for V2 and V2a matrices: `y = x @ W_hat.T` straight from the packed tensors.

W_hat is never materialised. Batch rows are handled in two ways:

- up to `FUSED_MAX_M` activation rows (decode, batch 1): `xfp_v2_gemv` walks each matrix row once, turns
  its packed indices into float32 weights in SIMD registers through the row's codebook (a permute for up
  to 6 bits, a gather for 8) and multiplies them into every activation row, then adds the row's outlier
  corrections `(value - codebook[r, index]) * x[col]` (precomputed once per matrix by `prepare`);
- more rows (prefill): blocks of `tile_rows` matrix rows are decoded exactly into a float32 tile that stays
  in cache (1 MiB on one thread below 32 rows of x; else 8 MiB, where BLAS efficiency matters more), and
  multiplied with `torch.mm` (BLAS), block after block. The decoded matrix never exists whole.

Numerics (tested in tests/runtime/test_kernels.py): products and sums are float32. With
`s[r] = sum_c |x[c]| * (|W_hat[r, c]| + |codebook[r, index(r, c)]|)` and `u = 2**-24`, every output of the
fused path obeys `|y[r] - (x @ W_hat.T)[r]| <= (cols + 2 * outliers(r) + 16) * u * s[r]` (the textbook bound
for a float32 dot product of that length; in practice the error is far smaller). The tiled path
multiplies the exact float32 W_hat with BLAS, so its error is BLAS's own. Inputs in bfloat16/float16 are
computed in float32 and rounded once at the end.

Mode V2a (`prepare_v2a`, `V2aState`; same entry points): per group the fused path computes
`s * sum_c e[c] * x[c] + o * sum_c x[c]` (the group sums of x are made once per call), so a coded weight
enters as its exact value `e*s + o`, not rounded to float16 as W_hat is; the outliers add
`(value - (e*s + o)) * x[col]` and the kept columns `kept[r, j] * x[kept_cols[j]]`, x being zeroed there
for the groups (the kept value replaces the decoded one). With `a[r] = sum_c |x_c| |W_hat[r, c]|` and
`b[r] = sum_c |x_c| (|e s| + |o| + |W_hat[r, c]|)`, every output obeys
`|y[r] - (x @ W_hat.T)[r]| <= 2**-11 * (a[r] + 2**-14 * sum_c |x_c|) + (cols + groups + 2 * outliers(r) + kept + 16) * u * b[r]`
(tested in tests/runtime/test_kernels_v2a.py): the first term is float16's own rounding of each weight,
relative 2**-11 (the precision W_hat is stored in), the second the float32 sums. Decoded tiles (prefill)
are exact: `float16(float32(e*s + o))` by the F16C conversion, then outliers, then kept columns. The SIMD
kernels need the group size to be a multiple of their chunk of columns (16..64, so G = 64, 128 and 256 always
qualify); other group sizes take the portable kernel.

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
from collections.abc import Callable
from typing import Union

import torch

from xfp.format.reference import Packed, PackedV2, PackedV2a
from xfp.format.spec import row_bytes

log = logging.getLogger(__name__)

NAME = "cpu"
ISA_ENV_VAR = "XFP_CPU_ISA"
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
"""Instruction sets the library is built for, by the name `XFP_CPU_ISA` takes."""

FUSED_MAX_M = 8
"""Activation rows up to which the fused kernel runs; above it, decoded tiles go through torch.mm."""

TILE_BYTES = (1 << 20, 8 << 20)
"""Bytes of one decoded float32 tile in the prefill path: (small, large). The small tile serves one thread
below TILE_LARGE_M rows of x: bound by decoding, it stays in L2. Larger batches are bound by BLAS, which runs
better on taller tiles (its per-call packing of x amortised); and with more threads BLAS leaves a small
tile's product to one of them (measured: docs/PERFORMANCE.md, the prefill table)."""

TILE_LARGE_M = 32

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Input dtypes the kernels take (computed in float32)."""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _declines(x, stored, bias, handle) -> None:
    return None


fast_linear: Callable = _declines
"""`fast_linear(x, stored, bias, handle) -> Tensor | None`, the eager shortcut of an XFPLinear armed by `arm`
(csrc/python.cpp, once the library is loaded): the armed kernel's output where `xfp::fused_linear` would run
it (the module's buffer dict `stored` holding the very tensors armed, at their versions...), else None. None
always where the library was built without that part (build.OPTIONAL_UNITS)."""


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

    path = str(library_path())  # hashes the sources and asks the compiler its version: once
    lib = ctypes.CDLL(path)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.xfp_isa_supported.argtypes = [ctypes.c_int]
    lib.xfp_isa_supported.restype = ctypes.c_int
    for mode, struct in (("v2", _V2Matrix), ("v2a", _V2aMatrix)):  # the same three entry points per mode
        size = getattr(lib, f"xfp_{mode}_matrix_size")
        size.argtypes, size.restype = [], i64
        if size() != ctypes.sizeof(struct):
            raise RuntimeError(f"{path} does not match this package's {struct.__name__[1:]} layout")
        gemv, decode = getattr(lib, f"xfp_{mode}_gemv"), getattr(lib, f"xfp_{mode}_decode")
        gemv.argtypes, gemv.restype = [ctypes.c_int, p, p, i64, i64, p, i64], ctypes.c_int
        decode.argtypes, decode.restype = [ctypes.c_int, p, i64, i64, p, i64], ctypes.c_int
    lib.xfp_f16_gemv.argtypes, lib.xfp_f16_gemv.restype = [ctypes.c_int, p, i64, i64, p, i64, i64, p, i64], ctypes.c_int
    global fast_linear
    try:
        entry = ctypes.PyDLL(path).xfp_fast_linear_function  # PyDLL: called with the GIL held
    except AttributeError:  # built without python.cpp (logged then): eager calls take xfp::fused_linear
        fast_linear = _declines
    else:
        entry.argtypes, entry.restype = [], ctypes.py_object
        fast_linear = entry()
    return lib


class _V2Matrix(ctypes.Structure):
    """Mirror of `xfp::V2Matrix` (csrc/v2.h): what the C entry points read about one matrix."""

    _fields_ = [("codes", ctypes.c_void_p), ("codebook", ctypes.c_void_p), ("ol_rowptr", ctypes.c_void_p),
                ("ol_col", ctypes.c_void_p), ("ol_delta", ctypes.c_void_p), ("ol_val", ctypes.c_void_p),
                ("row_bytes", ctypes.c_int64), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32),
                ("bits", ctypes.c_int32)]


class _V2aMatrix(ctypes.Structure):
    """Mirror of `xfp::V2aMatrix` (csrc/v2.h)."""

    _fields_ = [(name, ctypes.c_void_p) for name in
                ("codes", "library", "scale", "offset", "ids", "scale_table", "offset_table", "ol_rowptr", "ol_col",
                 "ol_delta", "ol_val", "kept_cols", "kept_w")] + \
               [("row_bytes", ctypes.c_int64)] + \
               [(name, ctypes.c_int32) for name in ("rows", "cols", "bits", "group", "lib", "groups", "kept")]


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
    return device.type == "cpu" and dtype in DTYPES and (_lib is not None or unavailable_reason() is None)


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

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor `matrix` points into (as V2aState.tensors)."""
        return self.ol_rowptr, self.ol_col, self.ol_delta, self.ol_val, self.codes, self.codebook

    def check(self, packed: PackedV2) -> None:  # by storage: a dtype-cast round trip (module.to) makes new views
        if (packed.codes.data_ptr(), packed.codebook.data_ptr()) != (self.source[0].data_ptr(),
                                                                      self.source[1].data_ptr()):
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


@dataclass(frozen=True)
class V2aState:
    """What the kernel derives once per V2a matrix (cached on the module by `dispatch`).

    ol_rowptr: [rows+1] int32, ol_col: [n] int32 (outliers by row; any in a kept column dropped, as the kept
    column wins), ol_delta: [n] float32 = value - (e*s + o) at its position (float64, rounded once),
    ol_val: [n] float32, kept_w: [rows, m] float32 = the decoded kept values, scale_table/offset_table: [256]
    float32. The matrix's own uint8/float16 tensors are read in place (made contiguous once).
    """

    tensors: tuple[torch.Tensor, ...]
    source: tuple[torch.Tensor, torch.Tensor]
    matrix: _V2aMatrix
    address: int

    def check(self, packed: PackedV2a) -> None:
        if (packed.codes.data_ptr(), packed.library.data_ptr()) != (self.source[0].data_ptr(),
                                                                     self.source[1].data_ptr()):
            raise ValueError("this kernel state was prepared for another matrix; call prepare(packed)")


State = Union[V2State, V2aState]


def _check_parts(packed: Packed) -> None:
    if packed.codes.device.type != "cpu":
        raise ValueError(f"the {NAME!r} kernel needs the matrix on the CPU, not {packed.codes.device}")
    expected = packed.layout.tensors()  # the stored dtypes and shapes (the C side reads raw memory)
    for part, (dtype, shape) in expected.items():
        if part == "meta":
            continue
        t = getattr(packed, part)
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"packed.{part} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")


def prepare_v2a(packed: PackedV2a) -> V2aState:
    """Outliers of `packed` by row with their corrections against e*s + o, the kept columns as float32."""
    _check_parts(packed)
    cols, group = packed.cols, packed.group
    pos = packed.outlier_pos.long()
    rows, ocols = pos // cols, pos % cols
    kept = packed.kept_cols.long()
    if kept.numel():  # readers refuse an outlier in a kept column; were one there, the kept column would win
        live = ~torch.isin(ocols, kept)
        pos, rows, ocols = pos[live], rows[live], ocols[live]
        values = packed.outlier_val[live]
    else:
        values = packed.outlier_val
    rowptr = torch.zeros(packed.rows + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(rows, minlength=packed.rows).cumsum(0)
    g = ocols // group
    ids = packed.ids[rows, g].long() if packed.ids.shape[1] else torch.zeros_like(rows)
    e = packed.library[ids, indices_at(packed.codes, packed.bits, rows, ocols)].double()
    s = packed.scale_table[packed.scale[rows, g].long()].double()
    o = packed.offset_table[packed.offset[rows, g].long()].double()
    val = values.double()
    ol_rowptr, ol_col = rowptr.to(torch.int32), ocols.to(torch.int32)
    ol_delta, ol_val = (val - (e * s + o)).float(), val.float()  # e*s + o is exact in float64
    kept_cols = packed.kept_cols.to(torch.int32).contiguous()
    kept_w = packed.kept_values.float().contiguous()
    scale_table, offset_table = packed.scale_table.float().contiguous(), packed.offset_table.float().contiguous()
    codes, library = packed.codes.contiguous(), packed.library.contiguous()
    scale, offset, group_ids = packed.scale.contiguous(), packed.offset.contiguous(), packed.ids.contiguous()
    keep = (ol_rowptr, ol_col, ol_delta, ol_val, kept_cols, kept_w, scale_table, offset_table, codes, library, scale,
            offset, group_ids)
    matrix = _V2aMatrix(codes.data_ptr(), library.data_ptr(), scale.data_ptr(), offset.data_ptr(),
                        group_ids.data_ptr() if packed.library_size > 1 else None, scale_table.data_ptr(),
                        offset_table.data_ptr(), ol_rowptr.data_ptr(), ol_col.data_ptr(), ol_delta.data_ptr(),
                        ol_val.data_ptr(), kept_cols.data_ptr(), kept_w.data_ptr(), row_bytes(cols, packed.bits),
                        packed.rows, cols, packed.bits, group, packed.library_size, packed.layout.groups,
                        int(kept_cols.numel()))
    return V2aState(keep, (packed.codes, packed.library), matrix, ctypes.addressof(matrix))


def prepare_any(packed: Packed) -> State:
    """`prepare` (V2) or `prepare_v2a`, by the matrix's mode."""
    return prepare_v2a(packed) if isinstance(packed, PackedV2a) else prepare(packed)


def gemv(x: torch.Tensor, packed: Packed, state: State, isa_name: str) -> torch.Tensor:
    """x: [m, cols] float32 contiguous -> x @ W_hat.T: [m, rows] float32, fused (any m; best for small m)."""
    state.check(packed)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != packed.cols or not x.is_contiguous():
        raise ValueError(f"x must be float32 contiguous [m, {packed.cols}], got {x.dtype} {list(x.shape)}")
    m = x.shape[0]
    y = torch.empty(m, packed.rows, dtype=torch.float32)
    fn = library().xfp_v2a_gemv if isinstance(state, V2aState) else library().xfp_v2_gemv
    if fn(ISAS[isa_name], state.address, x.data_ptr(), m, packed.cols, y.data_ptr(), packed.rows) != 0:
        raise RuntimeError(f"the {packed.mode} gemv refused its arguments ({packed.rows}x{packed.cols}, "
                           f"{packed.bits} bits)")
    return y


def decode_rows(packed: Packed, state: State, r0: int, r1: int, out: torch.Tensor, isa_name: str) -> None:
    """out[: r1 - r0] = W_hat[r0:r1] as float32 (exact); out: [>= r1-r0, cols] float32 contiguous."""
    state.check(packed)
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape[0] < r1 - r0 or out.shape[1] != packed.cols:
        raise ValueError(f"out must be float32 contiguous [>= {r1 - r0}, {packed.cols}], got {out.dtype} "
                         f"{list(out.shape)}")
    fn = library().xfp_v2a_decode if isinstance(state, V2aState) else library().xfp_v2_decode
    if fn(ISAS[isa_name], state.address, r0, r1, out.data_ptr(), packed.cols) != 0:
        raise RuntimeError(f"the {packed.mode} decode refused its arguments (rows {r0}:{r1} of {packed.rows})")


def tile_rows(cols: int, m: int) -> int:
    """Matrix rows per decoded tile for m activation rows at torch's thread count: TILE_BYTES of float32, a
    multiple of 16, >= 16."""
    nbytes = TILE_BYTES[m >= TILE_LARGE_M or torch.get_num_threads() > 1]
    return max(16, nbytes // (4 * cols) // 16 * 16)


def by_tiles(x: torch.Tensor, rows: int, fill: Callable[[int, int, torch.Tensor], None]) -> torch.Tensor:
    """x: [m, cols] float32 contiguous -> x @ W.T: [m, rows] float32, W never whole: fill(r0, r1, tile) writes
    W[r0:r1] as float32 into tile[: r1 - r0] (a `tile_rows`-row buffer), which torch.mm multiplies, block
    after block."""
    m, cols = x.shape
    step = min(rows, tile_rows(cols, m))
    tile = torch.empty(step, cols, dtype=torch.float32)
    yt = torch.empty(rows, m, dtype=torch.float32)  # y transposed: row blocks are contiguous
    xt = x.t()
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        fill(r0, r1, tile)
        torch.mm(tile[: r1 - r0], xt, out=yt[r0:r1])
    return yt.t().contiguous()


def tiled(x: torch.Tensor, packed: Packed, state: State, isa_name: str) -> torch.Tensor:
    """x: [m, cols] float32 contiguous -> [m, rows] float32, by decoded tiles and torch.mm."""
    return by_tiles(x, packed.rows, lambda r0, r1, tile: decode_rows(packed, state, r0, r1, tile, isa_name))


def linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None, state: State) -> torch.Tensor:
    """x: [..., cols] float32/bfloat16/float16 on the CPU -> x @ W_hat.T (+ bias): [..., rows] in x's dtype."""
    return runner(packed, state)(x, bias)


def runner(packed: Packed, state: State) -> Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]:
    """The product with this one matrix, the instruction set chosen now and its per-call checks done once:
    (x: [..., cols] float32/bfloat16/float16, bias) -> x @ W_hat.T + bias: [..., rows] in x's dtype, fused
    up to FUSED_MAX_M rows of x, by decoded tiles above. `linear` makes one per call; `dispatch.FastPath`
    keeps one and re-checks what it assumes."""
    state.check(packed)
    isa_name = isa()
    code, address, rows, cols = ISAS[isa_name], state.address, packed.rows, packed.cols
    fused = library().xfp_v2a_gemv if isinstance(state, V2aState) else library().xfp_v2_gemv
    f32 = torch.float32

    def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if shape[-1] != cols:
            raise ValueError(f"x has {shape[-1]} features, the matrix has {cols} columns")
        if dtype is not f32 or not x.is_contiguous():
            x = x.to(f32).contiguous()
        m = x.numel() // cols
        if m <= FUSED_MAX_M:  # written straight in the output's shape: no reshape or view on decode's path
            y = torch.empty(*shape[:-1], rows, dtype=f32)
            if fused(code, address, x.data_ptr(), m, cols, y.data_ptr(), rows) != 0:
                raise RuntimeError(f"the {packed.mode} gemv refused its arguments ({rows}x{cols})")
        else:
            y = tiled(x.view(m, cols), packed, state, isa_name).view(*shape[:-1], rows)
        if bias is not None:
            y += bias if bias.dtype is f32 else bias.to(f32)
        return y if dtype is f32 else y.to(dtype)

    return run


def arm(handle: int, state: State, stored: list[torch.Tensor]) -> None:
    """Let `xfp::fused_linear(x, stored, bias, handle)` (csrc/ops.cpp) run this matrix's fused GEMV without
    Python, for as long as `stored` (the module's stored tensors, in the order the calls will pass them) are
    the same tensors at the same in-place versions and `$XFP_KERNEL` and `$XFP_CPU_ISA` are unchanged: the
    same conditions as `dispatch.FastPath`, checked in C++. The operator keeps references to `stored` and
    to the state's tensors until `opaque.disarm(handle)` or the next `arm` of the handle."""
    torch.ops.xfp.arm(handle, int(isinstance(state, V2aState)), ISAS[isa()], state.address, state.matrix.rows,
                      state.matrix.cols, FUSED_MAX_M, list(state.tensors), stored)


def half_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [..., cols] float32/bfloat16/float16 on the CPU, weight: [rows, cols] float16 (a dense matrix kept at
    its stored precision) -> x @ weight.float().T: [..., rows] in x's dtype, computed in float32.

    Up to FUSED_MAX_M rows of x: `xfp_f16_gemv` converts the float16 weights in registers (the float32 copy of
    the matrix never exists), each output a float32 dot product of length cols (error within
    `(cols + 16) * 2**-24 * sum_c |x_c| |w[r, c]|`, tested). More rows: float32 tiles of `tile_rows` rows
    (exact conversions) through torch.mm (`by_tiles`, as the tiled XFP path)."""
    rows, cols = weight.shape
    if weight.dtype != torch.float16 or x.shape[-1] != cols:
        raise ValueError(f"weight must be float16 [rows, {x.shape[-1]}], got {weight.dtype} {list(weight.shape)}")
    shape, dtype = x.shape, x.dtype
    x = x.to(torch.float32).contiguous()
    weight = weight.contiguous()
    m = x.numel() // cols
    if m <= FUSED_MAX_M:
        y = torch.empty(*shape[:-1], rows, dtype=torch.float32)
        if library().xfp_f16_gemv(ISAS[isa()], weight.data_ptr(), rows, cols, x.data_ptr(), m, cols, y.data_ptr(),
                                  rows) != 0:
            raise RuntimeError(f"the float16 gemv refused its arguments ({rows}x{cols}, {m} rows of x)")
    else:
        y = by_tiles(x.view(m, cols), rows, lambda r0, r1, tile: tile[: r1 - r0].copy_(weight[r0:r1]))
        y = y.view(*shape[:-1], rows)
    return y if dtype is torch.float32 else y.to(dtype)


__all__ = ["DTYPES", "FUSED_MAX_M", "ISAS", "ISA_ENV_VAR", "NAME", "State", "V2State", "V2aState", "arm", "by_tiles",
           "decode_rows", "gemv", "half_linear", "indices_at", "isa", "library", "linear", "prepare", "prepare_any",
           "prepare_v2a", "runner", "supported_isas", "supports", "tiled", "unavailable_reason"]
