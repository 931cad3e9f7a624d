"""`fit_model`: a source and a memory budget in, the best XFP folder within the budget out (or a refusal).

1. Measure the table once (`xfp.fit.table`, cached, resumable).
2. Search it (`xfp.fit.search`, pure): the plan is printed and written to OUT/fit-plan.txt.
3. Check the predicted memory against --max-ram (`xfp.fit.boundaries.forecast`).
4. Write the plan through the normal pipeline in a fresh process (peak RSS measured), load the folder in
   another (peak RSS while loading), take KL against the source on the offline text and the generation
   check. If the point fails, larger budgets (steps of `RETRY_STEP` of the fp16 size) are written and checked
   until one passes; the run then stops with a BudgetError naming that size, and OUT keeps only the report.
5. OUT/fit.json, FIT.md and fit.png record every attempt.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from xfp.config import QuantConfig
from xfp.errors import XFPError
from xfp.fit import boundaries, report as reporting, search, table as tables
from xfp.fit.search import BudgetError, Floors, mib

DEFAULT_MIN_FLOORS = Floors(0.95, 0.90)
"""Lowest floors the search may go to unless --min-floor-strict / --min-floor-lazy say otherwise."""

RETRY_STEP = 0.03
"""When a fitted point fails the quality boundary, the next budget tried is this fraction of the source's
fp16 size above the failed plan."""

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
              retries: int = 3, table_cache: Path | None = None, force: bool = False, progress: bool = True,
              echo=print) -> dict:
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
    if quantize_embeddings and check:
        raise XFPError("--quantize-embeddings: the XFP runtime replaces nn.Linear layers only, so a folder with "
                       "quantized embeddings (or a tied lm_head) does not load in transformers; fit keeps them fp16 "
                       "(add --no-check to write such a folder anyway)")
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
    plan = search.search(table, target, upper, min_floors, method, step)
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
    echo(search.format_plan(table, plan, target).splitlines()[0])

    attempt_budget, failure = target, None
    for attempt in range(retries + 1):
        entry = {"budget_bytes": attempt_budget, "plan": plan.summary(table)}
        report["attempts"].append(entry)
        written = boundaries.write_measured(src_path, out, table, plan)
        entry["written"] = written
        report["memory"].update(quantize_peak_bytes=written["peak_bytes"], quantize_bare_bytes=written["bare_bytes"])
        if written["output_bytes"] > attempt_budget:
            raise XFPError(f"{out}: the written tensor files take {mib(written['output_bytes'])}, over the "
                           f"planned {mib(plan.total_bytes)} (header allowance too small); please report this")
        if not check:
            entry["verdict"] = "not checked"
            break
        quality = boundaries.check_quality(out, src_path, windows=windows, ctx=ctx)
        entry["quality"] = quality
        report["memory"].update(load_peak_bytes=quality["load_peak_bytes"], load_bare_bytes=quality["bare_bytes"])
        ok, why = boundaries.passes(quality, max_kl)
        entry["verdict"] = why
        echo(f"attempt {attempt + 1}: {mib(written['output_bytes'])} written, KL {quality['kl']:.4f}, "
             f"garbage {quality.get('garbage', float('nan')):.3f}: {why}")
        if ok:
            break
        failure = failure or why
        best = search.at_floors(table, upper)
        if plan.total_bytes >= best.total_bytes or attempt == retries:
            _refuse(out, report, f"budget {mib(target)} ({target / table.fp16_bytes:.1%} of fp16) cannot be met "
                    f"above the quality boundary ({failure}); no size up to {mib(plan.total_bytes)} passes")
        attempt_budget = plan.total_bytes + int(RETRY_STEP * table.fp16_bytes)
        plan = search.search(table, attempt_budget, upper, min_floors, method, step)
    (out / "fit-plan.txt").write_text(search.format_plan(table, plan, target) + "\n")
    if failure is not None:
        _refuse(out, report, f"budget {mib(target)} ({target / table.fp16_bytes:.1%} of fp16) cannot be met above "
                f"the quality boundary ({failure}); the smallest size that passes is {mib(plan.total_bytes)} "
                f"(--budget {plan.total_bytes / 2**20:.2f}MiB)")
    if max_ram is not None:
        peak = max(report["memory"].get("quantize_peak_bytes", 0), report["memory"].get("load_peak_bytes", 0))
        if peak > max_ram:
            _refuse(out, report, f"measured peak memory {mib(peak)} exceeds --max-ram {mib(max_ram)}")
    report["outcome"] = "fitted"
    reporting.write(out, report)
    return report


def _refuse(out: Path, report: dict, message: str) -> None:
    """Remove the model files from OUT, keep the report there, raise the one-line BudgetError."""
    report["outcome"], report["message"] = "refused", message
    if out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    reporting.write(out, report)
    raise BudgetError(message)
