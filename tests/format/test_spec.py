"""The layout table: exact bytes and honest bits of both modes, written out independently here."""

import math

import pytest
import torch

from xfp.config import SUPPORTED_BITS
from xfp.format.spec import (
    ALL_PARTS,
    SCALE_TABLE,
    V2A_PARTS,
    Layout,
    V2aLayout,
    V2Layout,
    make_layout,
    n_groups,
    tensor_name,
)


def v2_bytes(rows, cols, bits, n):
    return rows * math.ceil(cols * bits / 8) + rows * 2**bits * 2 + 6 * n + 16


def v2a_bytes(rows, cols, bits, n, group, library, kept):
    groups = math.ceil(cols / group)
    ids = rows * groups if library > 1 else 0
    return (rows * math.ceil(cols * bits / 8)  # codes
            + library * 2**bits * 2  # library
            + 2 * rows * groups + 2 * 256 * 2  # scale and offset codes, their two float16 tables
            + ids + 6 * n  # ids, outliers
            + 4 * kept + rows * kept + 2 * kept  # kept columns: indices, int8 values, a float16 scale each
            + 7 * 4)  # meta


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols, n", [(1, 1, 0), (7, 13, 2), (576, 1536, 100)])
def test_v2_bytes(bits, rows, cols, n):
    lay = V2Layout(rows, cols, bits, n)
    assert lay.total_bytes == v2_bytes(rows, cols, bits, n)
    assert lay.honest_bits == 8 * lay.total_bytes / (rows * cols) and lay.index_bits == bits


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols, n, group, library, kept",
                         [(1, 1, 0, 64, 1, 0), (1, 1, 0, 64, 1, 1), (7, 13, 2, 4, 3, 2), (1536, 576, 50, 128, 1, 11),
                          (1536, 576, 0, 64, 32, 0), (5, 200, 1, 48, 256, 4), (3, 10, 0, 1000, 2, 10)])
def test_v2a_bytes(bits, rows, cols, n, group, library, kept):
    lay = V2aLayout(rows, cols, bits, n, group, library, kept)
    assert lay.groups == math.ceil(cols / group) == n_groups(cols, group)
    assert lay.total_bytes == v2a_bytes(rows, cols, bits, n, group, library, kept)
    assert sum(lay.nbytes().values()) == lay.total_bytes
    assert tuple(lay.tensors()) == V2A_PARTS == lay.parts
    assert lay.tensors()["ids"][1] == ((rows, lay.groups) if library > 1 else (rows, 0))
    assert lay.tensors()["scale"] == lay.tensors()["offset"] == (torch.uint8, (rows, lay.groups))
    assert lay.tensors()["scale_table"] == lay.tensors()["offset_table"] == (torch.float16, (SCALE_TABLE,))
    assert lay.tensors()["kept_cols"] == (torch.int32, (kept,))
    assert lay.tensors()["kept_val"] == (torch.int8, (rows, kept))
    assert lay.tensors()["kept_scale"] == (torch.float16, (kept,))
    assert lay.meta().tolist() == [3, rows, cols, bits, group, library, kept]
    assert lay.index_bits == bits


def test_kept_columns_default_to_none():
    assert V2aLayout(4, 8, 3, 0, 4, 1) == V2aLayout(4, 8, 3, 0, 4, 1, 0) == make_layout("v2a", 4, 8, 3, 0, group=4,
                                                                                       library=1)


def test_honest_bits_of_the_measured_configuration():
    # SmolLM2 MLP shape, 3 bits, G = 128, L = 1: 3 index bits + 16/128 (scale and offset codes) + a ragged
    # group + the two 256-entry float16 tables (1024 bytes over the whole matrix)
    lay = V2aLayout(1536, 576, 3, 0, 128, 1)
    assert lay.groups == 5
    assert lay.total_bytes == 1536 * 216 + 16 + 1536 * 5 * 2 + 1024 + 28
    assert 3.14 < lay.honest_bits < 3.16
    g64 = V2aLayout(1536, 576, 3, 0, 64, 1)
    assert abs(g64.honest_bits - (3 + 16 / 64 + 8 * 1024 / (1536 * 576))) < 1e-3
    # 11 kept columns (2% of 576) cost 8 bits per kept weight plus 4 bytes of index and 2 of scale each
    kept = V2aLayout(1536, 576, 3, 0, 128, 1, 11)
    assert kept.total_bytes - lay.total_bytes == 11 * (1536 + 4 + 2)


def test_both_modes_share_one_interface():
    for lay in (V2Layout(4, 8, 3, 1), V2aLayout(4, 8, 3, 1, 4, 2)):
        assert isinstance(lay, Layout)
        assert set(lay.tensors()) <= set(ALL_PARTS)
        assert lay.meta().dtype == torch.int32 and lay.meta()[0] == lay.mode_id
        assert lay.entry()["mode"] == lay.mode and lay.entry()["bits"] == 3 and lay.entry()["outliers"] == 1
        assert make_layout(lay.mode, 4, 8, 3, 1, **{k: v for k, v in lay.entry().items()
                                                    if k in ("group", "library", "kept")}) == lay
    assert V2aLayout(4, 8, 3, 1, 4, 2).entry() == {"mode": "v2a", "bits": 3, "outliers": 1, "group": 4, "library": 2,
                                                   "kept": 0}
    assert V2aLayout(4, 8, 3, 1, 4, 2, 3).entry()["kept"] == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(group=0, library=1), "group"),
    (dict(group=64, library=0), "library"),
    (dict(group=64, library=257), "library"),
    (dict(group=64.0, library=1), "group"),
    (dict(group=64, library=1, kept=-1), "kept"),
    (dict(group=64, library=1, kept=9), r"kept columns must be an integer in \[0, 8\]"),
    (dict(group=64, library=1, kept=2.0), "kept"),
])
def test_v2a_layout_refuses_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        V2aLayout(4, 8, 3, 0, **kwargs)


def test_make_layout_refuses_mixed_fields():
    with pytest.raises(ValueError, match="v2a"):
        make_layout("v2", 4, 8, 3, 0, group=64, library=1)
    with pytest.raises(ValueError, match="kept"):
        make_layout("v2", 4, 8, 3, 0, kept=1)
    with pytest.raises(ValueError, match="group"):
        make_layout("v2a", 4, 8, 3, 0)
    with pytest.raises(ValueError, match="mode"):
        make_layout("v3", 4, 8, 3, 0)


def test_tensor_names_cover_every_part():
    assert tensor_name("a.b.weight", "library") == "a.b.xfp_library"
    with pytest.raises(ValueError):
        tensor_name("a.b.weight", "nope")
