"""Dense float16 matrices in a float32 model: the fused float16 GEMV (`cpu.half_linear`, every instruction set),
`HalfEmbedding` and `HalfLinear` (xfp.runtime.half).

Bounds: the fused path is a float32 dot product of length cols over the exactly widened weights, so against
a float64 reference `|y - x @ W.T| <= (cols + 16) * 2**-24 * sum_c |x_c| |W[r, c]|` (as the XFP kernels'
bound, docs/PERFORMANCE.md); the tiled path (more than FUSED_MAX_M rows of x) is BLAS on the widened tile.
Lookups are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xfp.runtime.dispatch import ENV_VAR
from xfp.runtime.half import HalfEmbedding, HalfLinear
from xfp.runtime.kernels import cpu

U = 2.0 ** -24
SHAPES = [(1, 1), (3, 7), (4, 16), (5, 17), (13, 100), (37, 576), (64, 1024), (9, 33)]


def isas() -> list[str]:
    try:
        return cpu.supported_isas()
    except RuntimeError:
        return []


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w.shape[1] + 16) * U * (x.double().abs() @ w.double().abs().T)


@pytest.fixture(params=isas() or [pytest.param("none", marks=pytest.mark.skip("no CPU kernel here"))])
def isa(request, monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV_VAR, request.param)
    return request.param


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
def test_fused_half_gemv_within_bound(isa, rows, cols, m):
    g = torch.Generator().manual_seed(rows * 1000 + cols * 10 + m)
    w = (torch.randn(rows, cols, generator=g) * 0.05).half()
    w[0, 0] = 6.0e4  # near float16's largest: the widening must be exact
    x = torch.randn(m, cols, generator=g)
    y = cpu.half_linear(x, w)
    ref = x.double() @ w.double().T
    assert y.dtype == torch.float32 and y.shape == (m, rows)
    assert bool(((y.double() - ref).abs() <= bound(x, w)).all())


def test_fused_half_gemv_catches_a_wrong_weight(isa):
    # the bound is tight enough to see one weight off by 0.01 (the test above is not vacuous)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g).half()
    x = torch.randn(1, 64, generator=g)
    x[0, 40] = 1.0
    bad = w.clone()
    bad[5, 40] += 0.01
    err = (cpu.half_linear(x, bad).double() - x.double() @ w.double().T).abs()
    assert bool((err > bound(x, w)).any())


def test_tiled_path_matches_the_widened_product(isa):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 70, generator=g).half()
    x = torch.randn(2, 9, 70, generator=g)  # 18 rows of x: the tiled path
    y = cpu.half_linear(x, w)
    ref = x.double() @ w.double().T
    assert y.shape == (2, 9, 300)
    assert bool(((y.double() - ref).abs() <= bound(x.reshape(-1, 70), w).reshape(2, 9, 300)).all())


@pytest.mark.parametrize("rows", [1, 4, 5, 11, 4097])
def test_results_do_not_depend_on_threads(isa, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, 96, generator=g).half()
    x = torch.randn(3, 96, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.half_linear(x, w)
        torch.set_num_threads(2)
        two = cpu.half_linear(x, w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_isas_agree_within_bound(monkeypatch):
    have = isas()
    if len(have) < 2:
        pytest.skip("one instruction set here")
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(50, 200, generator=g).half(), torch.randn(2, 200, generator=g)
    ref = x.double() @ w.double().T
    results = {}
    for name in have:
        monkeypatch.setenv(cpu.ISA_ENV_VAR, name)
        results[name] = cpu.half_linear(x, w)
        assert bool(((results[name].double() - ref).abs() <= bound(x, w)).all()), name
    assert not torch.equal(results[have[0]], results[have[-1]]) or w.shape[1] < 16  # really different code


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_come_back_in_their_dtype(dtype):
    w = torch.randn(20, 40).half()
    x = torch.randn(1, 40).to(dtype)
    y = cpu.half_linear(x, w)
    assert y.dtype == dtype
    torch.testing.assert_close(y, (x.float() @ w.float().T).to(dtype), rtol=0, atol=0)


def test_half_linear_refuses_a_wrong_weight():
    with pytest.raises(ValueError, match="float16"):
        cpu.half_linear(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="float16"):
        cpu.half_linear(torch.randn(1, 8), torch.randn(4, 9).half())


# -- the modules --------------------------------------------------------------------------------------


def table(rows=50, cols=24, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).half()


def test_embedding_lookup_is_the_widened_row():
    w = table()
    emb = HalfEmbedding(w, dtype=torch.float32, padding_idx=3)
    ids = torch.tensor([[0, 3, 49, 3], [7, 7, 1, 0]])
    assert torch.equal(emb(ids), F.embedding(ids, w.float()))
    assert emb(ids.int()).dtype == torch.float32 and emb.padding_idx == 3


def test_scaled_embedding_multiplies_after_the_cast_as_gemma_does():
    w = table()
    emb = HalfEmbedding(w, dtype=torch.float32, scale=24 ** 0.5)
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(emb(ids), F.embedding(ids, w.float()) * torch.tensor(24 ** 0.5, dtype=torch.float32))


def test_embedding_refuses_bad_ids():
    emb = HalfEmbedding(table(), dtype=torch.float32)
    with pytest.raises(TypeError, match="int32 or int64"):
        emb(torch.tensor([1.0]))
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))


def test_casts_change_the_output_dtype_not_the_stored_weight():
    w = table()
    emb = HalfEmbedding(w.clone(), dtype=torch.float32)
    head = HalfLinear.tied(emb)
    emb.to(torch.bfloat16)
    head.to(torch.bfloat16)
    assert emb.weight.dtype == torch.float16 and torch.equal(emb.weight, w)
    assert emb(torch.tensor([4])).dtype == torch.bfloat16
    emb.float()
    assert emb.dtype == torch.float32 and emb.weight.dtype == torch.float16


def test_tied_linear_reads_its_source_and_holds_nothing():
    emb = HalfEmbedding(table(), dtype=torch.float32)
    head = HalfLinear.tied(emb)
    assert head.is_tied and dict(head.named_buffers()) == {} and list(head.state_dict()) == []
    x = torch.randn(1, 1, 24)
    before = head(x)
    with torch.no_grad():
        emb.weight[7] = 2.0
    after = head(x)
    assert after[0, 0, 7] != before[0, 0, 7] and torch.equal(after[..., :7], before[..., :7])


def test_linear_reference_kernel_is_f_linear_on_the_widened_weight(monkeypatch):
    w = table(rows=70, cols=40)
    head = HalfLinear(w)
    x = torch.randn(1, 1, 40)
    monkeypatch.setenv(ENV_VAR, "reference")
    assert torch.equal(head(x), F.linear(x, w.float()))
    monkeypatch.delenv(ENV_VAR)
    fused = head(x)
    assert bool(((fused.double() - x.double() @ w.double().T).abs() <= bound(x[0], w)).all())


def test_linear_with_gradient_takes_the_differentiable_path():
    w = table(rows=6, cols=8)
    head = HalfLinear(w)
    x = torch.randn(1, 8, requires_grad=True)
    head(x).sum().backward()
    torch.testing.assert_close(x.grad, w.float().sum(0, keepdim=True), rtol=0, atol=0)


def test_constructors_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match="float16 matrix"):
        HalfEmbedding(torch.randn(4, 4))
    with pytest.raises(ValueError, match="float16 matrix"):
        HalfLinear(torch.randn(4, 4).half()[0])
    with pytest.raises(ValueError, match="either weight or source"):
        HalfLinear()
    with pytest.raises(ValueError, match="HalfEmbedding"):
        HalfLinear(source=torch.nn.Embedding(3, 4))
