"""Calibration-free baselines, with honest sizes from the same byte arithmetic as XFP.

Every baseline quantizes groups of `group` consecutive weights along the input dimension of each row
(a ragged last group is its own group), and its stored bytes are counted like XFP's (docs/FORMAT.md §5):
indices packed densely per row (`xfp.format.spec.row_bytes`: ceil(cols*bits/8) bytes a row), plus every
per-group parameter at the precision it is stored in. No per-matrix metadata is counted for baselines
(XFP counts its 16-byte meta tensor), which favours the baselines by 128 bits a matrix.

- RTN asymmetric: per group a float16 scale and a float16 offset (the group minimum); index
  q = round((w - min) / scale) in [0, 2^b - 1]; w_hat = q * scale + min.
- NF (QLoRA "NormalFloat") absmax: per group one float16 absmax; index = the nearest entry of a fixed
  table of 2^b values in [-1, 1]; w_hat = table[q] * absmax. NF4 is bitsandbytes' table; `nf_table(b)`
  derives any width the same way (see there). bitsandbytes stores absmax as float32 (or double-quantizes
  it); float16 here.
- HQQ (the `hqq` package's half-quadratic solver, `Quantizer.quantize(optimize=True)`): per group a
  scale and a zero point stored as float16 (what `HQQLinear` keeps with compute_dtype float16; no
  quant_scale / quant_zero), w_hat = (q - zero) * scale from those float16 values. HQQ's own packing
  stores 3-bit indices 10 per int32 (3.2 bits); here they are counted densely, like everyone else's.
"""

from __future__ import annotations

import math

import torch

from xfp.errors import XFPError
from xfp.format.spec import row_bytes

FP16_BYTES = 2

NF4_BITSANDBYTES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
"""bitsandbytes' NF4 code (`bitsandbytes.functional.get_4bit_type("nf4")`), as published."""


# -- byte arithmetic ------------------------------------------------------------------------------


def groups_per_row(cols: int, group: int) -> int:
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}")
    return math.ceil(cols / group)


def index_bytes(rows: int, cols: int, bits: int) -> int:
    """Densely packed indices, every row starting on a byte boundary (as XFP's codes)."""
    return rows * row_bytes(cols, bits)


def rtn_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    """RTN asymmetric (and HQQ): indices + a float16 scale and a float16 offset per group."""
    return index_bytes(rows, cols, bits) + rows * groups_per_row(cols, group) * 2 * FP16_BYTES


def nf_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    """NF absmax: indices + one float16 absmax per group."""
    return index_bytes(rows, cols, bits) + rows * groups_per_row(cols, group) * FP16_BYTES


# -- grouping -------------------------------------------------------------------------------------


def _grouped(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [rows, cols] -> (x: [rows, groups, group] float32 padded with NaN, valid: same shape bool)."""
    rows, cols = w.shape
    groups = groups_per_row(cols, group)
    pad = groups * group - cols
    x = torch.nn.functional.pad(w.float(), (0, pad), value=float("nan")).reshape(rows, groups, group)
    return x, ~torch.isnan(x)


def _ungrouped(x: torch.Tensor, cols: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)[:, :cols].contiguous()


# -- RTN ------------------------------------------------------------------------------------------


def rtn_asymmetric_matrix(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """w: [rows, cols] -> W_hat: [rows, cols] float32, round-to-nearest with float16 scale and min per group."""
    x, valid = _grouped(w, group)
    lo = torch.where(valid, x, torch.full_like(x, float("inf"))).amin(-1, keepdim=True)
    hi = torch.where(valid, x, torch.full_like(x, float("-inf"))).amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).half().float()
    lo = lo.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((x - lo) / safe), 0, levels)
    return _ungrouped(q * scale + lo, w.shape[1])


def rtn_asymmetric(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, float]:
    """w: [rows, cols] -> (W_hat: [rows, cols] float32, honest bits/weight)."""
    rows, cols = w.shape
    return rtn_asymmetric_matrix(w, bits, group), 8.0 * rtn_bytes(rows, cols, bits, group) / (rows * cols)


# -- NF absmax ------------------------------------------------------------------------------------


def nf_table(bits: int) -> torch.Tensor:
    """[2^bits] float32 ascending: the NormalFloat code of a width, derived as bitsandbytes derives NF4.

    n = 2^bits values: 2^(bits-1) positive ones, the standard-normal quantiles at
    linspace(offset, 0.5, n/2 + 1)[:-1]; 2^(bits-1) - 1 negative ones, minus the quantiles at
    linspace(offset, 0.5, n/2)[:-1]; and an exact 0; all divided by the largest, so the code spans [-1, 1].
    offset is the mean of 1 - 1/(2(n-1)) and 1 - 1/(2n) (QLoRA: 0.9677083 for NF4; 0.9330357 for NF3).
    bits=4 reproduces `NF4_BITSANDBYTES` to 4e-7 (they rounded the offset to 7 digits).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"NF tables are defined here for 2..8 bits, got {bits}")
    n = 1 << bits
    offset = ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


def nf_code(bits: int) -> torch.Tensor:
    """The table NF quantization uses: bitsandbytes' published NF4 at 4 bits, `nf_table(bits)` otherwise."""
    return torch.tensor(NF4_BITSANDBYTES, dtype=torch.float32) if bits == 4 else nf_table(bits)


def nf_absmax_matrix(w: torch.Tensor, bits: int, group: int, code: torch.Tensor | None = None) -> torch.Tensor:
    """w: [rows, cols] -> W_hat: [rows, cols] float32: nearest `code` entry times the group's float16 absmax."""
    code = nf_code(bits) if code is None else code.float()
    if code.numel() != 1 << bits:
        raise ValueError(f"a {bits}-bit code needs {1 << bits} entries, got {code.numel()}")
    x, valid = _grouped(w, group)
    absmax = torch.where(valid, x.abs(), torch.zeros_like(x)).amax(-1, keepdim=True).half().float()
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    mids = (code[1:] + code[:-1]) / 2
    q = torch.bucketize(torch.nan_to_num(x / safe), mids)
    return _ungrouped(code[q] * absmax, w.shape[1])


# -- HQQ ------------------------------------------------------------------------------------------


def hqq_matrix(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """w: [rows, cols] -> W_hat: [rows, cols] float32 through `hqq.core.quantize.Quantizer` (optimize=True).

    Needs the `hqq` package (see benchmarks / the report for the pin). HQQ groups `group` consecutive
    weights of the flattened matrix, so `cols` must be a multiple of `group` for groups to stay in a row.
    """
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as error:
        raise XFPError(f"the HQQ baseline needs the 'hqq' package ({error}); "
                       "pip install --no-deps hqq==0.2.8.post1 einops termcolor") from None
    rows, cols = w.shape
    if cols % group:
        raise XFPError(f"HQQ groups must stay within a row: {cols} columns are not a multiple of group {group}")
    w_q, meta = Quantizer.quantize(w.float().contiguous(), nbits=bits, group_size=group, axis=1, optimize=True,
                                   bitpack=False, device="cpu")
    scale = meta["scale"].half().float()  # stored as float16, as HQQLinear keeps them (compute_dtype fp16)
    zero = meta["zero"].half().float()
    w_hat = ((w_q.float() - zero) * scale).reshape(rows, cols)
    return w_hat.contiguous()
