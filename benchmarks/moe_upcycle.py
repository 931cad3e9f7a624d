"""How close the upcycled test MoE is to the dense default model: perplexity on the eval text.

    nice -n 15 .venv/bin/python benchmarks/moe_upcycle.py --experts 4 --top-k 2 --perturb 0 0.02 --windows 4
    nice -n 15 .venv/bin/python benchmarks/moe_upcycle.py --no-build --xfp OUT   # a quantized MoE folder

Builds (once, under $XFP_CACHE/moe/) the upcycled Qwen2-MoE of SmolLM2-135M (`xfp.moe.upcycle`) and prints
the perplexity of the dense model and of the MoE on the same windows of the default text (Canterbury
alice29 + lcet10, 512 tokens each), plus the largest logit difference on the first window.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from xfp.evaluate import models
    from xfp.evaluate.perplexity import perplexity
    from xfp.moe.upcycle import UpcycleSpec, build_cached
    from xfp.sources import default_model_hf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--perturb", type=float, nargs="+", default=[0.0, 0.02])
    p.add_argument("--layers", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--xfp", nargs="*", default=[], help="XFP folders (e.g. the quantized MoE) scored too")
    p.add_argument("--no-build", action="store_true", help="score the dense model and --xfp folders only")
    args = p.parse_args()
    torch.manual_seed(0)
    dense, tokenizer = models.load(default_model_hf())
    ids = models.text_ids(tokenizer, models.default_text())
    bos = models.bos_to_prepend(tokenizer)
    first = torch.tensor([ids[: args.ctx]])
    rows = []
    with torch.no_grad():
        ref = perplexity(dense, ids, args.ctx, args.ctx, args.windows, progress=False, bos_id=bos)
        ref_logits = dense(first).logits
    rows.append(("dense SmolLM2-135M", ref.ppl, 0.0, ref.tokens))
    del dense
    for folder in args.xfp:
        model, _ = models.load(folder)
        with torch.no_grad():
            got = perplexity(model, ids, args.ctx, args.ctx, args.windows, progress=False, bos_id=bos)
            diff = float((model(first).logits - ref_logits).abs().max())
        rows.append((f"XFP {folder}"[-45:], got.ppl, diff, got.tokens))
        del model
    for perturb in [] if args.no_build else args.perturb:
        spec = UpcycleSpec(experts=args.experts, top_k=args.top_k, layers=args.layers,
                           intermediate=args.intermediate, perturb=perturb)
        t = time.perf_counter()
        folder = build_cached(spec)
        moe, _ = models.load(folder)
        with torch.no_grad():
            got = perplexity(moe, ids, args.ctx, args.ctx, args.windows, progress=False, bos_id=bos)
            diff = float((moe(first).logits - ref_logits).abs().max())
        rows.append((f"upcycled E={args.experts} top{args.top_k} perturb={perturb}", got.ppl, diff, got.tokens))
        print(f"  ({folder.name}, {time.perf_counter() - t:.0f} s)", flush=True)
        del moe
    print(f"{'model':45s} {'ppl':>9s} {'max |dlogit| w0':>16s} {'tokens':>7s}")
    for name, ppl, diff, tokens in rows:
        print(f"{name:45s} {ppl:9.4f} {diff:16.5f} {tokens:7d}")


if __name__ == "__main__":
    main()
