"""XFPLinear against the reference decoder: exact in fp32, bounded in bf16, every width, odd shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xfp.config import SUPPORTED_BITS
from xfp.errors import FormatError
from xfp.format.pack import pack
from xfp.format.reference import PackedV2, decode
from xfp.runtime import XFPLinear


@pytest.fixture(autouse=True)
def reference_kernel(monkeypatch):
    """These tests pin the module to the exact reference path (bit-identical to F.linear); the fused kernels
    are held to their stated bound against it in test_kernels.py."""
    monkeypatch.setenv("XFP_KERNEL", "reference")


SHAPES = [(1, 1), (7, 13), (13, 29), (33, 5), (64, 127)]  # (rows, cols): odd widths exercise row padding


def random_packed(rows: int, cols: int, bits: int, n_outliers: int, seed: int = 0) -> PackedV2:
    """A valid V2 matrix built directly (no quantizer): random indices, ascending codebooks, outliers."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)
    codebook = torch.randn(rows, 1 << bits, generator=g).sort(dim=1).values.half()
    n = min(n_outliers, rows * cols)
    pos = torch.randperm(rows * cols, generator=g)[:n].sort().values.to(torch.int32)
    val = (4 * torch.randn(n, generator=g)).half()
    return PackedV2(rows, cols, bits, pack(indices, bits), codebook, pos, val)


def cases():
    for bits in SUPPORTED_BITS:  # 2..8 as the format defines them: 2, 3, 4, 5, 6, 8 (7 is not a format width)
        for rows, cols in SHAPES:
            yield bits, rows, cols


@pytest.mark.parametrize("bits, rows, cols", list(cases()))
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_forward_is_exactly_the_decoded_linear(bits, rows, cols, with_bias):
    packed = random_packed(rows, cols, bits, n_outliers=max(1, rows * cols // 50), seed=bits * 1000 + rows)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(rows, generator=g) if with_bias else None
    layer = XFPLinear.from_packed(packed, bias)
    w = decode(packed).float()
    for x in (torch.randn(cols, generator=g), torch.randn(5, cols, generator=g), torch.randn(2, 3, cols, generator=g)):
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], rows)
        # Same ops as nn.Linear holding W_hat: bit-identical.
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=0, atol=0)
        # The spelled-out product differs from F.linear's fused addmm by summation order only.
        expected = x @ w.T + (bias if bias is not None else 0)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_bf16_forward_is_within_two_bf16_roundings(bits):
    rows, cols = 37, 53
    packed = random_packed(rows, cols, bits, n_outliers=20, seed=bits)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(rows, generator=g).bfloat16()
    x = torch.randn(4, cols, generator=g).bfloat16()
    layer = XFPLinear.from_packed(packed, bias)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w = decode(packed)
    # Same ops in bf16 (W_hat cast to bf16, then F.linear): bit-identical.
    torch.testing.assert_close(y, F.linear(x, w.bfloat16(), bias), rtol=0, atol=0)
    # Against the fp32 product of the exact matrix: W_hat's cast to bf16 and the output's rounding are two
    # relative errors of at most 2**-8 each, so |y - y32| <= 2**-7 * (|x| @ |W|^T + |bias|) (+ fp32 slack).
    x32, b32 = x.float(), bias.float()
    y32 = F.linear(x32, w.float(), b32)
    bound = 2.0**-7 * (x32.abs() @ w.float().abs().T + b32.abs()) + 1e-6
    assert bool(((y.float() - y32).abs() <= bound).all())


def test_buffers_carry_the_stored_names_and_dtypes():
    packed = random_packed(6, 10, 3, 4)
    layer = XFPLinear.from_packed(packed, torch.zeros(6))
    assert set(layer.state_dict()) == {"bias", "xfp_codes", "xfp_codebook", "xfp_outlier_pos", "xfp_outlier_val",
                                       "xfp_meta"}
    assert layer.xfp_meta.tolist() == [2, 6, 10, 3]
    got = layer.packed()
    for part in ("codes", "codebook", "outlier_pos", "outlier_val"):
        assert torch.equal(getattr(got, part), getattr(packed, part))
    assert (got.rows, got.cols, got.bits) == (6, 10, 3)


