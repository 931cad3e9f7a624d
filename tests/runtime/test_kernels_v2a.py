"""The fused CPU kernel on mode V2a matrices against the reference decoder, on every instruction set.

Bound (xfp/runtime/kernels/cpu.py): the fused product uses each coded weight's exact value e*s + o, which
W_hat rounds to float16, so with u = 2**-24, a[r] = sum_c |x_c| |W_hat[r, c]| and
b[r] = sum_c |x_c| (|e s| + |o| + |W_hat[r, c]|),
    |y - x @ W_hat.T| <= 2**-11 * (a[r] + 2**-14 * sum_c |x_c|) + (cols + groups + 2*outliers(r) + kept + 16) * u * b[r]
(the float16 rounding of each weight, then a float32 dot product of that length). Decoded tiles (the
prefill path) are exact (rtol=0, atol=0) and multiplied by BLAS, held to the same bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xfp.config import SUPPORTED_BITS
from xfp.format.pack import pack
from xfp.format.reference import PackedV2a, decode, kept_values
from xfp.runtime import XFPLinear, dispatch
from xfp.runtime.kernels import cpu
from helpers import linear_at_threads

U = 2.0**-24

# (rows, cols, group): cols not a multiple of the group (a ragged last group), of 8 or 16; groups 64, 128 and
# 256 (the writer's), 32 (still a whole number of AVX2 chunks but not of AVX-512's 2-bit ones) and 48, 5
# (not a multiple of any SIMD chunk: the portable kernel serves them).
SHAPES = [(1, 1, 64), (7, 13, 64), (33, 200, 64), (5, 1000, 128), (3, 4113, 128), (64, 128, 64), (9, 130, 32),
          (6, 100, 48), (4, 23, 5), (3, 600, 256), (2, 1024, 256)]
BATCHES = [1, 2, 5, cpu.FUSED_MAX_M + 3]  # fused chunks of 1..4 rows, then the tiled path


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu.library()


@pytest.fixture(params=list(cpu.ISAS))
def isa(request, monkeypatch):
    if request.param not in cpu.supported_isas():
        pytest.skip(f"this CPU does not run {request.param}")
    monkeypatch.setenv(cpu.ISA_ENV_VAR, request.param)
    return request.param


def random_v2a(rows: int, cols: int, bits: int, group: int, library: int = 1, kept: int = 0, n_outliers: int = 0,
               seed: int = 0) -> PackedV2a:
    """A valid V2a matrix built directly: random indices, library, coded scales and offsets (the writer's
    tables, code 0 = scale 0 included), ids, kept columns (the first and last column among them), outliers
    outside the kept columns."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // group)
    indices = torch.randint(0, 1 << bits, (rows, cols), generator=g).to(torch.uint8)
    lib = torch.randn(library, 1 << bits, generator=g).sort(dim=1).values.half()
    scale_table = torch.cat([torch.zeros(1), 0.05 * 2.0 ** (-16 * (255 - torch.arange(1, 256)) / 254)]).half()
    offset_table = ((torch.arange(256) - 128) * 0.01 / 127).half()
    scale = torch.randint(200, 256, (rows, groups), generator=g).to(torch.uint8)
    scale[0, 0] = 0  # a group of scale 0 decodes to its offset
    offset = torch.randint(0, 256, (rows, groups), generator=g).to(torch.uint8)
    ids = (torch.randint(0, library, (rows, groups), generator=g).to(torch.uint8) if library > 1
           else torch.zeros(rows, 0, dtype=torch.uint8))
    kept = min(kept, cols)
    chosen = {0, cols - 1} if kept >= 2 else set()
    rest = [c for c in torch.randperm(cols, generator=g).tolist() if c not in chosen]
    kept_cols = torch.tensor(sorted(chosen | set(rest[: kept - len(chosen)])) if kept else [], dtype=torch.int32)
    kept_val = torch.randint(-127, 128, (rows, kept), generator=g).to(torch.int8)
    kept_scale = (0.001 + 0.01 * torch.rand(kept, generator=g)).half()
    free = torch.ones(rows, cols, dtype=torch.bool)
    free[:, kept_cols.long()] = False
    allowed = free.reshape(-1).nonzero().squeeze(1)
    n = min(n_outliers, allowed.numel())
    pos = allowed[torch.randperm(allowed.numel(), generator=g)[:n]].sort().values.to(torch.int32)
    val = (0.5 * torch.randn(n, generator=g)).half()
    return PackedV2a(rows, cols, bits, group, pack(indices, bits), lib, scale, scale_table, offset, offset_table, ids,
                     pos, val, kept_cols, kept_val, kept_scale)


