"""The fit report: fit.json, FIT.md and fit.png (estimated error and measured KL against size)."""

from __future__ import annotations

import json
from pathlib import Path

from xfp.format import io


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    r = report
    lines = [f"# xfp fit: {r['source']}", "",
             f"Budget {_mib(r['budget_bytes'])} MiB ({r['budget_bytes'] / r['fp16_bytes']:.1%} of the source's fp16 "
             f"size, {_mib(r['fp16_bytes'])} MiB); method **{r['method']}**; statistic {r['statistic']}; "
             f"operator floors strict {r['upper']['strict']} / lazy {r['upper']['lazy']}, minimum floors strict "
             f"{r['lower']['strict']} / lazy {r['lower']['lazy']}; embeddings "
             f"{'quantized' if r['quantize_embeddings'] else 'kept'}.", "",
             f"Outcome: **{r['outcome']}**" + (f": {r['message']}" if r.get("message") else ""), ""]
    lines += ["## Attempts (each written and checked)", ""]
    t = r.get("threshold")
    if t:
        lines += [f"When the plan at the budget fails (or the budget is under the smallest plan, "
                  f"{_mib(t['smallest_plan_bytes'])} MiB), sizes are checked upward from {_mib(t['start_bytes'])} MiB "
                  f"in steps of {_mib(t['step_bytes'])} MiB (doubling; the plan at the operator floors, "
                  f"{_mib(t['top_bytes'])} MiB, last), then bisected to {_mib(t['tolerance_bytes'])} MiB; at most "
                  f"{t['attempts_allowed']} attempts. Smallest size that passed: "
                  + ("none." if t["passed_bytes"] is None else f"{_mib(t['passed_bytes'])} MiB."), ""]
    lines += ["| phase | budget MiB | method | planned MiB | written MiB | floors strict / lazy | honest bits "
              "| est. error | KL | top-1 | garbage | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in r["attempts"]:
        p, q = a["plan"], a.get("quality") or {}
        lines.append(f"| {a.get('phase', '-')} | {_mib(a['budget_bytes'])} | {p['method']} | "
                     f"{_mib(p['total_bytes'])} | {_mib(a.get('written', {}).get('output_bytes'))} | "
                     f"{p['floors']['strict']:.4f} / {p['floors']['lazy']:.4f} | {p['honest_bits']:.3f} | "
                     f"{p['error']:.4f} | {_num(q.get('kl'))} | {_num(q.get('top1'))} | "
                     f"{_num(q.get('garbage'), '.3f')} | {a.get('verdict', '-')} |")
    if r.get("stepwise_steps"):
        lines += ["", "## Stepwise relaxation (from the table, no refitting)", "",
                  "| floor strict | floor lazy | MiB | est. error | fits |", "|---|---|---|---|---|"]
        for s in r["stepwise_steps"]:
            lines.append(f"| {s['floors'][0]:.4f} | {s['floors'][1]:.4f} | {_mib(s['bytes'])} | {s['error']:.4f} | "
                         f"{'yes' if s['fits'] else 'no'} |")
    mem = r.get("memory") or {}
    if mem:
        lines += ["", "## Memory (peak RSS)", "",
                  "| step | predicted MiB | measured MiB | bare process MiB |", "|---|---|---|---|"]
        for step in ("quantize", "load"):
            lines.append(f"| {step} | {_mib(mem['forecast'][f'{step}_peak_bytes'])} | "
                         f"{_mib(mem.get(f'{step}_peak_bytes'))} | {_mib(mem.get(f'{step}_bare_bytes'))} |")
    lines += ["", f"Table: {r['matrices']} matrices measured once ({r['table_seconds']:.0f} s, cached in "
              f"`{r['table_cache']}`); search {r['search_seconds']:.2f} s.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Estimated error of the stepwise path (line) and the measured KL of each attempt (points) against MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = report.get("stepwise_steps") or []
    if steps:
        ax.plot([s["bytes"] / 2**20 for s in steps], [s["error"] for s in steps], marker=".", color="gray",
                label="stepwise path: est. error (sum of rel. sq. error)")
    ax.set_xlabel("output size, MiB")
    ax.set_ylabel("estimated error")
    ax.axvline(report["budget_bytes"] / 2**20, color="red", ls="--", lw=1, label="budget")
    ax2 = ax.twinx()
    pts = [(a["plan"]["total_bytes"], a["quality"]["kl"], a["plan"]["method"]) for a in report["attempts"]
           if a.get("quality")]
    for b, kl, method in pts:
        ax2.plot(b / 2**20, kl, "o" if method == "allocate" else "s", color="C1")
    ax2.set_ylabel("measured KL(source || model), nats/token", color="C1")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title("xfp fit: quality against size")
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def write(folder: Path, report: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    io.atomic_write(folder / "fit.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    io.atomic_write(folder / "FIT.md", lambda tmp: tmp.write_text(markdown(report)))
    plot(report, folder / "fit.png")
