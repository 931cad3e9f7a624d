"""`xfp compare` on the upcycled test MoE: XFP at its two floors against baselines, rows for docs/MOE.md.

    nice -n 15 .venv/bin/python benchmarks/moe_compare.py --experts 4 --max-windows 4 \
        --methods xfp-moe,xfp-0.99,xfp-0.97,rtn4-g128,rtn3-g128 --out out/compare-moe

Builds (once, under $XFP_CACHE/moe/) the upcycled Qwen2-MoE of SmolLM2-135M (`xfp.moe.upcycle`) with its
routed experts fused ([E, N, K], the layout transformers 5 holds in memory, so `xfp compare` swaps them
slice by slice), registers the method `xfp-moe` and runs `xfp.evaluate.compare.run_compare`.

`xfp-moe` is what `xfp quantize` does by default: the strict floor (0.99) for attention and shared experts,
the lazy floor (0.97) for routed experts, each routed expert auto-selected on its own, a fused gate_up
slice quantized as its gate and up matrices (as the pipeline stores them), hot columns found as the pipeline
finds them (`xfp.moe.pipeline.hot_inputs`). `xfp-FLOOR` methods apply one floor to every matrix.
"""

from __future__ import annotations

import argparse

from pathlib import Path

import torch

from xfp.moe.experts import FUSED


def _hot(ctx, ratio: float):
    from xfp.moe.pipeline import hot_inputs, plan_units
    from xfp.pipeline.run import _decide
    from xfp.quantize import hot_columns

    key = f"moe_hot:{ratio}"
    if key not in ctx.cache:
        names, load = hot_inputs(ctx.source, plan_units(ctx.source, _decide(ctx.source, False)))
        ctx.cache[key] = hot_columns.find(names, load, ratio, tensor_names=ctx.source.tensor_names(),
                                          config=ctx.config)
    return ctx.cache[key]


def xfp_moe(name: str, w: torch.Tensor, ctx, *, floor_strict: float = 0.99, floor_lazy: float = 0.97):
    """The default pipeline's choice for one matrix (or one expert's slice of a fused stack)."""
    from xfp.classify import TensorClass
    from xfp.config import QuantConfig
    from xfp.quantize.autoselect import quantize_matrix

    config = QuantConfig(floor_strict=floor_strict, floor_lazy=floor_lazy)
    lazy = ctx.tensor_class(name) is TensorClass.LAZY
    floor = floor_lazy if lazy else floor_strict
    hot = _hot(ctx, config.keep_columns)
    m = FUSED.match(name)
    if m is None:
        r = quantize_matrix(w, floor, config, name, hot.columns(name, w))
        return r.reconstruction, r.layout.total_bytes
    projs = ("gate_proj", "up_proj") if m["fused"] == "gate_up_proj" else ("down_proj",)
    parts, stored = [], 0
    for proj, part in zip(projs, w.chunk(len(projs), dim=0)):
        stored_name = f"{m['prefix']}.0.{proj}.weight"  # kept columns depend on the projection, not the expert
        r = quantize_matrix(part.contiguous(), floor, config, stored_name, hot.columns(stored_name, part))
        parts.append(r.reconstruction.float())
        stored += r.layout.total_bytes
    return torch.cat(parts), stored


def main() -> None:
    from xfp.evaluate import compare, methods
    from xfp.moe.upcycle import UpcycleSpec, build_cached

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--perturb", type=float, default=0.02)
    p.add_argument("--layers", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--methods", default="xfp-moe,xfp-0.99,xfp-0.97,rtn4-g128,rtn3-g128")
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--no-garbage", action="store_true")
    p.add_argument("--out", default="out/compare-moe")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if "xfp-moe" not in methods.REGISTRY:
        methods.register("xfp-moe", xfp_moe, family="xfp", default=False,
                         about="XFP default: strict 0.99 (attention, shared experts), lazy 0.97 (routed experts)")
    spec = UpcycleSpec(experts=args.experts, top_k=args.top_k, layers=args.layers, intermediate=args.intermediate,
                       perturb=args.perturb, layout="fused")
    src = build_cached(spec)
    result = compare.run_compare(src, methods.parse_methods(args.methods), max_windows=args.max_windows,
                                 garbage=not args.no_garbage, out=args.out, resume=args.resume)
    from xfp.config import QuantConfig

    result["group_size"] = list(QuantConfig().group_size)  # benchmarks/results.py names the default it ran with
    compare.write_outputs(result, Path(args.out))
    print(compare.describe(result))
    print(compare.format_table(result))


if __name__ == "__main__":
    main()
