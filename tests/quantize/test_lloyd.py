"""Batched Lloyd against a plain per-row reference, and its edge cases."""

import torch

from xfp.quantize import lloyd


def reference_lloyd(row: torch.Tensor, mass: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """One row, the textbook way: quantile init, assign to nearest (ties up), mean of each cluster."""
    order = torch.sort(row, stable=True).indices
    v, m = row[order].double(), mass[order].double()
    cum = torch.cumsum(m, 0)
    targets = cum[-1] * (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = v[torch.searchsorted(cum, targets).clamp(max=len(v) - 1)]
    for _ in range(iterations):
        t = ((c[1:] + c[:-1]) / 2).float().double()
        cluster = (v.float().double().unsqueeze(1) >= t.unsqueeze(0)).sum(1)
        new = c.clone()
        for j in range(k):
            sel = (cluster == j) & (m > 0)
            if m[sel].sum() > 0:
                new[j] = (m[sel] * v[sel]).sum() / m[sel].sum()
        new = torch.sort(new).values
        if torch.equal(new, c):
            break
        c = new
    return c


def fit_rows(w: torch.Tensor, mass: torch.Tensor, k: int, iterations: int = 16) -> torch.Tensor:
    rows = lloyd.sort_rows(w)
    return lloyd.fit(rows, mass.gather(1, rows.order), k, iterations)


def test_batched_fit_matches_per_row_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 50, generator=g)
    mass = (torch.rand(6, 50, generator=g) > 0.1).double()
    got = fit_rows(w, mass, 8)
    for r in range(6):
        want = reference_lloyd(w[r], mass[r], 8, 16)
        torch.testing.assert_close(got[r], want, rtol=1e-9, atol=1e-12)


def test_screen_equals_sums_over_the_assignment():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 333, generator=g)
    mass = (torch.rand(5, 333, generator=g) > 0.05).float()
    c = fit_rows(w, mass, 16).to(torch.float16)
    w_hat = torch.gather(c, 1, lloyd.assign(w, c).long()).double()
    rows = lloyd.sort_rows(w)
    dot, norm2 = lloyd.screen(rows, mass.gather(1, rows.order), c)
    torch.testing.assert_close(dot, (mass * w * w_hat).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm2, (mass * w_hat * w_hat).sum(1), rtol=1e-12, atol=1e-12)


def test_constant_zero_and_short_rows_are_exact():
    w = torch.tensor([[0.5] * 5, [0.0] * 5, [1.0, -1.0, 2.0, 0.0, 0.0]])
    c = fit_rows(w, torch.ones_like(w), 16).to(torch.float16)
    w_hat = torch.gather(c, 1, lloyd.assign(w, c).long()).float()
    assert torch.equal(w_hat, w)


def test_assign_is_nearest_entry_and_ties_go_up():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 300, generator=g)
    c = fit_rows(w, torch.ones_like(w), 8).to(torch.float16)
    idx = lloyd.assign(w, c)
    dist = (w.unsqueeze(-1) - c.float().unsqueeze(1)).abs()
    chosen = dist.gather(2, idx.long().unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen <= dist.min(-1).values + 1e-7)
    tie = torch.tensor([[0.5]])
    assert lloyd.assign(tie, torch.tensor([[0.0, 1.0]], dtype=torch.float16)).item() == 1