class Oracle:
    """The reference product of one matrix and the stated bound on the fused kernel's error (module doc)."""

    def __init__(self, packed: PackedV2a) -> None:
        self.w = decode(packed).double()
        zero_scale = PackedV2a(packed.rows, packed.cols, packed.bits, packed.group, packed.codes, packed.library,
                               packed.scale, torch.ones(256).half(), packed.offset, torch.zeros(256).half(),
                               packed.ids, packed.outlier_pos[:0], packed.outlier_val[:0], packed.kept_cols[:0],
                               packed.kept_val[:, :0], packed.kept_scale[:0])
        e = decode(zero_scale).double()  # the library entry of every weight
        col_group = torch.arange(packed.cols) // packed.group
        s = packed.group_scale.double()[:, col_group]
        o = packed.group_offset.double()[:, col_group]
        self.spread = ((e * s).abs() + o.abs() + self.w.abs()).T
        per_row = torch.bincount(packed.outlier_pos.long() // packed.cols, minlength=packed.rows).double()
        self.terms = packed.cols + packed.layout.groups + 2 * per_row + packed.kept_cols.numel() + 16

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """[m, rows] float64: the stated bound on |y - x @ W_hat.T|."""
        ax = x.double().abs()
        a = ax @ self.w.abs().T + 2.0**-14 * ax.sum(1, keepdim=True)
        return 2.0**-11 * a + self.terms * U * (ax @ self.spread)

    def check(self, y: torch.Tensor, x: torch.Tensor) -> None:
        err = (y.double() - x.double() @ self.w.T).abs()
        limit = self.bound(x)
        assert bool((err <= limit).all()), f"max error {err.max().item():.3g} vs bound {limit.max().item():.3g}"


def check(y: torch.Tensor, x: torch.Tensor, packed: PackedV2a) -> None:
    Oracle(packed).check(y, x)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols, group", SHAPES)
def test_fused_and_tiled_match_the_reference(isa, bits, rows, cols, group):
    library = 1 if (rows + bits) % 2 else 3
    packed = random_v2a(rows, cols, bits, group, library=library, kept=min(3, cols), n_outliers=rows * cols // 40,
                        seed=bits * 7 + cols)
    state, oracle = cpu.prepare_v2a(packed), Oracle(packed)
    g = torch.Generator().manual_seed(rows * cols)
    for m in BATCHES:
        x = torch.randn(m, cols, generator=g)
        y = cpu.linear(x, packed, None, state)
        assert y.dtype == torch.float32 and y.shape == (m, rows)
        oracle.check(y, x)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("library, group", [(1, 64), (4, 64), (2, 128), (3, 48), (1, 5)])
def test_decoded_tiles_are_exact(isa, bits, library, group):
    packed = random_v2a(37, 301, bits, group, library=library, kept=4, n_outliers=200, seed=bits + library)
    state = cpu.prepare_v2a(packed)
    out = torch.full((37, 301), float("nan"))
    cpu.decode_rows(packed, state, 0, 37, out, isa)
    torch.testing.assert_close(out, decode(packed).float(), rtol=0, atol=0)
    part = torch.full((10, 301), float("nan"))
    cpu.decode_rows(packed, state, 20, 30, part, isa)
    torch.testing.assert_close(part, decode(packed).float()[20:30], rtol=0, atol=0)


def test_decode_rounds_to_float16_exactly_near_overflow_and_in_subnormals(isa):
    """Scales and offsets that put e*s + o on float16 ties, in the subnormal range and at 65504."""
    packed = random_v2a(4, 128, 4, 64, seed=1)
    lib = torch.tensor([[-65504, -1, -2.0**-14, -2.0**-24, 0, 2.0**-25, 2.0**-24, 3 * 2.0**-25, 2.0**-15, 1.0009765625,
                         1, 2, 1000, 2047, 2049, 65504]]).half()
    table = torch.tensor([0, 1, 0.5, 0.25, 2.0**-10, 2.0**-20, 1.5, 0.999] + [1] * 248).half()
    offsets = torch.tensor([0, 2.0**-24, -2.0**-24, 0.5, -0.5, 2.0**-11, 1e-4, -1e-4] + [0] * 248).half()
    g = torch.Generator().manual_seed(3)
    scale = torch.randint(0, 8, packed.scale.shape, generator=g).to(torch.uint8)
    offset = torch.randint(0, 8, packed.offset.shape, generator=g).to(torch.uint8)
    scale[:, 0], offset[:, 0] = 1, 0  # 65504 * 1 + 0 stays finite; other groups: at most 1.5 * 65504... refused
    big = lib.float().abs() > 2048
    lib = torch.where(big, lib.float() / 32, lib.float()).half()  # keep every group finite
    packed = PackedV2a(4, 128, 4, 64, packed.codes, lib, scale, table, offset, offsets, packed.ids,
                       packed.outlier_pos, packed.outlier_val, packed.kept_cols, packed.kept_val, packed.kept_scale)
    expected = decode(packed).float()
    assert torch.isfinite(expected).all()
    out = torch.full((4, 128), float("nan"))
    cpu.decode_rows(packed, cpu.prepare_v2a(packed), 0, 4, out, isa)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_kept_columns_replace_the_decoded_values(isa):
    """A kept column's codes decode to large values that must not leak into the product."""
    base = random_v2a(8, 130, 3, 64, kept=5, seed=2)
    lib = torch.full_like(base.library, 1000.0)  # every coded weight is 1000 * s + o
    packed = PackedV2a(8, 130, 3, 64, base.codes, lib, base.scale, base.scale_table, base.offset, base.offset_table,
                       base.ids, base.outlier_pos, base.outlier_val, base.kept_cols, base.kept_val, base.kept_scale)
    x = torch.zeros(2, 130)
    x[:, base.kept_cols.long()] = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    y = cpu.linear(x, packed, None, cpu.prepare_v2a(packed))
    expected = x[:, base.kept_cols.long()].double() @ kept_values(base.kept_val, base.kept_scale).double().T
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-9)
    check(y, x, packed)


