"""The fused CPU kernel against the reference decoder, on every instruction set this CPU runs.

Bound (xfp/runtime/kernels/cpu.py): with u = 2**-24 and s[r] = sum_c |x_c| (|W_hat[r,c]| + |cb[r, idx(r,c)]|),
the fused path gives |y - x @ W_hat.T| <= (cols + 2*outliers(r) + 16) * u * s[r]; the tiled path multiplies the
exact float32 W_hat with BLAS and is held to the same bound. Decoded tiles are exact (rtol=0, atol=0).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.test_linear import random_packed
from xfp.config import SUPPORTED_BITS
from xfp.format.pack import unpack
from xfp.format.reference import PackedV2, decode
from xfp.runtime import XFPLinear, dispatch
from xfp.runtime.kernels import cpu
from helpers import linear_at_threads

# (rows, cols): cols not a multiple of 8, 16, 32 or 64 exercise row padding and the kernels' tails;
# 4113 columns cross several 16-byte blocks before the tail; 64x128 has no tail at all.
SHAPES = [(1, 1), (7, 13), (13, 29), (33, 5), (64, 127), (5, 1000), (3, 4113), (64, 128)]
BATCHES = [1, 2, 3, 5, cpu.FUSED_MAX_M, cpu.FUSED_MAX_M + 3]  # fused chunks of 1..4 rows, then the tiled path
U = 2.0**-24


def isas() -> list[str]:
    return [isa for isa in cpu.ISAS if isa in cpu.supported_isas()]


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu.library()  # compiles on a fresh machine (cached afterwards); fails loudly if it cannot


@pytest.fixture(params=list(cpu.ISAS))
def isa(request, monkeypatch):
    if request.param not in cpu.supported_isas():
        pytest.skip(f"this CPU does not run {request.param}")
    monkeypatch.setenv(cpu.ISA_ENV_VAR, request.param)
    return request.param


def bound(x: torch.Tensor, packed: PackedV2) -> torch.Tensor:
    """[m, rows] float64: the stated bound on |y - x @ W_hat.T| for the fused kernel."""
    w = decode(packed).double()
    base = torch.gather(packed.codebook, 1, unpack(packed.codes, packed.bits, packed.cols).long()).double()
    per_row = torch.bincount(packed.outlier_pos.long() // packed.cols, minlength=packed.rows).double()
    s = x.double().abs() @ (w.abs() + base.abs()).T
    return (packed.cols + 2 * per_row + 16) * U * s


def check(y: torch.Tensor, x: torch.Tensor, packed: PackedV2) -> None:
    exact = x.double() @ decode(packed).double().T
    err = (y.double() - exact).abs()
    limit = bound(x, packed)
    assert bool((err <= limit).all()), f"max error {err.max().item():.3g} vs bound {limit.max().item():.3g}"


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols", SHAPES)
def test_fused_and_tiled_match_the_reference(isa, bits, rows, cols):
    packed = random_packed(rows, cols, bits, n_outliers=max(1, rows * cols // 40), seed=bits * 7 + cols)
    state = cpu.prepare(packed)
    g = torch.Generator().manual_seed(rows * cols)
    for m in BATCHES:
        x = torch.randn(m, cols, generator=g)
        y = cpu.linear(x, packed, None, state)
        assert y.dtype == torch.float32 and y.shape == (m, rows)
        check(y, x, packed)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_decoded_tiles_are_exact(isa, bits):
    packed = random_packed(37, 301, bits, n_outliers=200, seed=bits)
    state = cpu.prepare(packed)
    out = torch.full((37, 301), float("nan"))
    cpu.decode_rows(packed, state, 0, 37, out, isa)
    torch.testing.assert_close(out, decode(packed).float(), rtol=0, atol=0)
    part = torch.full((10, 301), float("nan"))
    cpu.decode_rows(packed, state, 20, 30, part, isa)
    torch.testing.assert_close(part, decode(packed).float()[20:30], rtol=0, atol=0)


def test_many_tiles(isa, monkeypatch):
    monkeypatch.setattr(cpu, "TILE_BYTES", (16 * 4 * 200, 16 * 4 * 200))  # 16-row tiles: 100 rows take 7
    packed = random_packed(100, 200, 4, n_outliers=300, seed=3)
    x = torch.randn(20, 200, generator=torch.Generator().manual_seed(0))
    check(cpu.linear(x, packed, None, cpu.prepare(packed)), x, packed)


def test_tile_size_follows_rows_and_threads():
    """The small (L2) tile serves one thread below TILE_LARGE_M rows of x; more rows or threads get the large."""
    small, large = (b // (4 * 1000) // 16 * 16 for b in cpu.TILE_BYTES)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu.tile_rows(1000, cpu.TILE_LARGE_M - 1) == small
        assert cpu.tile_rows(1000, cpu.TILE_LARGE_M) == large
        torch.set_num_threads(2)
        assert cpu.tile_rows(1000, cpu.FUSED_MAX_M + 1) == large
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_outliers_anywhere(isa, bits):
    """Outliers in the first and last column, a row made only of outliers, rows without any."""
    rows, cols = 6, 77
    base = random_packed(rows, cols, bits, n_outliers=0, seed=1)
    pos = sorted({0, cols - 1, 2 * cols, 3 * cols - 1, *range(4 * cols, 5 * cols)})
    val = torch.linspace(-30, 30, len(pos)).half()
    packed = PackedV2(rows, cols, bits, base.codes, base.codebook, torch.tensor(pos, dtype=torch.int32), val)
    state = cpu.prepare(packed)
    assert state.ol_rowptr.tolist() == [0, 2, 2, 4, 4, 4 + cols, 4 + cols]  # row 4: every column
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(2))
    for m in (1, 3):
        check(cpu.linear(x[:m], packed, None, state), x[:m], packed)
    check(cpu.tiled(x, packed, state, cpu.isa()), x, packed)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_matrices_without_outliers(isa, bits):
    packed = random_packed(19, 45, bits, n_outliers=0, seed=bits)  # empty outlier tensors: null data pointers
    state = cpu.prepare(packed)
    x = torch.randn(cpu.FUSED_MAX_M + 1, 45, generator=torch.Generator().manual_seed(3))
    for m in (1, 2, cpu.FUSED_MAX_M + 1):
        check(cpu.linear(x[:m], packed, None, state), x[:m], packed)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_threads_do_not_change_the_result(bits):
    packed = random_packed(301, 1111, bits, n_outliers=500, seed=bits)
    state = cpu.prepare(packed)
    x = torch.randn(12, 1111, generator=torch.Generator().manual_seed(5))
    results = linear_at_threads(packed, state, x, (1, 3, 12))
    for one, two in zip(results[1][:2], results[2][:2]):  # fused: each row by one thread, same order
        torch.testing.assert_close(one, two, rtol=0, atol=0)
    check(results[1][2], x, packed)  # tiled: BLAS may split its sums by thread; both within the bound
    check(results[2][2], x, packed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32_and_rounded_once(dtype):
    packed = random_packed(37, 53, 4, n_outliers=20, seed=4)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 53, generator=g).to(dtype)
    bias = torch.randn(37, generator=g).to(dtype)
    y = dispatch.linear(x, packed, bias)
    assert y.dtype == dtype and y.shape == (2, 3, 37)
    y32 = cpu.linear(x.float().reshape(6, 53), packed, bias.float(), cpu.prepare(packed))
    torch.testing.assert_close(y, y32.to(dtype).reshape(2, 3, 37), rtol=0, atol=0)


def test_layer_uses_the_kernel_with_bias_and_caches_its_state(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    packed = random_packed(33, 70, 3, n_outliers=40, seed=9)
    bias = torch.randn(33, generator=torch.Generator().manual_seed(1))
    layer = XFPLinear.from_packed(packed, bias)
    x = torch.randn(4, 70, generator=torch.Generator().manual_seed(2))
    y = layer(x)
    check(y - bias, x, packed)
    key, state = layer._kernel_cache[cpu.NAME]
    layer(x)
    assert layer._kernel_cache[cpu.NAME][1] is state  # derived once
    layer.xfp_outlier_val.mul_(2)  # an in-place edit of a stored tensor invalidates it
    y2 = layer(x)
    assert layer._kernel_cache[cpu.NAME][1] is not state
    check(y2 - bias, x, layer.packed())
    torch.testing.assert_close(y2, F.linear(x, decode(layer.packed()).float(), bias), rtol=1e-4, atol=1e-4)


def test_auto_prefers_the_cpu_kernel_and_falls_back(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.kernel_names() == ["cpu", "reference"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert dispatch.select(torch.device("cpu"), dtype) is dispatch.CPU
    assert dispatch.select(torch.device("cpu"), torch.float64) is dispatch.REFERENCE  # unsupported dtype
    assert dispatch.select(torch.device("meta"), torch.float32) is dispatch.REFERENCE  # not a CPU tensor


def test_forcing_a_kernel(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    assert dispatch.select(torch.device("cpu"), torch.float32) is dispatch.CPU
    with pytest.raises(ValueError, match="XFP_KERNEL='cpu' does not support torch.float64"):
        dispatch.select(torch.device("cpu"), torch.float64)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select(torch.device("cpu"), torch.float32) is dispatch.REFERENCE
    monkeypatch.setenv(dispatch.ENV_VAR, "marlin")
    with pytest.raises(ValueError, match=r"not a known kernel; choose one of \['auto', 'cpu', 'reference'\]"):
        dispatch.select(torch.device("cpu"), torch.float32)


def test_forced_reference_is_bit_identical_to_f_linear(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    packed = random_packed(9, 31, 4, n_outliers=5, seed=2)
    x = torch.randn(3, 31)
    torch.testing.assert_close(XFPLinear.from_packed(packed, None)(x), F.linear(x, decode(packed).float()),
                               rtol=0, atol=0)


def test_unavailable_kernel_falls_back_or_explains(monkeypatch):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", "BuildError: no C++ compiler")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.select(torch.device("cpu"), torch.float32) is dispatch.REFERENCE
    packed = random_packed(5, 9, 2, n_outliers=3, seed=1)
    x = torch.randn(2, 9)
    torch.testing.assert_close(dispatch.linear(x, packed), F.linear(x, decode(packed).float()), rtol=0, atol=0)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpu")
    with pytest.raises(ValueError, match="cannot run on this machine: BuildError: no C\\+\\+ compiler"):
        dispatch.select(torch.device("cpu"), torch.float32)


def test_inputs_that_need_a_gradient_take_the_reference(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    packed = random_packed(5, 9, 3, n_outliers=3, seed=1)
    x = torch.randn(2, 9, requires_grad=True)
    y = dispatch.linear(x, packed)
    y.sum().backward()
    torch.testing.assert_close(x.grad, decode(packed).float().sum(0).expand(2, 9), rtol=0, atol=0)


def test_isa_override_is_checked(monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "neon")
    with pytest.raises(ValueError, match="XFP_CPU_ISA='neon' is not an instruction set"):
        cpu.isa()
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "auto")
    assert cpu.isa() == cpu.supported_isas()[-1]
    assert "scalar" in cpu.supported_isas()


def test_indices_at_reads_the_stored_bit_order():
    for bits in SUPPORTED_BITS:
        packed = random_packed(4, 23, bits, n_outliers=0, seed=bits)
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(23), indexing="ij")
        got = cpu.indices_at(packed.codes, bits, rows.reshape(-1), cols.reshape(-1)).reshape(4, 23)
        torch.testing.assert_close(got, unpack(packed.codes, bits, 23).long(), rtol=0, atol=0)
