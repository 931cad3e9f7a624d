"""The search over synthetic tables, with exact expectations."""

from __future__ import annotations

import pytest

from xfp.errors import XFPError
from xfp.fit import search
from xfp.fit.search import BudgetError, Floors

UP, LOW = Floors(0.99, 0.97), Floors(0.5, 0.5)

# A: hull (10, .30) (20, .10) (30, .05); B: (20, .16) lies above the segment (10, .20)-(30, .01)
A = ("strict", [(10, 0.90, 0.30), (20, 0.95, 0.10), (30, 0.99, 0.05)])
B = ("strict", [(10, 0.90, 0.20), (20, 0.95, 0.16), (30, 0.99, 0.01)])


def test_choose_is_autoselect_order(make_table):
    t = make_table([("strict", [(10, 0.90, 0.3), (20, 0.97, 0.1), (30, 0.96, 0.05)])])
    m = t.matrices[0]
    assert search.choose(m, 0.95, "p1") == 1  # first that meets the floor, not the best
    assert search.choose(m, 0.90, "p1") == 0
    assert search.choose(m, 0.99, "p1") == 1  # none meets it: the best statistic


def test_hull_drops_dominated_and_concave_points():
    pts = [(10, 0.20, 0), (20, 0.16, 1), (30, 0.01, 2), (30, 0.02, 3), (40, 0.05, 4)]
    assert search.hull(pts) == [(10, 0.20, 0), (30, 0.01, 2)]
    assert search.hull([(5, 1.0, 0)]) == [(5, 1.0, 0)]


@pytest.mark.parametrize("quantized, expect, error", [
    (60, [2, 2], 0.06),  # everything at the operator choice
    (50, [1, 2], 0.11),  # A 30 -> 20 costs 0.005 per byte, cheaper than B's 0.0095
    (40, [2, 0], 0.25),  # B 30 -> 10, then 10 bytes of slack buy A back to 30 (0.005 per byte)
    (20, [0, 0], 0.50),
])
def test_allocate_exact(make_table, quantized, expect, error):
    t = make_table([A, B])
    plan = search.allocate(t, t.fixed_bytes + quantized, UP, LOW)
    assert plan.choice == expect
    assert plan.total_bytes == t.fixed_bytes + A[1][expect[0]][0] + B[1][expect[1]][0]
    assert plan.error == pytest.approx(error, abs=1e-12)


def test_allocate_respects_the_minimum_floor(make_table):
    t = make_table([A, B])
    plan = search.allocate(t, t.fixed_bytes + 40, UP, Floors(0.92, 0.92))  # 10-byte candidates excluded
    assert plan.choice == [1, 1]
    assert plan.floors.strict == 0.95
    assert search.minimum_bytes(t, UP, Floors(0.92, 0.92)) == t.fixed_bytes + 40
    with pytest.raises(BudgetError, match="smallest plan"):
        search.search(t, t.fixed_bytes + 39, UP, Floors(0.92, 0.92))


def test_allocate_never_exceeds_the_operator_choice(make_table):
    t = make_table([A, B])
    plan = search.allocate(t, t.fixed_bytes + 1000, Floors(0.95, 0.95), LOW)
    assert plan.choice == [1, 1]  # 30-byte candidates are better than the operator floor asks


def test_lazy_matrices_use_the_lazy_floors(make_table):
    lazy = ("lazy", [(10, 0.90, 0.3), (20, 0.96, 0.1), (30, 0.99, 0.05)])
    t = make_table([A, lazy])
    plan = search.at_floors(t, Floors(0.99, 0.95))
    assert plan.choice == [2, 1]


def test_stepwise_path_relaxes_lazy_then_strict():
    path = search.stepwise_path(Floors(0.99, 0.97), Floors(0.98, 0.96), 0.005)
    assert [(f.strict, f.lazy) for f in path] == [(0.99, 0.97), (0.99, 0.965), (0.99, 0.96), (0.985, 0.96),
                                                  (0.98, 0.96)]


def test_stepwise_stops_at_the_first_fitting_pair(make_table):
    t = make_table([A, B])
    plan = search.stepwise(t, t.fixed_bytes + 45, UP, Floors(0.9, 0.9), 0.01)
    # strict floor 0.95 is the first that drops both matrices to their 20-byte candidates
    assert (plan.floors.strict, plan.choice, plan.total_bytes) == (0.95, [1, 1], t.fixed_bytes + 40)
    assert plan.steps[-1]["fits"] and not any(s["fits"] for s in plan.steps[:-1])
    # at the same bytes the allocation finds a lower estimated error (A at 30, B at 10: 0.25 < 0.26)
    assert search.allocate(t, plan.total_bytes, UP, Floors(0.9, 0.9)).error < plan.error


def test_search_refuses_below_the_smallest_plan_naming_it(make_table):
    t = make_table([A, B])
    with pytest.raises(BudgetError) as err:
        search.search(t, t.fixed_bytes + 19, UP, LOW)
    assert search.mib(t.fixed_bytes + 20) in str(err.value)
    assert "\n" not in str(err.value)


def test_floors_out_of_order_are_user_errors(make_table):
    with pytest.raises(XFPError, match="out of order"):
        Floors(0.95, 0.97)
    with pytest.raises(XFPError, match="must not exceed"):
        search.check_bounds(Floors(0.99, 0.97), Floors(0.995, 0.9))
    with pytest.raises(XFPError, match="--method"):
        search.search(make_table([A]), 10**9, UP, LOW, "magic")
