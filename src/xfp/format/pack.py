"""Bit packing of codebook indices.

Bit order (docs/FORMAT.md, "Bit order"): each row is one little-endian bit stream. Index j of a row
occupies stream bits [j*b, (j+1)*b), its least significant bit first; stream bit i is bit (i % 8) of
byte i // 8 of that row, counting from the least significant bit. A row is padded with zero bits to a
whole byte, so every row starts on a byte boundary.
"""

from __future__ import annotations

import torch

from xfp.config import SUPPORTED_BITS
from xfp.format.spec import row_bytes

_CHUNK_ELEMENTS = 1 << 24  # bounds the temporary bit tensor to ~16 M bytes per chunk of rows


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _rows_per_chunk(cols: int, bits: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, cols * bits))


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices: [rows, cols] uint8, each < 2**bits -> codes: [rows, ceil(cols*bits/8)] uint8."""
    _check_bits(bits)
    if indices.dtype != torch.uint8 or indices.dim() != 2:
        raise ValueError(f"indices must be a 2-D uint8 tensor, got {indices.dtype} {tuple(indices.shape)}")
    rows, cols = indices.shape
    nbytes = row_bytes(cols, bits)
    dev = indices.device
    out = torch.empty((rows, nbytes), dtype=torch.uint8, device=dev)
    if bits == 8:
        out.copy_(indices)
        return out
    shifts = torch.arange(bits, dtype=torch.uint8, device=dev)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=dev)
    step = _rows_per_chunk(cols, bits)
    for r0 in range(0, rows, step):
        chunk = indices[r0 : r0 + step]
        n = chunk.shape[0]
        stream = ((chunk.unsqueeze(-1) >> shifts) & 1).reshape(n, cols * bits)
        pad = nbytes * 8 - cols * bits
        if pad:
            stream = torch.cat([stream, stream.new_zeros(n, pad)], dim=1)
        octets = stream.reshape(n, nbytes, 8).to(torch.int32)
        out[r0 : r0 + n] = (octets * weights).sum(-1).to(torch.uint8)
    return out


def unpack(codes: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """codes: [rows, ceil(cols*bits/8)] uint8 -> indices: [rows, cols] uint8."""
    _check_bits(bits)
    rows = codes.shape[0]
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != row_bytes(cols, bits):
        raise ValueError(
            f"codes must be uint8 [rows, {row_bytes(cols, bits)}], got {codes.dtype} {tuple(codes.shape)}"
        )
    if bits == 8:
        return codes.clone()
    dev = codes.device
    out = torch.empty((rows, cols), dtype=torch.uint8, device=dev)
    bit_shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    value_weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.uint8, device=dev)
    step = _rows_per_chunk(cols, bits)
    for r0 in range(0, rows, step):
        chunk = codes[r0 : r0 + step]
        n = chunk.shape[0]
        stream = ((chunk.unsqueeze(-1) >> bit_shifts) & 1).reshape(n, -1)[:, : cols * bits]
        out[r0 : r0 + n] = (stream.reshape(n, cols, bits) * value_weights).sum(-1, dtype=torch.uint8)
    return out


def padding_is_zero(codes: torch.Tensor, bits: int, cols: int) -> bool:
    """True when the pad bits at the end of every row are zero (a MUST of the format)."""
    pad = row_bytes(cols, bits) * 8 - cols * bits
    if pad == 0:
        return True
    last = codes[:, -1]
    mask = (0xFF << (8 - pad)) & 0xFF
    return bool(((last & mask) == 0).all())
