"""The smallest size that passes the quality boundary: step up until a size passes, then bisect.

A pure function of two callables, so it is tested without a model:

- `size_at(budget) -> bytes`: the size of the plan the search returns for `budget` (cheap: the search is a
  pure function of the table). Both searches return, for the budget equal to a plan's own size, that same
  plan; so a size that passed is itself a budget that passes.
- `check(size) -> bool`: write the plan of that size and check it (expensive: a write and a quality check).
  It is called at most `attempts` times and never twice for one size: budgets whose plans have a size
  already checked reuse its verdict.

Procedure, from `start` (the operator's budget, or the smallest plan when the budget is under it):
1. the plan at `start` is checked; if it passes the search stops there (one attempt);
2. step up: budgets `start + step`, `+ 2 step`, `+ 4 step`, ... (the step doubles), capped at `top`, the
   budget of the plan at the operator floors (the last resort), until a size passes; if `top` fails,
   nothing passes;
3. bisect between the largest failing budget and the smallest passing size until they are within
   `tolerance` bytes, or the attempts are spent.

Sizes that failed below a passing one are assumed to fail at every smaller budget (quality grows with
size); the result names only sizes that were checked, whatever the truth of that assumption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from xfp.errors import XFPError


@dataclass(frozen=True)
class Probe:
    """One checked size. budget: the budget searched; size: its plan's bytes; phase: "budget", "step-up"
    or "bisect"."""

    budget: int
    size: int
    passed: bool
    phase: str


@dataclass(frozen=True)
class Threshold:
    """What the search found.

    probes: every checked size, in order; passed: the smallest size that passed (None: none did);
    failed: the largest budget known to fail (None: the first size passed); top_failed: the plan at `top`
    was checked and failed (nothing passes); exhausted: the attempts ran out before the search finished.
    """

    probes: tuple[Probe, ...]
    passed: int | None
    failed: int | None
    top_failed: bool
    exhausted: bool

    @property
    def largest_tried(self) -> int | None:
        return max((p.size for p in self.probes), default=None)

    @property
    def largest_failed(self) -> int | None:
        """The largest checked size that failed below the smallest passing one (None: there is none)."""
        bound = self.passed if self.passed is not None else float("inf")
        return max((p.size for p in self.probes if not p.passed and p.size < bound), default=None)



def smallest_passing(size_at: Callable[[int], int], check: Callable[[int], bool], *, start: int, top: int,
                     step: int, tolerance: int, attempts: int) -> Threshold:
    """Step up from `start` by a doubling `step` (capped at `top`) until a size passes, then bisect to
    `tolerance` bytes; at most `attempts` calls of `check`. All arguments in bytes."""
    if step < 1 or tolerance < 1 or attempts < 1:
        raise XFPError(f"step, tolerance and attempts must be >= 1, got {step}, {tolerance} and {attempts}")
    probes: list[Probe] = []
    known: dict[int, bool] = {}

    def probe(budget: int, phase: str) -> bool | None:
        """The verdict of the plan at `budget`; None when it needs a check and none is left."""
        size = size_at(budget)
        if size not in known:
            if len(probes) >= attempts:
                return None
            known[size] = bool(check(size))
            probes.append(Probe(budget, size, known[size], phase))
        return known[size]

    def result(failed: int | None, top_failed: bool = False, exhausted: bool = False) -> Threshold:
        passed = min((p.size for p in probes if p.passed), default=None)
        return Threshold(tuple(probes), passed, failed, top_failed, exhausted)

    start = min(start, top)
    if probe(start, "budget"):
        return result(None)
    failed, rise, passed = start, step, None
    while passed is None:
        if failed >= top:
            return result(failed, top_failed=True)
        budget = min(top, failed + rise)
        ok = probe(budget, "step-up")
        if ok is None:
            return result(failed, exhausted=True)
        if ok:
            passed = size_at(budget)
        else:
            failed, rise = budget, 2 * rise
    while passed - failed > tolerance:
        mid = (failed + passed) // 2
        ok = probe(mid, "bisect")
        if ok is None:
            return result(failed, exhausted=True)
        if ok:
            passed = min(passed, size_at(mid))
        else:
            failed = mid
    return result(failed)


__all__ = ["Probe", "Threshold", "smallest_passing"]
