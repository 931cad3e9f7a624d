"""Bit packing: golden bytes pin the bit order; every width round-trips exactly."""

import pytest
import torch

from xfp.config import SUPPORTED_BITS
from xfp.format.pack import pack, padding_is_zero, unpack
from xfp.format.spec import row_bytes


def python_pack(row: list[int], bits: int) -> list[int]:
    """Independent reference: one integer bit stream, LSB first, cut into bytes."""
    stream = 0
    for j, value in enumerate(row):
        stream |= value << (j * bits)
    return [(stream >> (8 * i)) & 0xFF for i in range(row_bytes(len(row), bits))]


@pytest.mark.parametrize(
    "bits, row, expected",
    [
        (2, [3, 0, 1, 2, 1], [0x93, 0x01]),
        (3, [1, 2, 3], [0xD1, 0x00]),
        (4, [0x1, 0xA, 0xF], [0xA1, 0x0F]),
        (5, [31, 1], [0x3F, 0x00]),
        (6, [0x3F, 0x01, 0x02], [0x7F, 0x20, 0x00]),
        (8, [7, 255], [7, 255]),
    ],
)
def test_golden_bytes(bits, row, expected):
    codes = pack(torch.tensor([row], dtype=torch.uint8), bits)
    assert codes.tolist() == [expected]
    assert python_pack(row, bits) == expected


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 64), (2, 129), (4, 1000)])
def test_round_trip_matches_independent_packer(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    idx = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    codes = pack(idx, bits)
    assert codes.shape == (shape[0], row_bytes(shape[1], bits))
    assert codes.tolist() == [python_pack(r, bits) for r in idx.tolist()]
    assert torch.equal(unpack(codes, bits, shape[1]), idx)
    assert padding_is_zero(codes, bits, shape[1])


def test_padding_check_detects_stray_bits():
    codes = pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 3)
    codes[0, -1] |= 0x80
    assert not padding_is_zero(codes, 3, 3)


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError):
        pack(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack(torch.zeros(2, 2, dtype=torch.uint8), 7)
    with pytest.raises(ValueError):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 2)
