"""`xfp quantize | fit | inspect | verify | generate | eval | compare`.

A user mistake or a bad file ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xfp.errors import XFPError

EXIT_USER_ERROR = 2
EXIT_FLOOR_MISSED = 3
EXIT_INTERRUPTED = 130


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.rstrip("kKmMgGiIbB")
    unit = text[len(number):].upper()
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 2GiB, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xfp", description="Quality-targeted LLM weight quantization.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a HF folder or a GGUF file into an XFP folder")
    q.add_argument("src", nargs="?", help="Hugging Face model folder or GGUF file")
    q.add_argument("out", nargs="?", help="output folder (must be empty, or use --force / --resume)")
    q.add_argument("--demo", action="store_true",
                   help="fetch the embedded default model (SmolLM2-135M-Instruct) and run the whole job")
    q.add_argument("--floor-strict", type=float, default=0.99, help="cosine floor: attention, dense MLP, shared experts")
    q.add_argument("--floor-lazy", type=float, default=0.97, help="cosine floor: routed MoE experts")
    q.add_argument("--statistic", default="p1", choices=["min", "p1", "p5", "median", "mean"],
                   help="per-channel cosine statistic the floors judge (default p1)")
    q.add_argument("--mode", default="v2a", choices=["v2", "v2a"],
                   help="v2a (default): groups with coded scale/offset + a library of codebooks + kept hot columns; "
                        "v2: one codebook per output channel (the published recipe)")
    q.add_argument("--group-size", type=_ints, default=(64, 128, 256),
                   help="v2a: candidate group sizes (default 64,128,256)")
    q.add_argument("--library-size", type=int, default=1, help="v2a: codebooks in each matrix's library (L)")
    q.add_argument("--keep-columns", type=float, default=5.0,
                   help="v2a: ratio that marks hot input columns, kept apart in int8 (0: none; default 5)")
    q.add_argument("--outlier-budgets", type=_floats, default=(0.0, 0.003),
                   help="outlier caps auto-select may try, fractions of a matrix (default 0,0.003)")
    q.add_argument("--bits", type=_ints, default=(2, 3, 4), help="candidate widths, e.g. 2,3,4")
    q.add_argument("--escalation-bits", type=_ints, default=(5, 6, 8), help="widths tried when none meets the floor")
    q.add_argument("--quantize-embeddings", action="store_true", help="also quantize embeddings and lm_head (strict)")
    q.add_argument("--expert-select", default="expert", choices=["expert", "stack"],
                   help="routed MoE experts: auto-select each expert (default), or one width per stack chosen on "
                        "--expert-sample experts, every expert still checked against the floor")
    q.add_argument("--expert-sample", type=int, default=4, help="--expert-select stack: experts sampled per stack")
    q.add_argument("--stack-library", action="store_true",
                   help="v2a with --expert-select stack: one codebook per expert stack")
    q.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    q.add_argument("--shard-size", type=_size, default=2 * 2**30, help="largest output shard (default 2GiB)")
    q.add_argument("--resume", action="store_true", help="finish an interrupted run in OUT")
    q.add_argument("--force", action="store_true", help="overwrite a previous XFP output in OUT")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--windows", type=int, default=16, help="--demo: perplexity windows of 512 tokens")

    i = sub.add_parser("inspect", help="summarise an XFP folder (validating every file)")
    i.add_argument("out")

    v = sub.add_parser("verify", help="recompute per-channel cosines from the source and the stored tensors")
    v.add_argument("src")
    v.add_argument("out")

    g = sub.add_parser("generate", help="greedy generation with an XFP (or any transformers) folder")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--compile", action="store_true",
                   help="compile the decode steps with torch.compile and a static KV cache (the first call "
                        "compiles for a minute or so; faster per token after)")
    e = sub.add_parser("eval", help="perplexity over fixed windows; with --source also KL and top-1 agreement")
    e.add_argument("model", help="XFP folder, HF folder, GGUF file, or smollm2 / gemma-270m")
    e.add_argument("--source", help="the source model (same kinds): adds KL(source || model) and top-1 agreement")
    e.add_argument("--text", help="UTF-8 text file (default: Canterbury alice29.txt + lcet10.txt)")
    e.add_argument("--ctx", type=int, default=512, help="text tokens per window (default 512; BOS not counted)")
    e.add_argument("--stride", type=int, help="tokens between window starts (default: --ctx, no overlap)")
    e.add_argument("--max-windows", type=int, help="score at most this many windows (default: the whole text)")
    e.add_argument("--garbage", action="store_true", help="also run the generation sanity check")
    e.add_argument("--json", help="write the result as JSON to this file")
    e.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("compare", help="quality per honest bit: baselines and XFP floors on one source model")
    c.add_argument("src", nargs="?", help="HF folder, GGUF file, or smollm2 / gemma-270m")
    c.add_argument("--methods", help="comma-separated method names (default: all registered defaults)")
    c.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    c.add_argument("--text", help="UTF-8 text file (default: Canterbury alice29.txt + lcet10.txt)")
    c.add_argument("--ctx", type=int, default=512, help="text tokens per window (default 512; BOS not counted)")
    c.add_argument("--stride", type=int, help="tokens between window starts (default: --ctx, no overlap)")
    c.add_argument("--max-windows", type=int, default=32, help="windows scored (default 32)")
    c.add_argument("--no-garbage", action="store_true", help="skip the generation sanity check")
    c.add_argument("--out", help="folder for compare.json, compare.md, pareto.png (default out/compare-<source>)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted compare with the same settings from OUT/.compare-work")
    c.add_argument("--no-progress", action="store_true")
    _add_fit_parser(sub)
    return p


def _add_fit_parser(sub) -> None:
    f = sub.add_parser("fit", help="H-Process: the best XFP folder within a memory budget (searches the floors)")
    f.add_argument("src", help="Hugging Face model folder, GGUF file, or smollm2")
    f.add_argument("out", help="output folder")
    f.add_argument("--budget", help="size of the output tensor files, e.g. 60MiB or 1.5GB")
    f.add_argument("--budget-fraction", type=float, help="budget as a fraction of the source's fp16 size, e.g. 0.38")
    f.add_argument("--floor-strict", type=float, default=0.99, help="operator floor (upper quality bound), strict")
    f.add_argument("--floor-lazy", type=float, default=0.97, help="operator floor (upper quality bound), lazy")
    f.add_argument("--min-floor-strict", type=float, default=0.95, help="lowest strict floor the search may use")
    f.add_argument("--min-floor-lazy", type=float, default=0.90, help="lowest lazy floor the search may use")
    f.add_argument("--floor-step", type=float, default=0.0025, help="stepwise relaxation step")
    f.add_argument("--method", default="allocate", choices=["allocate", "stepwise"],
                   help="allocate (default: greedy per-matrix allocation) or stepwise (the published relaxation)")
    f.add_argument("--statistic", default="p1", choices=["min", "p1", "p5", "median", "mean"])
    f.add_argument("--quantize-embeddings", action="store_true", help="also quantize embeddings and lm_head")
    f.add_argument("--max-ram", type=_size, help="peak memory allowed while quantizing and loading, e.g. 4GiB")
    f.add_argument("--max-kl", type=float, default=0.5, help="KL(source || model) bound, nats/token (default 0.5)")
    f.add_argument("--windows", type=int, default=4, help="512-token windows of the offline text for KL (default 4)")
    f.add_argument("--retries", type=int, default=6,
                   help="sizes written and checked after the first when it fails: step up, then bisect (default 6)")
    f.add_argument("--no-check", action="store_true", help="skip the KL and generation checks")
    f.add_argument("--table-cache", help="folder of the cached measurement tables (default $XFP_CACHE/fit-tables)")
    f.add_argument("--force", action="store_true", help="overwrite OUT")
    f.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except XFPError as exc:
        print(f"xfp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as exc:  # configuration checks (floors, widths...) raise ValueError
        print(f"xfp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a full disk, a read-only folder...
        print(f"xfp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("xfp: interrupted; run the same command with --resume to finish", file=sys.stderr)
        return EXIT_INTERRUPTED


def _config(args):
    from xfp.config import OutlierConfig, QuantConfig

    return QuantConfig(floor_strict=args.floor_strict, floor_lazy=args.floor_lazy, statistic=args.statistic,
                       mode=args.mode, bits=args.bits, escalation_bits=args.escalation_bits,
                       group_size=args.group_size, library_size=args.library_size, keep_columns=args.keep_columns,
                       outliers=OutlierConfig(budgets=args.outlier_budgets),
                       expert_select=getattr(args, "expert_select", "expert"),
                       expert_sample=getattr(args, "expert_sample", 4),
                       stack_library=getattr(args, "stack_library", False))


def cmd_quantize(args) -> int:
    from xfp.pipeline import quantize_model

    if args.workers < 1:
        raise XFPError(f"--workers must be >= 1, got {args.workers}")
    config = _config(args)
    if args.demo:
        from xfp.demo import run_demo

        return run_demo(Path(args.out or args.src or "out/smollm2-xfp"), config, windows=args.windows,
                        progress=not args.no_progress)
    if not args.src or not args.out:
        raise XFPError("quantize needs SRC and OUT (or --demo)")
    report = quantize_model(args.src, args.out, config, resume=args.resume, force=args.force, workers=args.workers,
                            quantize_embeddings=args.quantize_embeddings, progress=not args.no_progress,
                            shard_bytes=args.shard_size)
    print_summary(report)
    return EXIT_FLOOR_MISSED if report["totals"]["missed_floor"] else 0


def print_summary(report: dict) -> None:
    t = report["totals"]
    mib = 2**20
    print(f"source  {t['source_file_bytes'] / mib:9.1f} MiB on disk, {t['source_fp16_bytes'] / mib:.1f} MiB as fp16")
    print(f"output  {t['output_bytes'] / mib:9.1f} MiB ({t['output_bytes'] / t['source_fp16_bytes']:.1%} of fp16, "
          f"{t['bits_per_parameter']:.3f} bits/parameter)")
    if t["quantized_weights"]:
        print(f"matrices {t['quantized_matrices']}: {t['quantized_honest_bits']:.3f} honest bits/weight "
              f"(index bits only {t['quantized_index_bits']:.3f})")
    for cls, c in report["classes"].items():
        print(f"  {cls:6s} floor {c['floor']}: {c['matrices']} matrices, {c['honest_bits']:.3f} bits, "
              f"{c['missed_floor']} below floor")
    print(f"time    {report['seconds']:.1f} s   report: {report['output']}/REPORT.md")
    if t["missed_floor"]:
        print(f"warning: {len(t['missed_floor'])} matrices are below their floor even at the widest width",
              file=sys.stderr)


def cmd_inspect(args) -> int:
    from xfp.format.folder import iter_shards, read_config

    config = read_config(Path(args.out))
    qc = config["quantization_config"]
    print(f"{args.out}: XFP format {qc['format_version']}, mode {qc['mode']}, statistic {qc['statistic']}, "
          f"floors strict {qc['floor_strict']} / lazy {qc['floor_lazy']}")
    weights = stored = 0
    print(f"{'tensor':60s} {'shape':>12s} {'bits':>4s} {'outl':>6s} {'honest':>7s}")
    for path, content in iter_shards(Path(args.out)):
        for name, packed in content.matrices.items():
            lay = packed.layout
            weights += lay.weights
            stored += lay.total_bytes
            print(f"{name[-60:]:60s} {lay.rows:>5d}x{lay.cols:<6d} {lay.bits:>4d} {lay.n_outliers:>6d} "
                  f"{lay.honest_bits:7.3f}")
        kept = sum(t.numel() * t.element_size() for t in content.dense.values())
        print(f"-- {path.name}: {len(content.matrices)} quantized, {len(content.dense)} kept ({kept / 2**20:.1f} MiB)")
    if weights:
        print(f"quantized: {weights:,} weights, {stored / 2**20:.2f} MiB, {8 * stored / weights:.3f} honest bits/weight")
    return 0


def cmd_verify(args) -> int:
    from xfp.evaluate.verify import SourceMatrices, verify_matrix
    from xfp.format.folder import iter_shards, read_config
    from xfp.sources.base import open_source

    config = read_config(Path(args.out))
    qc = config["quantization_config"]
    floors = {"strict": qc["floor_strict"], "lazy": qc["floor_lazy"]}
    source = SourceMatrices(open_source(args.src))  # routed experts by their stored names too (xfp.moe)
    failed = checked = 0
    print(f"{'tensor':60s} {'min':>8s} {'p1':>8s} {'p5':>8s} {'median':>8s} {'mean':>8s}  floor ({qc['statistic']})")
    for _, content in iter_shards(Path(args.out)):
        for name, packed in content.matrices.items():
            if name not in source:
                raise XFPError(f"{args.src}: has no tensor '{name}' that {args.out} quantized")
            entry = qc["matrices"].get(name, {})
            floor = floors[entry.get("class", "strict")]
            verdict = verify_matrix(name, source.load(name), packed, floor, qc["statistic"])
            s = verdict.stats
            checked += 1
            failed += not verdict.holds
            print(f"{name[-60:]:60s} {s['min']:8.5f} {s['p1']:8.5f} {s['p5']:8.5f} {s['median']:8.5f} "
                  f"{s['mean']:8.5f}  {floor} {'holds' if verdict.holds else 'MISSED'}")
    print(f"{checked} matrices checked, {failed} below their floor")
    return EXIT_FLOOR_MISSED if failed else 0


def cmd_generate(args) -> int:
    from xfp.evaluate.generation import compile_decode_steps, greedy, load_model

    model, tokenizer = load_model(Path(args.model))
    if args.compile:
        compile_decode_steps(model)
    print(greedy(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_eval(args) -> int:
    import json

    from xfp.evaluate import generation, models
    from xfp.evaluate.perplexity import token_windows
    from xfp.evaluate.scoring import score_windows

    model, tokenizer = models.load(args.model)
    ids = models.text_ids(tokenizer, args.text)
    bos = models.bos_to_prepend(tokenizer)
    windows = token_windows(ids, args.ctx, args.stride or args.ctx, args.max_windows, bos=bos is not None)
    source = None
    if args.source:
        source, _ = models.load(args.source)
        models.same_vocabulary(model, source)
    scores = score_windows(ids, windows, {"model": lambda: model}, reference=(lambda: source) if source else None,
                           bos_id=bos, progress=not args.no_progress, desc="windows x models")
    text = args.text or models.default_text()
    print(f"text    {text}: {len(ids)} tokens; {len(windows)} windows of {args.ctx} (stride {args.stride or args.ctx}), "
          + (f"BOS {tokenizer.convert_ids_to_tokens(bos)} prepended to each" if bos is not None else "no BOS"))
    m = scores["model"]
    print(f"model   {args.model}: ppl {m.ppl:.4f} (nll {m.nll:.5f} nats/token, {m.tokens} tokens, {m.seconds:.1f} s)")
    result = {"model": str(args.model), "text": str(text), "ctx": args.ctx, "stride": args.stride or args.ctx,
              "windows": len(windows), "bos": bos, "model_scores": m.to_dict()}
    if source is not None:
        s = scores["source"]
        print(f"source  {args.source}: ppl {s.ppl:.4f} (nll {s.nll:.5f}, {s.seconds:.1f} s)")
        print(f"vs source: KL {m.kl:.5f} nats/token, top-1 agreement {m.top1:.4f}, delta ppl {m.ppl - s.ppl:+.4f}")
        result["source"], result["source_scores"] = str(args.source), s.to_dict()
    if args.garbage:
        report = generation.garbage_score(model, tokenizer, source)
        print(f"garbage {report.score:.3f} ({'passed' if report.passed else 'FAILED'}, threshold {report.threshold})")
        result["garbage"] = report.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_compare(args) -> int:
    from xfp.evaluate import compare, methods

    if args.list_methods:
        for name in methods.DEFAULT_METHODS:
            print(f"{name:12s} {methods.REGISTRY[name].about}")
        print(f"{'xfp-FLOOR':12s} XFP auto-select at any floor, e.g. xfp-0.985")
        return 0
    if not args.src:
        raise XFPError("compare needs SRC (a model folder, a GGUF file, smollm2 or gemma-270m)")
    specs = methods.parse_methods(args.methods)
    out = Path(args.out or f"out/compare-{Path(str(args.src)).stem}")
    result = compare.run_compare(args.src, specs, text=args.text, ctx=args.ctx, stride=args.stride,
                                 max_windows=args.max_windows, garbage=not args.no_garbage, out=out,
                                 resume=args.resume, progress=not args.no_progress)
    print(compare.describe(result))
    print(compare.format_table(result))
    print(f"{result['seconds']:.0f} s; wrote {out}/compare.md, compare.json, pareto.png")
    return 0


COMMANDS = {"quantize": cmd_quantize, "inspect": cmd_inspect, "verify": cmd_verify, "generate": cmd_generate}
COMMANDS["eval"] = cmd_eval
COMMANDS["compare"] = cmd_compare


def cmd_fit(args) -> int:
    from xfp.config import QuantConfig
    from xfp.fit.run import fit_model
    from xfp.fit.search import Floors

    config = QuantConfig(floor_strict=args.floor_strict, floor_lazy=args.floor_lazy, statistic=args.statistic)
    fit_model(args.src, args.out, budget=args.budget, budget_fraction=args.budget_fraction, config=config,
              min_floors=Floors(args.min_floor_strict, args.min_floor_lazy), step=args.floor_step,
              method=args.method, quantize_embeddings=args.quantize_embeddings, max_ram=args.max_ram,
              max_kl=args.max_kl, windows=args.windows, check=not args.no_check, retries=args.retries,
              table_cache=Path(args.table_cache) if args.table_cache else None, force=args.force,
              progress=not args.no_progress)
    print(f"wrote {args.out} (fit.json, FIT.md, fit.png, fit-plan.txt)")
    return 0


COMMANDS["fit"] = cmd_fit

if __name__ == "__main__":
    sys.exit(main())
