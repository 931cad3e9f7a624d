"""Baselines: honest-bit formulas, reconstruction bounds, NF tables."""

from __future__ import annotations

import math

import pytest
import torch

from xfp.evaluate import baselines as b
from xfp.format.spec import V2Layout


def test_honest_bytes_formulas():
    # 576 x 1536 (a SmolLM2 MLP matrix): 3-bit indices are 576 bytes a row exactly
    assert b.index_bytes(576, 1536, 3) == 576 * 576
    assert b.rtn_bytes(576, 1536, 3, 64) == 576 * 576 + 576 * 24 * 4
    assert 8 * b.rtn_bytes(576, 1536, 3, 64) / (576 * 1536) == pytest.approx(3.5)  # 3 + 32/64
    assert 8 * b.rtn_bytes(576, 1536, 4, 128) / (576 * 1536) == pytest.approx(4.25)  # 4 + 32/128
    assert 8 * b.nf_bytes(576, 1536, 4, 64) / (576 * 1536) == pytest.approx(4.25)  # 4 + 16/64
    assert 8 * b.nf_bytes(576, 1536, 3, 64) / (576 * 1536) == pytest.approx(3.25)
    # ragged: 100 columns at group 64 are 2 groups; 3-bit rows round up to whole bytes
    assert b.rtn_bytes(2, 100, 3, 64) == 2 * math.ceil(300 / 8) + 2 * 2 * 4
    assert b.nf_bytes(2, 100, 3, 64) == 2 * math.ceil(300 / 8) + 2 * 2 * 2
    # the index part is XFP's codes part, byte for byte
    assert b.index_bytes(7, 100, 3) == V2Layout(7, 100, 3, 0).nbytes()["codes"]


def test_rtn_matches_the_old_api_and_its_error_bound():
    torch.manual_seed(0)
    w = torch.randn(16, 200)
    w_hat, bits = b.rtn_asymmetric(w, 4, 64)
    assert bits == pytest.approx(8 * b.rtn_bytes(16, 200, 4, 64) / (16 * 200))
    assert torch.equal(w_hat, b.rtn_asymmetric_matrix(w, 4, 64))
    x, _ = b._grouped(w, 64)
    lo = torch.nan_to_num(x, nan=float("inf")).amin(-1, keepdim=True)
    hi = torch.nan_to_num(x, nan=float("-inf")).amax(-1, keepdim=True)
    step = ((hi - lo) / 15).expand_as(x).reshape(16, -1)[:, :200]
    # half a step, plus the fp16 rounding of scale and min
    assert ((w - w_hat).abs() <= step / 2 + 15 * step * 2**-10 + lo.abs().max() * 2**-10).all()
    assert len(torch.unique(w_hat[0, :64])) <= 16


def test_nf4_derivation_reproduces_bitsandbytes():
    derived = b.nf_table(4)
    published = torch.tensor(b.NF4_BITSANDBYTES)
    assert torch.allclose(derived, published, atol=4e-7, rtol=0)
    assert torch.equal(b.nf_code(4), published)


def test_nf3_table():
    t = b.nf_table(3)
    assert t.numel() == 8 and torch.equal(t, t.sort().values)
    assert t[0] == -1.0 and t[-1] == 1.0 and (t == 0).sum() == 1
    assert int((t > 0).sum()) == 4 and int((t < 0).sum()) == 3  # one more positive value, as in NF4
    # the positive half: normal quantiles at linspace(offset, 0.5, 5)[:-1], offset = mean(1-1/14, 1-1/16)
    offset = ((1 - 1 / 14) + (1 - 1 / 16)) / 2
    q = torch.special.ndtri(torch.linspace(offset, 0.5, 5, dtype=torch.float64)[:-1])
    assert torch.allclose(t[t > 0].double(), (q / q.max()).sort().values, atol=1e-7)
    assert t.tolist() == pytest.approx([-1.0, -0.5350, -0.2469, 0.0, 0.1833, 0.3820, 0.6230, 1.0], abs=1e-4)


def test_nf_absmax_uses_only_table_values():
    torch.manual_seed(1)
    w = torch.randn(8, 130)
    for bits in (3, 4):
        w_hat = b.nf_absmax_matrix(w, bits, 64)
        code = b.nf_code(bits)
        for g0 in (0, 64, 128):
            group = w[:, g0:g0 + 64]
            absmax = group.abs().amax(1, keepdim=True).half().float()
            # the nearest entry of the table to w / absmax, times absmax
            nearest = ((group / absmax).unsqueeze(-1) - code).abs().argmin(-1)
            assert torch.equal(w_hat[:, g0:g0 + 64], code[nearest] * absmax)
    assert torch.equal(b.nf_absmax_matrix(torch.zeros(2, 64), 4, 64), torch.zeros(2, 64))


def test_hqq_when_installed():
    pytest.importorskip("hqq")
    torch.manual_seed(2)
    w = torch.randn(32, 128) * 0.02
    for bits in (3, 4):
        w_hat = b.hqq_matrix(w, bits, 64)
        assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
        rtn = b.rtn_asymmetric_matrix(w, bits, 64)
        # HQQ minimises an lp error (p < 1) per group; its mean error is within reach of RTN's
        assert (w - w_hat).abs().mean() < 1.2 * (w - rtn).abs().mean()
        # at most 2^bits distinct values a group
        assert len(torch.unique(w_hat[3, :64])) <= 1 << bits
    with pytest.raises(Exception, match="multiple of group"):
        b.hqq_matrix(torch.randn(4, 100), 4, 64)
