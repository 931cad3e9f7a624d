"""The H-Process search: a pure function of the measurement table (`xfp.fit.table`) and a byte budget.

Two searches, both bounded by the operator floors from above (no matrix is stored better than auto-select
would store it at --floor-strict / --floor-lazy: the table holds nothing more expensive) and by the
minimum floors from below (no matrix is chosen whose cosine statistic is under --min-floor-* of its class):

- `stepwise`, the published relaxation: start at the operator floor pair, lower the lazy floor by `step`
  down to its minimum, then the strict floor down to its minimum (strict >= lazy throughout); at each
  floor pair every matrix takes auto-select's choice (`choose`); stop at the first pair that fits.
- `allocate`, greedy on the per-matrix tables: every matrix starts at its operator-floor choice; downgrades
  along each matrix's lower convex hull of (bytes, estimated error) are taken cheapest error per byte saved
  first until the plan fits (the Lagrangian solution: at every step each matrix sits where the marginal
  error per byte is below the common price); left-over bytes are then spent on the upgrades with the best
  error saved per byte. The error estimate is the sum over matrices of ||W - W_hat||^2 / ||W||^2.

Sizes are whole output tensor files: the chosen candidates' honest bytes plus `Table.fixed_bytes`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from xfp.errors import XFPError
from xfp.fit.table import MatrixTable, Table

METHODS = ("allocate", "stepwise")
DEFAULT_METHOD = "allocate"
"""At equal bytes the measured KL on SmolLM2 ties with stepwise's (docs/FIT.md, benchmarks/fit_compare.py);
the allocation reaches any size between the smallest plan and the operator floors' plan, where the stepwise
ladder has rungs 1.5-2.6% of fp16 apart: it fits budgets, and finds the smallest passing size, more finely."""


class BudgetError(XFPError):
    """The budget cannot be met above the boundaries. Raised by `xfp fit`, its message names the smallest size
    that passed the quality checks (or says that none did); raised by the search alone it names the smallest
    plan above the minimum floors, unchecked."""


@dataclass(frozen=True)
class Floors:
    """A floor pair on the cosine statistic: strict (attention, dense MLP) >= lazy (routed experts)."""

    strict: float
    lazy: float

    def __post_init__(self) -> None:
        for name in ("strict", "lazy"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise XFPError(f"floor {name} must be a cosine in [-1, 1], got {v}")
        if self.lazy > self.strict:
            raise XFPError(f"floors out of order: lazy {self.lazy} must not exceed strict {self.strict}")

    def of(self, cls: str) -> float:
        return self.strict if cls == "strict" else self.lazy


@dataclass
class Plan:
    """One candidate index per matrix (table order) and what it costs.

    method: "stepwise", "allocate" or "floors"; floors: the floor pair (stepwise), or the lowest statistic
    chosen per class (allocate); total_bytes: the output tensor files; error: the summed estimate;
    steps: the search's trace, [{floors, bytes, error, fits}] (stepwise) or [{price, bytes, error}] (allocate).
    """

    method: str
    choice: list[int]
    total_bytes: int
    error: float
    floors: Floors
    steps: list[dict] = field(default_factory=list)

    def summary(self, table: Table) -> dict:
        bits = {}
        for m, i in zip(table.matrices, self.choice):
            bits[m.candidates[i].bits] = bits.get(m.candidates[i].bits, 0) + m.weights
        weights = sum(m.weights for m in table.matrices)
        q_bytes = sum(m.candidates[i].bytes for m, i in zip(table.matrices, self.choice))
        return {"method": self.method, "total_bytes": self.total_bytes, "quantized_bytes": q_bytes,
                "honest_bits": 8 * q_bytes / weights if weights else None,
                "fraction_of_fp16": self.total_bytes / table.fp16_bytes, "error": self.error,
                "floors": {"strict": self.floors.strict, "lazy": self.floors.lazy},
                "weights_by_bits": {str(b): n for b, n in sorted(bits.items())}}


def choose(m: MatrixTable, floor: float, statistic: str) -> int:
    """Auto-select's pick at `floor`: the first candidate (cheapest first) whose statistic meets it, else the
    one with the best statistic."""
    for i, c in enumerate(m.candidates):
        if c.stats[statistic] >= floor:
            return i
    return max(range(len(m.candidates)), key=lambda i: (m.candidates[i].stats[statistic], -i))


def plan_bytes(table: Table, choice: list[int]) -> int:
    return table.fixed_bytes + sum(m.candidates[i].bytes for m, i in zip(table.matrices, choice))


def plan_error(table: Table, choice: list[int]) -> float:
    return sum(m.candidates[i].error for m, i in zip(table.matrices, choice))


def at_floors(table: Table, floors: Floors, method: str = "floors") -> Plan:
    choice = [choose(m, floors.of(m.cls), table.statistic) for m in table.matrices]
    return Plan(method, choice, plan_bytes(table, choice), plan_error(table, choice), floors)


def _lowered(start: float, stop: float, step: float) -> list[float]:
    """start, start - step, ... down to stop (stop included once), rounded to 1e-9."""
    out, k = [], 1
    while round(start - k * step, 9) > stop:
        out.append(round(start - k * step, 9))
        k += 1
    return out + ([stop] if stop < start else [])


def stepwise_path(upper: Floors, lower: Floors, step: float) -> list[Floors]:
    """The published relaxation: the operator pair, then lazy lowered to its minimum, then strict."""
    check_bounds(upper, lower)
    if not step > 0:
        raise XFPError(f"--floor-step must be > 0, got {step}")
    path = [upper]
    path += [Floors(upper.strict, f) for f in _lowered(upper.lazy, lower.lazy, step)]
    path += [Floors(f, lower.lazy) for f in _lowered(upper.strict, max(lower.strict, lower.lazy), step)]
    return path


def check_bounds(upper: Floors, lower: Floors) -> None:
    if lower.strict > upper.strict or lower.lazy > upper.lazy:
        raise XFPError(f"minimum floors (strict {lower.strict}, lazy {lower.lazy}) must not exceed the floors "
                       f"(strict {upper.strict}, lazy {upper.lazy})")


def stepwise(table: Table, budget: int, upper: Floors, lower: Floors, step: float) -> Plan:
    """The first floor pair on `stepwise_path` whose plan fits `budget` bytes; BudgetError if none."""
    steps = []
    for floors in stepwise_path(upper, lower, step):
        plan = at_floors(table, floors, "stepwise")
        steps.append({"floors": [floors.strict, floors.lazy], "bytes": plan.total_bytes, "error": plan.error,
                      "fits": plan.total_bytes <= budget})
        if plan.total_bytes <= budget:
            plan.steps = steps
            return plan
    raise BudgetError(_refusal(table, budget, lower, min(s["bytes"] for s in steps), "stepwise relaxation"))


def _feasible(m: MatrixTable, upper: Floors, lower: Floors, statistic: str) -> list[int]:
    """Candidates of `m` allowed by the bounds: statistic >= the class minimum, bytes <= the operator
    choice's. Never empty: without any, the auto-select pick at the minimum floor."""
    cap = m.candidates[choose(m, upper.of(m.cls), statistic)].bytes
    ok = [i for i, c in enumerate(m.candidates) if c.stats[statistic] >= lower.of(m.cls) and c.bytes <= cap]
    return ok or [choose(m, lower.of(m.cls), statistic)]


