"""`fit_model`: a source and a memory budget in, the best XFP folder within the budget out (or a refusal).

1. Measure the table once (`xfp.fit.table`, cached, resumable).
2. Search it (`xfp.fit.search`, pure): the plan is printed and written to OUT/fit-plan.txt.
3. Check the predicted memory against --max-ram (`xfp.fit.boundaries.forecast`).
4. Write the plan through the normal pipeline in a fresh process (peak RSS measured), load the folder in
   another (peak RSS while loading), take KL against the source on the offline text and the generation
   check. If the plan at the budget passes, that is the fit (one attempt). If it fails, or the budget is
   under the smallest plan above the minimum floors, `xfp.fit.threshold.smallest_passing` looks for the
   smallest size that passes: steps up (`STEP_UP` of the fp16 size, doubling) until one passes, the plan at
   the operator floors last, then bisects to `TOLERANCE`, at most `retries` + 1 sizes written and checked.
   The run stops with a one-line BudgetError naming the smallest size that passed (its KL, the --budget
   that gives it) or saying that none did; OUT then keeps only the report.
5. OUT/fit.json, FIT.md and fit.png record every attempt.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

from xfp.config import QuantConfig
from xfp.errors import XFPError
from xfp.fit import boundaries, report as reporting, search, table as tables, threshold
from xfp.fit.search import BudgetError, Floors, mib

DEFAULT_MIN_FLOORS = Floors(0.95, 0.90)
"""Lowest floors the search may go to unless --min-floor-strict / --min-floor-lazy say otherwise."""

DEFAULT_RETRIES = 6
"""Sizes checked after the first when it fails (each is written and checked, about a minute on SmolLM2):
enough for one or two steps up and four or five bisection steps, i.e. the smallest passing size to within a
few percent of fp16 / 2**4."""

STEP_UP = 0.03
"""First step above a failing budget, as a fraction of the source's fp16 size; it doubles after each failure."""

TOLERANCE = 0.01
"""Bisection stops when the smallest passing size is within this fraction of the fp16 size of the largest
failing budget."""

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*")