@pytest.mark.parametrize("kept", [0, 1, 15, 16, 17, 40])
@pytest.mark.parametrize("bits", [3, 4])
def test_many_kept_columns(isa, bits, kept):
    """Kept columns enter the vector kernels as a dense product with x gathered at them, whole vectors at a
    time: counts below, at and past one vector, and a row's kept values ending mid-vector."""
    packed = random_v2a(29, 256, bits, 64, kept=kept, n_outliers=40, seed=kept + bits)
    state, oracle = cpu.prepare_v2a(packed), Oracle(packed)
    g = torch.Generator().manual_seed(kept)
    for m in (1, 3, 5):
        x = torch.randn(m, 256, generator=g)
        oracle.check(cpu.linear(x, packed, None, state), x)


@pytest.mark.parametrize("bits", [2, 3])
def test_threads_do_not_change_the_result(bits):
    packed = random_v2a(301, 1111, bits, 64, library=2, kept=6, n_outliers=500, seed=bits)
    state = cpu.prepare_v2a(packed)
    x = torch.randn(12, 1111, generator=torch.Generator().manual_seed(5))
    results = linear_at_threads(packed, state, x, (1, 3, 12))
    for one, two in zip(results[1][:2], results[2][:2]):  # fused: each row by one thread, same order
        torch.testing.assert_close(one, two, rtol=0, atol=0)
    oracle = Oracle(packed)
    oracle.check(results[1][2], x)
    oracle.check(results[2][2], x)