def hull(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """(bytes, error, index) points -> the lower convex hull of the Pareto front, by bytes ascending (error
    strictly descending). Ties: fewer bytes, then lower error, then lower index."""
    front: list[tuple[int, float, int]] = []
    for p in sorted(points, key=lambda p: (p[0], p[1], p[2])):
        if front and p[1] >= front[-1][1]:
            continue  # dominated: no fewer bytes, no lower error
        front.append(p)
    out: list[tuple[int, float, int]] = []
    for p in front:
        while len(out) >= 2:
            (b0, e0, _), (b1, e1, _) = out[-2], out[-1]
            # drop out[-1] if it lies on or above the segment out[-2] -> p
            if (e1 - e0) * (p[0] - b0) >= (p[1] - e0) * (b1 - b0):
                out.pop()
            else:
                break
        out.append(p)
    return out


def minimum_bytes(table: Table, upper: Floors, lower: Floors) -> int:
    """The smallest output any plan within the bounds reaches."""
    return table.fixed_bytes + sum(min(m.candidates[i].bytes for i in _feasible(m, upper, lower, table.statistic))
                                   for m in table.matrices)


def allocate(table: Table, budget: int, upper: Floors, lower: Floors) -> Plan:
    """Greedy (Lagrangian) allocation of `budget` bytes over the matrices; BudgetError if it cannot fit."""
    check_bounds(upper, lower)
    hulls = [hull([(m.candidates[i].bytes, m.candidates[i].error, i) for i in _feasible(m, upper, lower, table.statistic)])
             for m in table.matrices]
    pos = [len(h) - 1 for h in hulls]  # start at the best (most expensive) hull point
    total = table.fixed_bytes + sum(h[p][0] for h, p in zip(hulls, pos))
    heap: list[tuple[float, int]] = []

    def push(k: int) -> None:
        if pos[k] > 0:
            (b0, e0, _), (b1, e1, _) = hulls[k][pos[k] - 1], hulls[k][pos[k]]
            heapq.heappush(heap, ((e0 - e1) / (b1 - b0), k))

    for k in range(len(hulls)):
        push(k)
    steps = [{"price": 0.0, "bytes": total}]
    while total > budget and heap:
        price, k = heapq.heappop(heap)
        total -= hulls[k][pos[k]][0] - hulls[k][pos[k] - 1][0]
        pos[k] -= 1
        push(k)
        steps.append({"price": price, "bytes": total})
    if total > budget:
        raise BudgetError(_refusal(table, budget, lower, total, "allocation"))
    choice = [h[p][2] for h, p in zip(hulls, pos)]
    total = _spend_slack(table, budget, upper, lower, choice)
    plan = Plan("allocate", choice, total, plan_error(table, choice), _achieved(table, choice), [])
    plan.steps = [{"price": s["price"], "bytes": s["bytes"]} for s in steps[:: max(1, len(steps) // 200)]]
    plan.steps.append({"price": None, "bytes": total, "error": plan.error})
    return plan


def _spend_slack(table: Table, budget: int, upper: Floors, lower: Floors, choice: list[int]) -> int:
    """Upgrade matrices while bytes are left: each time the upgrade with the most error saved per byte
    among those that fit (any feasible candidate, not only hull points). Changes `choice`; returns bytes."""
    total = plan_bytes(table, choice)
    feasible = [_feasible(m, upper, lower, table.statistic) for m in table.matrices]
    while True:
        best = None
        for k, m in enumerate(table.matrices):
            cur = m.candidates[choice[k]]
            for i in feasible[k]:
                c = m.candidates[i]
                extra = c.bytes - cur.bytes
                gain = cur.error - c.error
                if gain > 0 and 0 < extra <= budget - total:
                    key = (gain / extra, -k, -i)
                    if best is None or key > best[0]:
                        best = (key, k, i, extra)
        if best is None:
            return total
        _, k, i, extra = best
        choice[k] = i
        total += extra


def _achieved(table: Table, choice: list[int]) -> Floors:
    """The lowest statistic chosen in each class (1.0 for a class with no matrix)."""
    low = {"strict": 1.0, "lazy": 1.0}
    for m, i in zip(table.matrices, choice):
        low[m.cls] = min(low[m.cls], m.candidates[i].stats[table.statistic])
    return Floors(low["strict"], min(low["lazy"], low["strict"]))


def smallest_bytes(table: Table, upper: Floors, lower: Floors, method: str = DEFAULT_METHOD,
                   step: float = 0.0025) -> int:
    """The smallest budget `method` can meet within the bounds (for stepwise: the smallest plan on its path)."""
    if method == "stepwise":
        return min(at_floors(table, f).total_bytes for f in stepwise_path(upper, lower, step))
    return minimum_bytes(table, upper, lower)


def search(table: Table, budget: int, upper: Floors, lower: Floors, method: str = DEFAULT_METHOD,
           step: float = 0.0025) -> Plan:
    if method not in METHODS:
        raise XFPError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    smallest = minimum_bytes(table, upper, lower)
    if budget < smallest:
        raise BudgetError(_refusal(table, budget, lower, smallest, "any plan"))
    if method == "stepwise":
        return stepwise(table, budget, upper, lower, step)
    return allocate(table, budget, upper, lower)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _refusal(table: Table, budget: int, lower: Floors, smallest: int, what: str) -> str:
    """The search's own refusal: it names the smallest plan above the minimum floors, a size that no quality
    check has seen (`xfp.fit.run` checks sizes before it names one as passing)."""
    return (f"budget {mib(budget)} ({budget / table.fp16_bytes:.1%} of fp16) cannot be met above the minimum floors "
            f"(strict {lower.strict}, lazy {lower.lazy}): the smallest plan ({what}) is {mib(smallest)} "
            f"({smallest / table.fp16_bytes:.1%}, not quality-checked); raise --budget, "
            f"or lower --min-floor-strict/--min-floor-lazy")


def format_plan(table: Table, plan: Plan, budget: int) -> str:
    """A printable plan: the totals, then one line per matrix."""
    s = plan.summary(table)
    lines = [f"plan ({plan.method}): {mib(plan.total_bytes)} of budget {mib(budget)} "
             f"({s['fraction_of_fp16']:.1%} of fp16 {mib(table.fp16_bytes)}), "
             f"{s['honest_bits']:.3f} honest bits/weight over {len(table.matrices)} matrices, "
             f"floors strict {plan.floors.strict:.4f} / lazy {plan.floors.lazy:.4f}, est. error {plan.error:.4f}"]
    for m, i in zip(table.matrices, plan.choice):
        c = m.candidates[i]
        lines.append(f"  {m.name[-52:]:52s} {m.cls:6s} {c.bits}b g{c.group:<4d} out {c.outliers:<6d} "
                     f"{c.bytes:>9d} B  {table.statistic} {c.stats[table.statistic]:.4f}  err {c.error:.5f}")
    return "\n".join(lines)
