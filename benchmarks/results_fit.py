"""The H-Process section of docs/RESULTS.md: stepwise relaxation against greedy allocation at equal bytes, from
the journal benchmarks/fit_compare.py leaves (out/fit-bench/fit_compare.json) and its plot
(docs/results/fit-smollm2.png).

    from results_fit import fit_section; fit_section(ROOT)   # markdown, or None before fit_compare.py has run
"""

from __future__ import annotations

import json
from pathlib import Path

FIT_COMMAND = "python benchmarks/fit_compare.py --garbage"
"""The command whose journal this section reads (default fractions 0.42, 0.40, 0.38; embeddings kept fp16)."""

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
    lines = ["| budget (of fp16) | embeddings | method | written MiB | % of fp16 | honest bits | KL | top-1 | garbage |",
             "|---|---|---|---|---|---|---|---|---|"]
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
    wins = sum(v["allocate"] < v["stepwise"] for v in pairs.values())
    verdict = (f"At equal bytes the allocation has the lower KL at {wins} of {len(pairs)} budgets"
               + ("." if pairs else " (no budget has both methods measured yet)."))
    plot = (f"\n\n![KL against size, both methods](results/{PLOT.name})" if (Path(root) / PLOT).exists() else "")
    return ("## H-Process: fitting a memory budget (SmolLM2)\n\n"
            f"Rows from `{FIT_COMMAND}`: at each budget the published stepwise floor relaxation is searched first, "
            f"then the greedy allocation (`xfp fit`'s default) with the stepwise plan's own size as its budget, so it "
            f"never has more bytes; both are written through the pipeline and KL(source || model) is taken on the "
            f"first 4 windows of 512 tokens. {verdict} How `xfp fit` searches and checks: [FIT.md](FIT.md).\n\n"
            + "\n".join(lines) + plot + "\n")


__all__ = ["fit_section", "FIT_COMMAND"]