def parse_size(text: str) -> int:
    """'60MiB', '1.5GB', '500M', '123456' -> bytes (KB/MB/GB: powers of 1000; KiB/MiB/GiB: of 1024)."""
    m = _SIZE.fullmatch(str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise XFPError(f"--budget: expected a size such as 60MiB or 1.5GB, got {text!r}")
    power = " KMGT".index(m.group(2).upper() or " ")
    n = float(m.group(1)) * (1024 if m.group(3) else 1000) ** power
    if n < 1:
        raise XFPError(f"--budget must be positive, got {text!r}")
    return int(n)


def budget_bytes(budget: str | int | None, fraction: float | None, fp16_bytes: int) -> int:
    if (budget is None) == (fraction is None):
        raise XFPError("give exactly one of --budget SIZE and --budget-fraction F")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise XFPError(f"--budget-fraction must be in (0, 1], got {fraction}")
        return int(fraction * fp16_bytes)
    return budget if isinstance(budget, int) else parse_size(budget)


def fit_model(src: str | Path, out: str | Path, *, budget: str | int | None = None,
              budget_fraction: float | None = None, config: QuantConfig | None = None,
              min_floors: Floors = DEFAULT_MIN_FLOORS, step: float = 0.0025, method: str = search.DEFAULT_METHOD,
              quantize_embeddings: bool = False, max_ram: int | None = None,
              max_kl: float = boundaries.DEFAULT_MAX_KL, windows: int = 4, ctx: int = 512, check: bool = True,
              retries: int = DEFAULT_RETRIES, step_up: float = STEP_UP, tolerance: float = TOLERANCE,
              table_cache: Path | None = None, force: bool = False, progress: bool = True, echo=print) -> dict:
    """Fit `src` (alias, HF folder or GGUF file) into `out` under the budget; returns the fit report."""
    from xfp.evaluate.models import resolve

    config = config or QuantConfig()
    upper = Floors(config.floor_strict, config.floor_lazy)
    search.check_bounds(upper, min_floors)
    if method not in search.METHODS:
        raise XFPError(f"--method must be one of {', '.join(search.METHODS)}, got {method!r}")
    if budget is not None and not isinstance(budget, int):
        parse_size(budget)  # a bad size fails before anything is measured
    if windows < 1 or retries < 0:
        raise XFPError(f"--windows must be >= 1 and --retries >= 0, got {windows} and {retries}")
    if not (0 < step_up <= 1 and 0 < tolerance <= 1):
        raise XFPError(f"step_up and tolerance are fractions of the fp16 size in (0, 1], got {step_up} and "
                       f"{tolerance}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise XFPError(f"{out}: output folder is not empty; use --force to overwrite")
    src_path = resolve(src)

    began = time.perf_counter()
    table = tables.measure(src_path, config, quantize_embeddings=quantize_embeddings, cache_dir=table_cache,
                           progress=progress)
    table_seconds = time.perf_counter() - began
    target = budget_bytes(budget, budget_fraction, table.fp16_bytes)
    began = time.perf_counter()
    smallest = search.smallest_bytes(table, upper, min_floors, method, step)
    path_steps = [search.at_floors(table, f, "stepwise") for f in search.stepwise_path(upper, min_floors, step)]
    search_seconds = time.perf_counter() - began
    forecast = boundaries.check_forecast(table, max_ram)
    report = {"source": str(src_path), "method": method, "statistic": table.statistic,
              "budget_bytes": target, "fp16_bytes": table.fp16_bytes,
              "upper": {"strict": upper.strict, "lazy": upper.lazy},
              "lower": {"strict": min_floors.strict, "lazy": min_floors.lazy},
              "quantize_embeddings": quantize_embeddings, "max_kl": max_kl, "max_ram": max_ram,
              "matrices": len(table.matrices), "table_seconds": table_seconds, "search_seconds": search_seconds,
              "table_cache": str(table_cache or tables.default_cache_dir()),
              "stepwise_steps": [{"floors": [p.floors.strict, p.floors.lazy], "bytes": p.total_bytes,
                                  "error": p.error, "fits": p.total_bytes <= target} for p in path_steps],
              "memory": {"forecast": forecast.to_dict()}, "attempts": []}

    if not check or target >= smallest:
        plan = search.search(table, target, upper, min_floors, method, step)  # below `smallest`: names it, unchecked
        echo(search.format_plan(table, plan, target).splitlines()[0])
    else:
        echo(f"budget {mib(target)} is below the smallest plan above the minimum floors ({mib(smallest)}): "
             f"checking sizes from there up")
    if not check:
        entry = _write(src_path, out, table, plan, report)
        entry.update(budget_bytes=target, phase="budget", verdict="not checked")
        return _fitted(out, table, plan, target, report, max_ram)

    top = max(smallest, search.at_floors(table, upper).total_bytes)
    plans: dict[int, search.Plan] = {}
    written_size: list[int] = []

    def size_at(b: int) -> int:
        plan = search.search(table, b, upper, min_floors, method, step)
        plans.setdefault(plan.total_bytes, plan)
        return plan.total_bytes

    def check_size(size: int) -> bool:
        plan = plans[size]
        entry = _write(src_path, out, table, plan, report)
        written_size.append(size)
        quality = boundaries.check_quality(out, src_path, windows=windows, ctx=ctx)
        entry["quality"] = quality
        _peak(report, "load_peak_bytes", quality["load_peak_bytes"], "load_bare_bytes", quality["bare_bytes"])
        ok, entry["verdict"] = boundaries.passes(quality, max_kl)
        echo(f"attempt {len(report['attempts'])}: {mib(entry['written']['output_bytes'])} written "
             f"({plan.total_bytes / table.fp16_bytes:.1%} of fp16), {_quality(entry)}: {entry['verdict']}")
        return ok

    found = threshold.smallest_passing(size_at, check_size, start=max(target, smallest), top=top,
                                       step=max(1, int(step_up * table.fp16_bytes)),
                                       tolerance=max(1, int(tolerance * table.fp16_bytes)), attempts=retries + 1)
    for entry, probe in zip(report["attempts"], found.probes):
        entry.update(budget_bytes=probe.budget, phase=probe.phase)
    report["threshold"] = {"start_bytes": max(target, smallest), "smallest_plan_bytes": smallest, "top_bytes": top,
                           "step_bytes": int(step_up * table.fp16_bytes),
                           "tolerance_bytes": int(tolerance * table.fp16_bytes), "attempts_allowed": retries + 1,
                           "passed_bytes": found.passed, "failed_budget_bytes": found.failed,
                           "top_failed": found.top_failed, "exhausted": found.exhausted}
    if found.passed is not None and found.passed <= target:
        plan = plans[found.passed]
        if written_size[-1] != found.passed:  # the search stops at the first pass within budget: never taken
            _write(src_path, out, table, plan, report)["verdict"] = "rewritten (passed above)"
        return _fitted(out, table, plan, target, report, max_ram)
    _refuse(out, report, _refusal(table, target, smallest, found, report, upper, min_floors, method, step))


def _write(src: Path, out: Path, table, plan, report: dict) -> dict:
    """Write `plan` into `out` (fresh process), record the attempt; the folder must not exceed the plan."""
    entry = {"budget_bytes": plan.total_bytes, "plan": plan.summary(table)}
    report["attempts"].append(entry)
    written = entry["written"] = boundaries.write_measured(src, out, table, plan)
    _peak(report, "quantize_peak_bytes", written["peak_bytes"], "quantize_bare_bytes", written["bare_bytes"])
    if written["output_bytes"] > plan.total_bytes:
        raise XFPError(f"{out}: the written tensor files take {mib(written['output_bytes'])}, over the "
                       f"planned {mib(plan.total_bytes)} (header allowance too small); please report this")
    return entry


def _peak(report: dict, key: str, peak: int, bare_key: str, bare: int) -> None:
    """Keep the highest peak RSS over the attempts (and the bare process of that attempt)."""
    memory = report["memory"]
    if peak >= memory.get(key, 0):
        memory.update({key: peak, bare_key: bare})


def _quality(entry: dict) -> str:
    q = entry["quality"]
    garbage = f"garbage {q['garbage']:.3f}" if "garbage" in q else "no generation check"
    return f"KL {q['kl']:.4f}, {garbage}"


def _fitted(out: Path, table, plan, target: int, report: dict, max_ram: int | None) -> dict:
    (out / "fit-plan.txt").write_text(search.format_plan(table, plan, target) + "\n")
    if max_ram is not None:
        peak = max(report["memory"].get("quantize_peak_bytes", 0), report["memory"].get("load_peak_bytes", 0))
        if peak > max_ram:
            _refuse(out, report, f"measured peak memory {mib(peak)} exceeds --max-ram {mib(max_ram)}")
    report["outcome"] = "fitted"
    reporting.write(out, report)
    return report


def budget_text(table, size: int, upper: Floors, lower: Floors, method: str, step: float) -> str:
    """The --budget that gives back the plan of `size` bytes: its MiB rounded up to 2, 3 or 4 decimals, the first
    that gives the same plan (any budget from the plan's size up to the one it was searched at does), else the
    exact byte count."""
    for decimals in (2, 3, 4):
        text = f"{math.ceil(size * 10**decimals / 2**20) / 10**decimals:.{decimals}f}MiB"
        if search.search(table, parse_size(text), upper, lower, method, step).total_bytes == size:
            return text
    return f"{size}B"


def _refusal(table, target: int, smallest: int, found: threshold.Threshold, report: dict, upper: Floors,
             lower: Floors, method: str, step: float) -> str:
    """The one-line refusal: every size it names was written and checked."""
    fp16 = table.fp16_bytes
    entries = {e["plan"]["total_bytes"]: e for e in report["attempts"]}
    head = f"budget {mib(target)} ({target / fp16:.1%} of fp16) cannot be met"
    first = found.probes[0]
    if target < smallest:
        why = (f"it is below the smallest plan above the minimum floors (strict {lower.strict}, lazy {lower.lazy}), "
               f"{mib(smallest)}" + ("" if first.passed else f", which fails ({entries[first.size]['verdict']})"))
    else:
        why = f"the plan at the budget, {mib(first.size)}, fails ({entries[first.size]['verdict']})"
    n = len(found.probes)
    if found.passed is None:
        largest = entries[found.largest_tried]
        if found.top_failed:
            return (f"{head}: no size passes the quality boundary, not even the plan at the operator floors (strict "
                    f"{upper.strict}, lazy {upper.lazy}): the largest size tried, {mib(found.largest_tried)}, fails "
                    f"({largest['verdict']}); raise --floor-strict/--floor-lazy or --max-kl")
        return (f"{head}: {why}; no size up to {mib(found.largest_tried)} passed in {n} attempts (the largest fails: "
                f"{largest['verdict']}); raise --retries{_embeddings_hint(table)}")
    best = entries[found.passed]
    passed = (f"the smallest size that passed is {mib(found.passed)} ({found.passed / fp16:.1%} of fp16, "
              f"{_quality(best)}): --budget {budget_text(table, found.passed, upper, lower, method, step)}")
    below = found.largest_failed
    bracket = "" if below is None else (
        f"; the largest size that failed is {mib(below)}" + (", bisection cut short by --retries" if found.exhausted
                                                           else ""))
    return f"{head}: {why}; {passed} ({n} attempt{'s' if n > 1 else ''}{bracket}){_embeddings_hint(table)}"


def _embeddings_hint(table) -> str:
    """When the embeddings were kept, how much of every plan the kept tensors are, and the flag that shrinks them."""
    if table.quantize_embeddings:
        return ""
    return (f"; the tensors kept unquantized (embeddings, norms) are {table.kept_bytes / table.fp16_bytes:.1%} of "
            f"the fp16 size in every plan: --quantize-embeddings quantizes the embeddings too")


def _refuse(out: Path, report: dict, message: str) -> None:
    """Remove the model files from OUT, keep the report there, raise the one-line BudgetError."""
    report["outcome"], report["message"] = "refused", message
    if out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    reporting.write(out, report)
    raise BudgetError(message)
