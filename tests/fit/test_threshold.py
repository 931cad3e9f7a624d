"""The search for the smallest passing size, with a fake quality check: exact, no model."""

from __future__ import annotations

import pytest

from xfp.errors import XFPError
from xfp.fit.threshold import smallest_passing


class FakeCheck:
    """Passes every size >= `threshold`; records what it was asked."""

    def __init__(self, threshold: float):
        self.threshold, self.asked = threshold, []

    def __call__(self, size: int) -> bool:
        self.asked.append(size)
        return size >= self.threshold


def identity(budget: int) -> int:
    return budget


def grid(unit: int):
    """Plans exist only at multiples of `unit`: the plan at a budget is the largest one under it."""
    return lambda budget: budget // unit * unit


def test_the_budget_that_passes_is_the_only_attempt():
    check = FakeCheck(500)
    found = smallest_passing(identity, check, start=600, top=1000, step=30, tolerance=10, attempts=7)
    assert check.asked == [600]
    assert (found.passed, found.failed, found.exhausted, found.top_failed) == (600, None, False, False)
    assert [p.phase for p in found.probes] == ["budget"]


@pytest.mark.parametrize("threshold", [401, 437, 512, 599, 777, 1000])
def test_bisection_converges_to_the_threshold_within_tolerance(threshold):
    check = FakeCheck(threshold)
    found = smallest_passing(identity, check, start=400, top=1000, step=30, tolerance=10, attempts=20)
    assert threshold <= found.passed <= threshold + 10
    assert found.largest_failed < threshold and found.passed - found.failed <= 10
    assert not found.exhausted and not found.top_failed
    assert check.asked == [p.size for p in found.probes]  # every check recorded, none repeated
    assert len(set(check.asked)) == len(check.asked)


def test_step_up_doubles_until_a_size_passes_then_bisects():
    check = FakeCheck(530)
    found = smallest_passing(identity, check, start=400, top=1000, step=30, tolerance=10, attempts=20)
    # 400 fails; steps +30, +60, +120 (doubling): 430, 490 fail, 610 passes; then bisection in (490, 610]
    assert check.asked[:4] == [400, 430, 490, 610]
    assert [p.phase for p in found.probes[:4]] == ["budget", "step-up", "step-up", "step-up"]
    assert check.asked[4:] == [550, 520, 535, 527]  # (527, 535]: within the tolerance of 10
    assert all(p.phase == "bisect" for p in found.probes[4:])
    assert (found.passed, found.largest_failed) == (535, 527)


def test_step_up_is_capped_at_the_top_plan():
    check = FakeCheck(990)
    found = smallest_passing(identity, check, start=400, top=1000, step=300, tolerance=5, attempts=20)
    assert check.asked[:3] == [400, 700, 1000]  # 700 + 600 would pass the top: the top plan instead
    assert 990 <= found.passed <= 995


def test_nothing_passes_names_the_largest_size_tried():
    check = FakeCheck(2000)
    found = smallest_passing(identity, check, start=400, top=1000, step=100, tolerance=10, attempts=20)
    assert found.passed is None and found.top_failed and not found.exhausted
    assert check.asked == [400, 500, 700, 1000]
    assert found.largest_tried == 1000 and found.largest_failed == 1000


def test_a_budget_above_the_top_plan_that_fails_means_nothing_passes():
    check = FakeCheck(2000)
    found = smallest_passing(identity, check, start=5000, top=1000, step=100, tolerance=10, attempts=20)
    assert check.asked == [1000] and found.top_failed


def test_attempts_spent_while_stepping_up_leave_no_passing_size():
    check = FakeCheck(900)
    found = smallest_passing(identity, check, start=400, top=1000, step=10, tolerance=10, attempts=3)
    assert check.asked == [400, 410, 430]
    assert found.passed is None and found.exhausted and not found.top_failed
    assert found.largest_tried == 430


def test_attempts_spent_while_bisecting_keep_the_smallest_checked_pass():
    check = FakeCheck(437)
    found = smallest_passing(identity, check, start=400, top=1000, step=100, tolerance=1, attempts=4)
    # 400 fails, 500 passes, 450 passes, 425 fails: out of attempts with the bracket (425, 450]
    assert check.asked == [400, 500, 450, 425]
    assert (found.passed, found.largest_failed, found.exhausted) == (450, 425, True)


def test_only_checked_sizes_are_named_when_plans_are_coarser_than_budgets():
    check = FakeCheck(437)
    size_at = grid(25)
    found = smallest_passing(size_at, check, start=400, top=1000, step=30, tolerance=5, attempts=20)
    # plans at 400, 425, 450, ...: the smallest that passes is 450, the largest that fails 425
    assert (found.passed, found.largest_failed) == (450, 425)
    assert found.passed in check.asked and found.largest_failed in check.asked
    assert len(set(check.asked)) == len(check.asked)  # budgets landing on a checked plan cost no attempt
    assert all(s % 25 == 0 for s in check.asked)


def test_the_smallest_plan_is_checked_first_when_the_budget_is_under_it():
    check = FakeCheck(0)
    # the caller starts at the smallest plan (`xfp.fit.run`): it passes, nothing else is written
    found = smallest_passing(identity, check, start=300, top=1000, step=30, tolerance=10, attempts=7)
    assert check.asked == [300] and found.passed == 300


@pytest.mark.parametrize("kwargs", [dict(step=0), dict(tolerance=0), dict(attempts=0)])
def test_bad_parameters_are_user_errors(kwargs):
    args = dict(start=1, top=10, step=1, tolerance=1, attempts=1) | kwargs
    with pytest.raises(XFPError, match="must be >= 1"):
        smallest_passing(identity, FakeCheck(0), **args)
