"""H-Process: the published stepwise relaxation against the greedy allocation, measured at equal bytes.

For each budget (a fraction of the source's fp16 size) on the default model (SmolLM2-135M-Instruct):
the stepwise plan is searched first; the allocation is then searched with the stepwise plan's own size as
its budget, so it never has more bytes. Both plans are written through the normal pipeline and loaded
through transformers; KL(source || model) is taken on the first --windows 512-token windows of the
offline Canterbury text (the generation check too with --garbage; `xfp fit` always runs it).
The table (`xfp.fit.table`) is measured once and cached; nothing is refitted per budget. The journal is
resumable: a point already measured for the same plan (same bytes) is not measured again.

Writes out/fit-bench/fit_compare.json and docs/results/fit-smollm2.png (KL against size, both methods).

Usage: python benchmarks/fit_compare.py [--fractions 0.42 0.40 0.38]
       [--windows 4] [--garbage] [--out out/fit-bench] [--fits out/fit-smollm2-45 ...] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from xfp.config import QuantConfig
from xfp.fit import boundaries, search, table as tables
from xfp.fit.run import DEFAULT_MIN_FLOORS
from xfp.fit.search import Floors
from xfp.format import io
from xfp.sources import fetch


def measure_point(src: Path, table, plan, folder: Path, windows: int, garbage: bool) -> dict:
    written = boundaries.write_measured(src, folder, table, plan)
    quality = boundaries.check_quality(folder, src, windows=windows, garbage=garbage)
    return {"plan": plan.summary(table), "written": written, "quality": quality}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fractions", type=float, nargs="*", default=[0.42, 0.40, 0.38],
                   help="budgets with embeddings kept (fp16)")
    p.add_argument("--embeddings", type=float, nargs="*", default=[],
                   help="budgets with embeddings quantized (such folders do not load in transformers yet: none)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--garbage", action="store_true", help="also run the generation check on every point (slow)")
    p.add_argument("--out", default="out/fit-bench")
    p.add_argument("--plot", default="docs/results/fit-smollm2.png")
    p.add_argument("--fits", nargs="*", default=[], help="`xfp fit` output folders whose checked attempts join the plot")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the journal and --fits")
    args = p.parse_args()

    src = fetch.default_model_gguf()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = out / "fit_compare.json"
    rows = json.loads(journal.read_text()) if journal.exists() else []
    if args.plot_only:
        return plot(rows, Path(args.plot), args.fits)
    up, low = Floors(0.99, 0.97), DEFAULT_MIN_FLOORS
    for emb, fractions in ((False, args.fractions), (True, args.embeddings)):
        table = tables.measure(src, QuantConfig(), quantize_embeddings=emb, progress=False)
        for frac in fractions:
            budget = int(frac * table.fp16_bytes)
            try:
                step = search.stepwise(table, budget, up, low, 0.0025)
            except search.BudgetError as exc:
                print(f"embeddings {emb} {frac:.0%}: {exc}")
                continue
            alloc = search.allocate(table, step.total_bytes, up, low)
            for method, plan in (("stepwise", step), ("allocate", alloc)):
                key = (emb, frac, method)
                old = [r for r in rows if (r["embeddings"], r["fraction"], r["method"]) == key]
                if any(r["plan"]["total_bytes"] == plan.total_bytes for r in old):
                    continue  # measured already, for this very plan
                rows = [r for r in rows if (r["embeddings"], r["fraction"], r["method"]) != key]  # stale table
                began = time.perf_counter()
                r = measure_point(src, table, plan, out / "model", args.windows, args.garbage)
                r.update(embeddings=emb, fraction=frac, method=method, budget_bytes=budget, fp16_bytes=table.fp16_bytes,
                         seconds=time.perf_counter() - began)
                rows.append(r)
                io.atomic_write(journal, lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))
                q = r["quality"]
                print(f"emb={emb!s:5} {frac:.2f} {method:8s} {r['written']['output_bytes'] / 2**20:7.2f} MiB "
                      f"bits {r['plan']['honest_bits']:.3f} floors {r['plan']['floors']['strict']:.4f} "
                      f"est {r['plan']['error']:.3f} KL {q['kl']:.4f} top1 {q['top1']:.4f} "
                      f"garbage {q.get('garbage', float('nan')):.3f} peak quantize {r['written']['peak_bytes'] / 2**20:.0f} MiB "
                      f"load {q['load_peak_bytes'] / 2**20:.0f} MiB", flush=True)
    plot(rows, Path(args.plot), args.fits)


def plot(rows: list[dict], path: Path, fits: list[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for emb in (False, True):
        for method, marker in (("stepwise", "s--"), ("allocate", "o-")):
            pts = sorted((r["written"]["output_bytes"] / r["fp16_bytes"], r["quality"]["kl"])
                         for r in rows if r["embeddings"] == emb and r["method"] == method)
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker,
                        label=f"{method}, embeddings {'quantized' if emb else 'fp16'}")
    pts = []
    for folder in fits:
        report = json.loads((Path(folder) / "fit.json").read_text())
        pts += [(a["written"]["output_bytes"] / report["fp16_bytes"], a["quality"]["kl"])
                for a in report["attempts"] if a.get("quality")]
    if pts:
        ax.plot([100 * x for x, _ in sorted(pts)], [y for _, y in sorted(pts)], "D:", color="k",
                label="xfp fit (allocate)")
    ax.set_xlabel("output size, % of the source's fp16 size")
    ax.set_ylabel("KL(source || model), nats/token")
    ax.set_title("xfp fit on SmolLM2-135M-Instruct: quality against budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


if __name__ == "__main__":
    main()
