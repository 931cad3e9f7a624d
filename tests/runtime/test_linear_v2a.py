"""XFPLinear holding a mode V2a matrix: buffers from the layout table, the fused kernel or the exact reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.test_kernels_v2a import Oracle
from xfp.config import OutlierConfig, QuantConfig
from xfp.errors import FormatError
from xfp.format.reference import decode
from xfp.quantize.autoselect import quantize_matrix
from xfp.runtime import XFPLinear
from xfp.runtime import dispatch


KEPT = (9, 99)
"""Kept columns of the default test matrix: one in a full group, the last column (ragged group)."""


def v2a_packed(rows=24, cols=100, library_size=4, seed=0, kept=KEPT):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[2, 7] = 1.0
    cfg = QuantConfig(mode="v2a", bits=(3,), group_size=(32,), library_size=library_size,
                      outliers=OutlierConfig(budgets=(0.01,)))
    packed = quantize_matrix(w, 0.5, cfg, "m", kept_cols=torch.tensor(kept, dtype=torch.int64)).packed
    assert packed.kept_cols.tolist() == list(kept) and packed.outlier_pos.numel() >= 1
    return packed


@pytest.mark.parametrize("kept", [(), KEPT])
@pytest.mark.parametrize("library_size", [1, 4])
@pytest.mark.parametrize("kernel", ["auto", "reference", "cpu"])
def test_forward_is_exactly_the_decoded_linear_whatever_the_kernel_setting(monkeypatch, library_size, kernel, kept):
    monkeypatch.setenv(dispatch.ENV_VAR, kernel)
    packed = v2a_packed(library_size=library_size, kept=kept)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(24, generator=g)
    layer = XFPLinear.from_packed(packed, bias)
    for x in (torch.randn(3, 5, 100, generator=g), torch.randn(1, 100, generator=g)):  # tiled, then fused
        y = layer(x)
        if kernel == "reference":  # the exact decode, then F.linear
            torch.testing.assert_close(y, F.linear(x, decode(packed).float(), bias), rtol=0, atol=0)
        else:  # the fused CPU kernel, within its stated bound (tests/runtime/test_kernels_v2a.py)
            Oracle(packed).check((y - bias).reshape(-1, 24), x.reshape(-1, 100))
    assert f"mode=v2a, group=32, library={library_size}, kept={len(kept)}" in repr(layer)


def test_buffers_come_from_the_layout_and_load_from_a_state_dict():
    packed = v2a_packed()
    source = XFPLinear.from_packed(packed, None)
    names = {f"xfp_{part}" for part in packed.layout.parts}
    assert set(source.state_dict()) == names
    layer = XFPLinear(100, 24, 3, packed.layout.n_outliers, bias=False, mode="v2a", group=32, library=4,
                      kept=len(KEPT), device="meta")
    for name, (dtype, shape) in packed.layout.tensors().items():
        buf = getattr(layer, f"xfp_{name}")
        assert buf.dtype == dtype and tuple(buf.shape) == shape
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    layer.validate("m.safetensors", "m.weight")
    assert torch.equal(decode(layer.packed()), decode(packed))


def test_dtype_casts_leave_the_float16_parts_alone():
    packed = v2a_packed()
    layer = XFPLinear.from_packed(packed, torch.zeros(24)).to(torch.bfloat16)
    for part in ("library", "scale_table", "offset_table", "outlier_val", "kept_scale"):
        assert getattr(layer, f"xfp_{part}").dtype == torch.float16
        assert torch.equal(getattr(layer, f"xfp_{part}"), getattr(packed, part))
    for part, dtype in (("scale", torch.uint8), ("offset", torch.uint8), ("ids", torch.uint8), ("codes", torch.uint8),
                        ("kept_val", torch.int8), ("kept_cols", torch.int32)):  # integers: untouched by a float cast
        assert getattr(layer, f"xfp_{part}").dtype == dtype
        assert torch.equal(getattr(layer, f"xfp_{part}"), getattr(packed, part))
    assert layer(torch.randn(2, 100).bfloat16()).dtype == torch.bfloat16


def test_validate_refuses_a_matrix_of_another_layout():
    packed = v2a_packed()
    layer = XFPLinear.from_packed(packed, None)
    with torch.no_grad():
        layer.xfp_scale_table[3] = -1.0
    with pytest.raises(FormatError, match=r"m\.xfp_scale_table.*>= 0"):
        layer.validate("f.safetensors", "m.weight")
    with pytest.raises(ValueError, match="group"):
        XFPLinear(100, 24, 3, 0, mode="v2a")
    with pytest.raises(ValueError, match="kept"):
        XFPLinear(100, 24, 3, 0, mode="v2a", group=32, library=1, kept=101)


def test_validate_refuses_bad_kept_columns():
    packed = v2a_packed()
    assert 2 * 100 + 7 in packed.outlier_pos.tolist()
    layer = XFPLinear.from_packed(packed, None)
    with torch.no_grad():
        layer.xfp_kept_cols[0] = 7  # column 7 of row 2 holds an outlier
    with pytest.raises(FormatError, match=r"m\.xfp_outlier_pos.*kept column"):
        layer.validate("f.safetensors", "m.weight")
    with torch.no_grad():
        layer.xfp_kept_cols[1] = 100
    with pytest.raises(FormatError, match=r"m\.xfp_kept_cols.*\[0, 100\)"):
        layer.validate("f.safetensors", "m.weight")