def test_empty_module_has_the_layout_shapes():
    layer = XFPLinear(29, 13, 5, 7, bias=False, device="meta")
    assert layer.xfp_codes.shape == (13, 19) and layer.xfp_codes.dtype == torch.uint8
    assert layer.xfp_codebook.shape == (13, 32) and layer.xfp_codebook.dtype == torch.float16
    assert layer.xfp_outlier_pos.shape == (7,) and layer.xfp_outlier_val.shape == (7,)
    assert layer.bias is None and layer.xfp_meta.is_meta
    with pytest.raises(ValueError, match="bits"):
        XFPLinear(8, 8, 7, 0)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                                  lambda m: m.float()])
def test_dtype_casts_leave_the_stored_matrix_alone(cast):
    packed = random_packed(9, 11, 4, 5)
    layer = XFPLinear.from_packed(packed, torch.randn(9))
    cast(layer)
    assert layer.xfp_codebook.dtype == torch.float16 and layer.xfp_outlier_val.dtype == torch.float16
    assert torch.equal(layer.xfp_codebook, packed.codebook) and torch.equal(layer.xfp_outlier_val, packed.outlier_val)
    x = torch.randn(2, 11).to(layer.bias.dtype)
    torch.testing.assert_close(layer(x), F.linear(x, decode(packed).to(x.dtype), layer.bias), rtol=0, atol=0)


def test_from_packed_refuses_wrong_parts():
    packed = random_packed(4, 8, 2, 1)
    bad = PackedV2(4, 8, 2, packed.codes, packed.codebook.float(), packed.outlier_pos, packed.outlier_val)
    with pytest.raises(ValueError, match="codebook"):
        XFPLinear.from_packed(bad)
    with pytest.raises(ValueError, match="bias"):
        XFPLinear.from_packed(packed, torch.zeros(5))


def test_validate_names_file_and_tensor(tmp_path):
    name = "model.layers.3.mlp.up_proj.weight"
    layer = XFPLinear.from_packed(random_packed(5, 16, 4, 3))
    layer.validate(tmp_path, name)
    layer.xfp_codebook[2, 1] = float("nan")
    with pytest.raises(FormatError, match=r"up_proj\.xfp_codebook.*finite") as exc:
        layer.validate(tmp_path / "model.safetensors", name)
    assert str(tmp_path / "model.safetensors") in str(exc.value) and "\n" not in str(exc.value)


def test_validate_catches_meta_that_disagrees_with_the_layer(tmp_path):
    # 16 columns at 4 bits and 15 columns at 4 bits both pack into 8 bytes a row: the shapes alone agree.
    layer = XFPLinear.from_packed(random_packed(5, 16, 4, 0))
    layer.xfp_codes[:, -1] &= 0x0F  # zero what would be row padding for 15 columns
    layer.xfp_meta[2] = 15
    with pytest.raises(FormatError, match=r"xfp_meta.*5x15 at 4 bits, but the layer is 5x16 at 4 bits"):
        layer.validate(tmp_path, "w.weight")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_decodes_the_same_matrix():
    packed = random_packed(33, 70, 3, 9)
    layer = XFPLinear.from_packed(packed, torch.randn(33)).cuda()
    assert torch.equal(decode(layer.packed()).cpu(), decode(packed))
    x = torch.randn(4, 70)
    y = layer(x.cuda())
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), F.linear(x, decode(packed).float(), layer.bias.cpu()), rtol=1e-3, atol=1e-3)
    yb = layer.to(torch.bfloat16)(x.cuda().bfloat16())
    assert yb.dtype == torch.bfloat16 and layer.xfp_codebook.dtype == torch.float16
