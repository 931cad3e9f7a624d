"""The H-Process section of docs/RESULTS.md: stepwise relaxation against greedy allocation at equal bytes, from
the journal benchmarks/fit_compare.py leaves (out/fit-bench/fit_compare.json) and its plot
(docs/results/fit-smollm2.png).

    from results_fit import fit_section; fit_section(ROOT)   # markdown, or None before fit_compare.py has run
"""

from __future__ import annotations

import json
from pathlib import Path

FIT_COMMAND = "python benchmarks/fit_compare.py --garbage --fits OUT30 OUT38 OUT45"
"""The command whose journal and plot this section shows (default fractions 0.42, 0.40, 0.38; embeddings kept
fp16); --fits adds the checked attempts of the three `xfp fit` runs in docs/FIT.md (their OUT folders:
`xfp fit smollm2 OUT30 --budget-fraction 0.30`, ...) to the plot."""

JOURNAL = Path("out") / "fit-bench" / "fit_compare.json"
PLOT = Path("docs") / "results" / "fit-smollm2.png"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def fit_section(root: Path) -> str | None:
    """Markdown for the fit comparison under `root` (the repository), None when the journal is missing."""
    path = Path(root) / JOURNAL
    if not path.exists():
        return None
    rows = json.loads(path.read_text())
    rows.sort(key=lambda r: (r["embeddings"], -r["fraction"], r["method"] != "stepwise"))
    lines = ["| budget (of fp16) | embeddings | method | written MiB | % of fp16 | honest bits | KL | top-1 "
             "| garbage |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, written = r["quality"], r["written"]["output_bytes"]
        garbage = "-" if "garbage" not in q else (
            f"{q['garbage']:.3f} ({'passed' if q['garbage_passed'] else 'failed'})")
        lines.append(f"| {r['fraction']:.0%} | {'quantized' if r['embeddings'] else 'fp16'} | {r['method']} | "
                     f"{written / 2**20:.2f} | {written / r['fp16_bytes']:.2%} | "
                     f"{_num(r['plan'].get('honest_bits'), '.3f')} | {q['kl']:.4f} | {_num(q.get('top1'), '.3f')} | "
                     f"{garbage} |")
    pairs = {}
    for r in rows:
        pairs.setdefault((r["embeddings"], r["fraction"]), {})[r["method"]] = r["quality"]["kl"]
    pairs = {k: v for k, v in pairs.items() if {"stepwise", "allocate"} <= v.keys()}
    diffs = {k: v["allocate"] - v["stepwise"] for k, v in pairs.items()}
    alloc, step = sum(d < 0 for d in diffs.values()), sum(d > 0 for d in diffs.values())
    same = len(diffs) - alloc - step
    verdict = ("No budget has both methods measured yet." if not diffs else
               f"At equal bytes the allocation has the lower KL at {alloc} of {len(diffs)} budgets, the stepwise "
               f"relaxation at {step}" + (f", the same at {same} (the same plan)" if same else "")
               + f"; the largest gap is {max(abs(d) for d in diffs.values()):.4f} nats/token, on 4 windows.")
    plot = "" if not (Path(root) / PLOT).exists() else (
        f"\n\n![KL against size, both methods](results/{PLOT.name})\n\nIn the plot, the black points are the sizes "
        f"the three `xfp fit` runs of FIT.md (budgets 30%, 38%, 45%; allocate) wrote and checked.")
    return ("## H-Process: fitting a memory budget (SmolLM2)\n\n"
            f"Rows from `{FIT_COMMAND}`: at each budget the published stepwise floor relaxation is searched first, "
            f"then the greedy allocation (`xfp fit`'s default) with the stepwise plan's own size as its budget, so it "
            f"never has more bytes; both are written through the pipeline and KL(source || model) is taken on the "
            f"first 4 windows of 512 tokens. {verdict} How `xfp fit` searches and checks: [FIT.md](FIT.md).\n\n"
            + "\n".join(lines) + plot + "\n")


__all__ = ["fit_section", "FIT_COMMAND"]