@pytest.mark.parametrize("kernel", ["auto", "cpu", "reference"])
def test_layer_dispatch_bias_dtypes_and_cache(monkeypatch, kernel):
    monkeypatch.setenv(dispatch.ENV_VAR, kernel)
    packed = random_v2a(33, 200, 4, 64, library=2, kept=3, n_outliers=30, seed=9)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(33, generator=g)
    layer = XFPLinear.from_packed(packed, bias)
    x = torch.randn(2, 3, 200, generator=g)
    y = layer(x)
    if kernel == "reference":
        torch.testing.assert_close(y, F.linear(x, decode(packed).float(), bias), rtol=0, atol=0)
        assert cpu.NAME not in layer._kernel_cache
        return
    check((y - bias).reshape(6, 33), x.reshape(6, 200), packed)
    key, state = layer._kernel_cache[cpu.NAME]
    assert isinstance(state, cpu.V2aState)
    layer(x)
    assert layer._kernel_cache[cpu.NAME][1] is state  # derived once
    layer.xfp_kept_scale.mul_(2)  # an in-place edit of any stored tensor invalidates it
    y2 = layer(x)
    assert layer._kernel_cache[cpu.NAME][1] is not state
    check((y2 - bias).reshape(6, 33), x.reshape(6, 200), layer.packed())
    for dtype in (torch.bfloat16, torch.float16):
        yh = layer.to(dtype)(x.to(dtype))
        assert yh.dtype == dtype
        y32 = cpu.linear(x.to(dtype).float().reshape(6, 200), layer.packed(), layer.bias.float(),
                         layer._kernel_cache[cpu.NAME][1])
        torch.testing.assert_close(yh, y32.to(dtype).reshape(2, 3, 33), rtol=0, atol=0)
        layer = layer.float()


def test_gradients_take_the_reference(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    packed = random_v2a(5, 70, 3, 64, kept=2, n_outliers=3, seed=1)
    x = torch.randn(2, 70, requires_grad=True)
    dispatch.linear(x, packed).sum().backward()
    torch.testing.assert_close(x.grad, decode(packed).float().sum(0).expand(2, 70), rtol=0, atol=0)


def test_the_layers_fast_path_yields_to_every_change(monkeypatch):
    """After a CPU-kernel call the layer keeps a shortcut; an override, a gradient, a replaced or edited
    buffer, another dtype each send the next call back through dispatch."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    packed = random_v2a(12, 130, 3, 64, library=2, kept=2, n_outliers=5, seed=4)
    layer = XFPLinear.from_packed(packed, torch.randn(12, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(1, 130, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert layer._fast is not None and torch.equal(layer(x), y)
    exact = F.linear(x, decode(packed).float(), layer.bias)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    torch.testing.assert_close(layer(x), exact, rtol=0, atol=0)
    monkeypatch.delenv(dispatch.ENV_VAR)
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(layer(xg), exact, rtol=0, atol=0)  # the differentiable reference
    assert torch.equal(layer(x), y)
    layer.xfp_offset_table = torch.zeros(256, dtype=torch.float16)  # a replaced buffer
    Oracle(layer.packed()).check(layer(x) - layer.bias, x)
    assert not torch.equal(layer(x), y)


@pytest.mark.parametrize("batch", [1, 3, cpu.FUSED_MAX_M + 1])
def test_the_decode_shaped_shortcut_gives_the_bits_of_the_general_path(monkeypatch, batch):
    """[b, 1, cols] float32 (decode) is written straight in the output's shape (no reshape or view); it has
    the very bits of the 2-D call, past FUSED_MAX_M rows (the tiled path) too, and with a bias."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    packed = random_v2a(40, 300, 4, 64, kept=3, n_outliers=6, seed=9)
    layer = XFPLinear.from_packed(packed)
    x = torch.randn(batch, 1, 300, generator=torch.Generator().manual_seed(2))
    flat = layer(x.reshape(batch, 300))
    assert layer._fast is not None
    y = layer(x)
    assert y.shape == (batch, 1, 40) and y.is_contiguous()
    assert torch.equal(y.reshape(batch, 40), flat)
    Oracle(packed).check(flat, x.reshape(batch, 300))
    with_bias = XFPLinear.from_packed(packed, torch.randn(40, generator=torch.Generator().manual_seed(3)))
    with_bias(x)
    assert torch.equal(with_bias(x), y + with_bias.bias)
