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



def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _positions(cols: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For index j of a row: the byte its lowest bit lands in, and its bit offset there. [cols] int64 each."""
    start = torch.arange(cols, dtype=torch.int64, device=device) * bits
    return start >> 3, start & 7


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices: [rows, cols] uint8, each < 2**bits -> codes: [rows, ceil(cols*bits/8)] uint8."""
    _check_bits(bits)
    if indices.dtype != torch.uint8 or indices.dim() != 2:
        raise ValueError(f"indices must be a 2-D uint8 tensor, got {indices.dtype} {tuple(indices.shape)}")
    rows, cols = indices.shape
    nbytes = row_bytes(cols, bits)
    dev = indices.device
    if 8 % bits == 0:  # whole indices per byte: shift each into place and add (bits never overlap)
        per = 8 // bits
        padded = torch.nn.functional.pad(indices, (0, nbytes * per - cols))
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=dev)
        return (padded.view(rows, nbytes, per) << shifts).sum(-1, dtype=torch.uint8)
    # an index spans at most two bytes: split its shifted value into a low and a high byte
    byte, shift = _positions(cols, bits, dev)
    shifted = indices.to(torch.int32) << shift.to(torch.int32)
    acc = torch.zeros((rows, nbytes + 1), dtype=torch.int32, device=dev)
    acc.scatter_add_(1, byte.expand(rows, cols), shifted & 0xFF)
    acc.scatter_add_(1, (byte + 1).expand(rows, cols), shifted >> 8)
    return acc[:, :nbytes].to(torch.uint8)


def unpack(codes: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """codes: [rows, ceil(cols*bits/8)] uint8 -> indices: [rows, cols] uint8."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != row_bytes(cols, bits):
        raise ValueError(
            f"codes must be uint8 [rows, {row_bytes(cols, bits)}], got {codes.dtype} {tuple(codes.shape)}"
        )
    rows, nbytes = codes.shape
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return ((codes.unsqueeze(-1) >> shifts) & mask).view(rows, -1)[:, :cols]
    byte, shift = _positions(cols, bits, codes.device)
    padded = torch.nn.functional.pad(codes, (0, 1)).to(torch.int16)
    pair = padded.index_select(1, byte) | (padded.index_select(1, byte + 1) << 8)
    return ((pair >> shift.to(torch.int16)) & mask).to(torch.uint8)

def padding_is_zero(codes: torch.Tensor, bits: int, cols: int) -> bool:
    """True when the pad bits at the end of every row are zero (a MUST of the format)."""
    pad = row_bytes(cols, bits) * 8 - cols * bits
    if pad == 0:
        return True
    last = codes[:, -1]
    mask = (0xFF << (8 - pad)) & 0xFF
    return bool(((last & mask) == 0).all())
