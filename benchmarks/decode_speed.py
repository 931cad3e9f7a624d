"""End-to-end greedy decode speed at batch 1: an XFP model against its source in torch float32 and bfloat16.

For each model (the default SmolLM2-135M-Instruct; `--models default gemma` adds Gemma-3-270M): the XFP
folder is quantized once with the default `QuantConfig()` (mode V2a) into `$XFP_CACHE/bench/` (reused
afterwards; the folder name carries the default mode and the format version);
the source is the float32 Hugging Face folder the package fetches. All variants run through transformers
`generate` (greedy, KV cache, batch 1) at the same thread count, their runs interleaved:

- XFP (`cpu` kernel), XFP with `XFP_KERNEL=reference` (decode every matrix every step: the baseline the
  kernel replaces), source float32, source bfloat16;
- XFP+emb: the folder quantized with `--quantize-embeddings` as well (a second cached folder): the token
  embedding is stored like any matrix, and a tied lm_head multiplies with it through the fused kernel, so
  the step no longer reads the dense lm_head (the largest matrix of a small model; in the default folder it
  is the float16 embedding as stored, read by the fused float16 GEMV, `xfp.runtime.half`);
- compiled (unless `--no-compile`): XFP and source float32 again, each a second copy of the model whose
  decode steps `generate` compiles with torch.compile (inductor) and a static KV cache
  (`xfp.evaluate.generation.compile_decode_steps`, what `xfp generate --compile` does): the model's own
  per-step code (norms, rotary embedding, cache updates, ~300 small ops a step) fused by inductor, each XFP
  module one opaque operator (`xfp.runtime.opaque`). Compiling takes ~0.5-1 minute per model, once;
- optional, never in CI: llama.cpp through llama-cpp-python, if it imports, on the model's own GGUF and on
  the k-quants (Q4_K_M, Q3_K_M) that benchmarks/llamacpp_quality.py made of it, where that script has run
  (its out/results/<model>/llamacpp.json also gives their KL and XFP's on the same windows).

Decode tokens/s = (N - 1) / (time to generate N tokens - time to generate 1), so the prompt's prefill is
not counted; each variant's median over the repetitions is reported, and every ratio is the median of the
per-repetition ratios (the variants' runs in one repetition lie seconds apart; see `ratio`). Also printed: weight bytes each decode step reads (matrices as stored, plus dense tensors used
as matmuls, e.g. a tied lm_head), the thing that bounds batch-1 decode on a CPU, and where a step's time
goes (decoder matrices, lm_head, the rest).

Usage: python benchmarks/decode_speed.py [--models default gemma] [--threads 1 2] [--tokens 64] [--quick]
[--no-compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

DOC_PLACEHOLDER = "<!-- decode_speed -->"
PROMPT = ("The history of the city begins with a small settlement on the river, where traders from the north "
          "and the south met to exchange grain, salt and cloth. Over the following centuries")
MODELS = ("default", "gemma")
REFERENCE_TOKENS = 6


def model_paths(name: str) -> tuple[str, Path, Path]:
    """(label, GGUF, float32 HF folder) of a named model."""
    from xfp.sources import fetch

    if name == "default":
        return "SmolLM2-135M-Instruct", fetch.default_model_gguf(), fetch.default_model_hf()
    if name == "gemma":
        return "Gemma-3-270M", fetch.gemma_270m_gguf(), fetch.gemma_270m_hf()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def xfp_folder(gguf: Path, embeddings: bool = False, floor_strict: float | None = None) -> Path:
    """The XFP folder of `gguf` under the default config (embeddings: with `--quantize-embeddings`;
    floor_strict: with that strict floor instead of the default), quantized now if it is not cached yet."""
    from xfp.config import QuantConfig
    from xfp.format.spec import FORMAT_VERSION
    from xfp.pipeline import quantize_model
    from xfp.pipeline.run import out_is_complete
    from xfp.sources import cache_dir

    config = QuantConfig() if floor_strict is None else QuantConfig(floor_strict=floor_strict)
    # the default mode and the format version name the folder: a folder made under another default is not reused
    groups = "-".join(map(str, config.group_size))
    out = cache_dir() / "bench" / (f"{gguf.stem}-xfp-{config.mode}-g{groups}-v{FORMAT_VERSION}"
                                   + ("-emb" if embeddings else "")
                                   + ("" if floor_strict is None else f"-floor{floor_strict:g}"))
    if not out_is_complete(out):
        print(f"quantizing {gguf.name} into {out} (once)", flush=True)
        quantize_model(gguf, out, config, resume=out.exists(), force=False, progress=False,
                       quantize_embeddings=embeddings)
    return out


@contextmanager
def kernel(name: str | None):
    old = os.environ.get("XFP_KERNEL")
    if name is None:
        os.environ.pop("XFP_KERNEL", None)
    else:
        os.environ["XFP_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("XFP_KERNEL", None)
        else:
            os.environ["XFP_KERNEL"] = old


def weight_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step multiplies with: XFP matrices as stored (a tied lm_head: its embedding's)
    + dense Linear weights."""
    from xfp.runtime import XFPLinear
    from xfp.runtime.half import HalfLinear

    total = 0
    for module in model.modules():
        if isinstance(module, XFPLinear):
            total += sum(b.numel() * b.element_size() for b in module.stored.values())
        elif isinstance(module, HalfLinear):
            weight = module.half_weight()
            total += weight.numel() * weight.element_size()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


@torch.no_grad()
def step_breakdowns(models: dict[str, nn.Module], rounds: int = 5) -> dict[str, dict[str, float]]:
    """Per model: milliseconds of one decode step's matrices, measured apart from the model: every quantized or
    dense Linear in the decoder layers called once on a [1, 1, in] input (in model order), and the lm_head.
    The rest of a step (attention, norms, embedding, `generate`'s own work) is the step time minus these.
    The models take turns within each round (the best of the rounds is kept), so a slow spell of the
    machine does not fall on one model alone."""
    from xfp.runtime import XFPLinear

    calls = {}
    for name, model in models.items():
        head = model.get_output_embeddings()
        mats = [m for m in model.modules() if isinstance(m, (XFPLinear, nn.Linear)) and m is not head]
        dtype = model.dtype  # the model's activation dtype (an XFP lm_head holds no weight)
        inputs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in mats]
        hidden = torch.randn(1, 1, head.in_features, dtype=dtype)
        calls[name] = {"matrices_ms": lambda mats=mats, inputs=inputs: [m(x) for m, x in zip(mats, inputs)],
                       "lm_head_ms": lambda head=head, hidden=hidden: head(hidden), "n_matrices": len(mats)}
    out = {name: {"matrices_ms": float("inf"), "lm_head_ms": float("inf"), "n_matrices": c["n_matrices"]}
           for name, c in calls.items()}
    for name, c in calls.items():  # warm-up
        c["matrices_ms"]()
        c["lm_head_ms"]()
    for _ in range(rounds):
        for name, c in calls.items():
            for part in ("matrices_ms", "lm_head_ms"):
                start = time.perf_counter()
                c[part]()
                out[name][part] = min(out[name][part], (time.perf_counter() - start) * 1e3)
    return out


class NoEos:
    """A logits processor that makes end-of-sequence impossible, so every run generates exactly the tokens it
    asks for, at the cost of one indexed write per step. (`min_new_tokens` does the same through transformers'
    own processor, which builds and searches a vocabulary-sized mask every step: ~1 ms per step on SmolLM2's
    49k vocabulary, the same for every model measured, so it would shrink every ratio.)"""

    def __init__(self, eos: int | list[int] | None) -> None:
        self.eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.eos] = -float("inf")
        return scores


def _generate(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decode of exactly n new tokens after `ids` (KV cache, batch 1)."""
    from transformers import LogitsProcessorList

    eos = model.generation_config.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          logits_processor=LogitsProcessorList([NoEos(eos)]), pad_token_id=pad)


@torch.no_grad()
def generate_seconds(model, ids: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    out = _generate(model, ids, n)
    seconds = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, not {n}")
    return seconds


@torch.no_grad()
def first_tokens(model, ids: torch.Tensor, n: int) -> list[int]:
    return _generate(model, ids, n)[0, ids.shape[1]:].tolist()


LLAMA_PREFIX = "llama.cpp "

LLAMA_CPP_STATUS: dict[str, str] = {}
"""Why llama.cpp is missing from a run (filled by `llama_cpp_runner`), for the report."""


HERE = Path(__file__).resolve().parent
KQUANTS = ("Q4_K_M", "Q3_K_M")
"""llama.cpp types raced when benchmarks/llamacpp_quality.py has made them."""
RESULTS_ALIAS = {"default": "smollm2", "gemma": "gemma-270m"}
"""The folder under out/results/ where llamacpp_quality.py writes each model's files (its alias)."""


def llama_cpp_files(name: str, gguf: Path) -> dict[str, Path]:
    """label -> GGUF llama.cpp decodes: the model's own file ('own'), then each of KQUANTS that
    benchmarks/llamacpp_quality.py left in out/results/<alias>/ (embedding and output F16, like the default
    XFP folder)."""
    from llamacpp_quality import RESULTS, gguf_of_type  # same folder

    files = {"own": gguf}
    for type_name in KQUANTS:
        path = gguf_of_type(RESULTS / RESULTS_ALIAS[name], gguf, type_name)
        if path.is_file():
            files[type_name] = path
    return files


def llama_cpp_quality(name: str) -> dict[str, dict]:
    """method -> row of out/results/<alias>/llamacpp.json (honest bits, KL...), or {} if it is not there."""
    import json

    from llamacpp_quality import RESULT_FILE, RESULTS  # same folder

    path = RESULTS / RESULTS_ALIAS[name] / RESULT_FILE
    if not path.is_file():
        return {}

    result = json.loads(path.read_text(encoding="utf-8"))
    return {row["method"]: {**row, "windows": result["windows"]} for row in result["rows"]}


def llama_cpp_probe(gguf: Path) -> str | None:
    """None if llama-cpp-python generates a token on this machine, else why not. Run in a child process:
    a wheel built for other CPU features dies with SIGILL, which would take this process down with it."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[3]); import llama_cpp; "
            "from llamacpp_quality import without_extra_buffer_types; without_extra_buffer_types(llama_cpp); "
            "llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False).create_completion("
            "sys.argv[2], max_tokens=2)")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(gguf), PROMPT, str(HERE)], capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "llama-cpp-python did not answer within 300 s"
    if done.returncode == 0:
        return None
    if "No module named" in done.stderr:
        return "llama-cpp-python is not installed"
    if done.returncode < 0:
        import signal

        return f"llama-cpp-python crashed on this CPU ({signal.Signals(-done.returncode).name})"
    return f"llama-cpp-python failed: {done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else done.returncode}"


def llama_cpp_runner(gguf: Path, threads: int, n_ctx: int):
    """A callable(n) -> seconds generating n tokens greedily with llama.cpp, or None if it cannot run here."""
    if str(gguf) not in LLAMA_CPP_STATUS:
        LLAMA_CPP_STATUS[str(gguf)] = llama_cpp_probe(gguf) or ""
    if LLAMA_CPP_STATUS[str(gguf)]:
        return None
    import llama_cpp
    from llamacpp_quality import without_extra_buffer_types  # same folder (on sys.path when run as a script)

    without_extra_buffer_types(llama_cpp)
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          verbose=False)
    eos = llm.token_eos()

    def run(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, top_k=1, logit_bias={eos: -1e9})
        return time.perf_counter() - start

    return run


def measure(runners: dict, n: int, reps: int) -> dict[str, list[float]]:
    """Decode tokens/s of each runner (callable(n) -> seconds) in each repetition: (n - 1) / (seconds for n
    tokens - seconds for 1), the two runs back to back; the runners take turns within a repetition."""
    for run in runners.values():
        run(1)  # warm-up (kernel build, compiling for both cache sizes timed below)
        run(n)
    per_rep = {k: [] for k in runners}
    for _ in range(reps):
        for name, run in runners.items():
            one = run(1)
            per_rep[name].append((n - 1) / max(1e-9, run(n) - one))
    return per_rep


def typical(per_rep: dict[str, list[float]]) -> dict[str, float]:
    """Each runner's median tokens/s over the repetitions."""
    return {k: statistics.median(v) for k, v in per_rep.items()}


def ratio(row: dict, a: str, b: str) -> float:
    """How much faster `a` decoded than `b`: the median over repetitions of a's tokens/s over b's in the same
    repetition (taken seconds apart). This machine's speed drifts by up to 2x within minutes; a ratio of two
    bests or two medians can pair a fast spell of one side with a slow spell of the other, a paired ratio
    cannot."""
    return statistics.median(x / y for x, y in zip(row["per_rep"][a], row["per_rep"][b]))


def bench_model(name: str, threads: list[int], n: int, reps: int, with_reference: bool,
                compiled: bool) -> list[dict]:
    from xfp.evaluate.generation import compile_decode_steps, load_model
    from xfp.runtime.kernels import cpu

    label, gguf, hf = model_paths(name)
    folder = xfp_folder(gguf)
    xfp_model, tokenizer = load_model(folder)
    xfp_emb, _ = load_model(xfp_folder(gguf, embeddings=True))
    src32, _ = load_model(hf)
    src16, _ = load_model(hf)
    src16 = src16.to(torch.bfloat16)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    xfp_tokens = first_tokens(xfp_model, ids, 32)
    agree = sum(a == b for a, b in zip(xfp_tokens, first_tokens(src32, ids, 32)))
    twins = {}
    if compiled:  # second copies: compile_decode_steps changes how their `generate` runs
        twins = {"xfp_compiled": load_model(folder)[0], "fp32_compiled": load_model(hf)[0]}
        for model in twins.values():
            compile_decode_steps(model)
    mb = {"xfp": weight_bytes_per_step(xfp_model), "xfp_emb": weight_bytes_per_step(xfp_emb),
          "fp32": weight_bytes_per_step(src32),
          "bf16": weight_bytes_per_step(src16)}
    rows = []
    for t in threads:
        torch.set_num_threads(t)

        def xfp_run(k: int) -> float:
            with kernel(None):
                return generate_seconds(xfp_model, ids, k)

        def xfp_ref(k: int) -> float:
            with kernel("reference"):
                return generate_seconds(xfp_model, ids, k)

        def xfp_emb_run(k: int) -> float:
            with kernel(None):
                return generate_seconds(xfp_emb, ids, k)

        runners = {"xfp": xfp_run, "xfp_emb": xfp_emb_run, "fp32": lambda k: generate_seconds(src32, ids, k),
                   "bf16": lambda k: generate_seconds(src16, ids, k)}
        for key, model in twins.items():
            runners[key] = lambda k, model=model: generate_seconds(model, ids, k)
        llama = {}
        for file_label, path in llama_cpp_files(name, gguf).items():
            run = llama_cpp_runner(path, t, n_ctx=ids.shape[1] + n + 8)
            if run is not None:
                llama[file_label] = run
        per_rep = measure({**runners, **{LLAMA_PREFIX + k: v for k, v in llama.items()}}, n, reps)
        tps = typical(per_rep)
        llama_tps = {k: tps.pop(LLAMA_PREFIX + k) for k in llama}
        if with_reference:  # ~1 tok/s: a few tokens, once, are enough to place it
            tps["xfp_reference"] = measure({"xfp_reference": xfp_ref}, REFERENCE_TOKENS, 1)["xfp_reference"][0]
        parts = step_breakdowns({"xfp": xfp_model, "xfp_emb": xfp_emb, "fp32": src32, "bf16": src16})
        for key, eager in (("xfp_compiled", "xfp"), ("fp32_compiled", "fp32")):
            if key in tps:  # the same matrices called eagerly: the compiled step's rest is what compiling shrank
                parts[key] = parts[eager]
        row = {"model": label, "threads": t, "tokens": n, "reps": reps, "agree": agree, "gguf": gguf.name, "mb": mb,
               "isa": cpu.isa(), "parts": parts, "per_rep": per_rep, **tps}
        if twins:
            row["compiled_agree"] = sum(a == b for a, b in zip(first_tokens(twins["xfp_compiled"], ids, 32),
                                                               xfp_tokens))
        if llama_tps:
            row["llama_cpp"] = llama_tps
            row["llama_cpp_quality"] = llama_cpp_quality(name)
        rows.append(row)
        for k, p in parts.items():
            step = 1e3 / tps[k]
            print(f"  {k} step {step:.1f} ms = {p['n_matrices']} matrices {p['matrices_ms']:.1f} ms + lm_head "
                  f"{p['lm_head_ms']:.1f} ms + rest {step - p['matrices_ms'] - p['lm_head_ms']:.1f} ms", flush=True)
        print(f"decode {label} {t}t: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items()) +
              "".join(f", llama.cpp {k} {v:.1f} tok/s" for k, v in llama_tps.items()) +
              f"; xfp/fp32 {ratio(row, 'xfp', 'fp32'):.2f}x, xfp/bf16 {ratio(row, 'xfp', 'bf16'):.2f}x, "
              f"xfp_emb/fp32 {ratio(row, 'xfp_emb', 'fp32'):.2f}x; "
              + (f"compiled xfp/fp32 {ratio(row, 'xfp_compiled', 'fp32_compiled'):.2f}x; " if twins else "") +
              f"weights/step MB: " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in mb.items()) +
              f"; first 32 greedy tokens equal to fp32: {agree}/32", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    has_llama = any("llama_cpp" in r for r in rows)
    has_ref = any("xfp_reference" in r for r in rows)
    lines = ["## End-to-end greedy decode, batch 1 (benchmarks/decode_speed.py)", "",
             "transformers `generate`, greedy, KV cache, exactly N tokens (end-of-sequence forbidden by `NoEos`); "
             "decode tokens/s excludes the prompt's prefill. The variants take turns within each of "
             f"{rows[0]['reps'] if rows else '-'} repetitions; tokens/s is each one's median over them, and every "
             "'A vs B' is the median over the repetitions of A's tokens/s over B's in the same repetition (this "
             "machine's speed drifts by up to 2x within minutes: a paired ratio compares runs seconds apart). "
             "XFP = the default `QuantConfig()` folder of the model's GGUF, float32 activations. "
             "'weights MB/step' = bytes of weights each step multiplies with (XFP matrices as stored; in the "
             "default XFP folder, whose embeddings are not quantized, the tied lm_head is the embedding as "
             "stored, float16, read by the fused float16 GEMV).", "",
             "XFP+emb = the same with `--quantize-embeddings`: the tied lm_head multiplies with the stored "
             "embedding through the fused kernel.", "",
             "| model | threads | XFP tok/s | XFP+emb tok/s | fp32 tok/s | bf16 tok/s | XFP vs fp32 | XFP+emb vs fp32 | "
             "XFP vs bf16 | "
             + ("XFP reference-kernel tok/s | " if has_ref else "")
             + "weights MB/step XFP / XFP+emb / fp32 / bf16 | greedy tokens = fp32 (of 32) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_ref else "")
             + "---|---:|"]
    for r in rows:
        cells = [r["model"], str(r["threads"]), f"{r['xfp']:.1f}", f"{r['xfp_emb']:.1f}", f"{r['fp32']:.1f}",
                 f"{r['bf16']:.1f}", f"**{ratio(r, 'xfp', 'fp32'):.2f}x**", f"**{ratio(r, 'xfp_emb', 'fp32'):.2f}x**",
                 f"{ratio(r, 'xfp', 'bf16'):.2f}x"]
        if has_ref:
            cells.append(f"{r['xfp_reference']:.2f}" if "xfp_reference" in r else "-")
        cells += [" / ".join(f"{r['mb'][k] / 1e6:.0f}" for k in ("xfp", "xfp_emb", "fp32", "bf16")), str(r["agree"])]
        lines.append("| " + " | ".join(cells) + " |")
    compiled = [r for r in rows if "xfp_compiled" in r]
    if compiled:
        lines += ["", "Compiled decode steps (`xfp generate --compile`: torch.compile with inductor and a static KV "
                  "cache, `compile_decode_steps`; the prompt's prefill stays eager), the same prompt and tokens, "
                  "interleaved with the runs above:", "",
                  "| model | threads | XFP compiled tok/s | fp32 compiled tok/s | compiled XFP vs compiled fp32 | "
                  "compiled XFP vs eager fp32 | compiled vs eager XFP | compiled fp32 vs eager fp32 | "
                  "greedy tokens = eager XFP (of 32) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in compiled:
            lines.append(f"| {r['model']} | {r['threads']} | {r['xfp_compiled']:.1f} | {r['fp32_compiled']:.1f} | "
                         f"**{ratio(r, 'xfp_compiled', 'fp32_compiled'):.2f}x** | {ratio(r, 'xfp_compiled', 'fp32'):.2f}x | "
                         f"{ratio(r, 'xfp_compiled', 'xfp'):.2f}x | {ratio(r, 'fp32_compiled', 'fp32'):.2f}x | "
                         f"{r['compiled_agree']} |")
    lines += ["", "Where a decode step's time goes (ms; matrices and lm_head measured apart from the model, on "
              "[1, 1, in] inputs, the variants taking turns, best of 5; rest = step - both: attention, norms, "
              "embedding, `generate`; the compiled rows reuse their eager model's matrices and lm_head, so their "
              "rest is what is left once inductor has fused the model's own ops):", "",
              "| model | threads | variant | step ms | decoder matrices ms | lm_head ms | rest ms |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        for k, p in r.get("parts", {}).items():
            step = 1e3 / r[k]
            lines.append(f"| {r['model']} | {r['threads']} | {k} | {step:.1f} | {p['matrices_ms']:.1f} "
                         f"({p['n_matrices']}) | {p['lm_head_ms']:.1f} | {step - p['matrices_ms'] - p['lm_head_ms']:.1f} |")
    if not has_llama:
        why = "; ".join(sorted({v for v in LLAMA_CPP_STATUS.values() if v})) or "not run"
        lines += ["", f"llama.cpp: not measured in this run ({why}; optional, never in CI)."]
    else:
        lines += ["", *llama_cpp_markdown([r for r in rows if "llama_cpp" in r])]
    return "\n".join(lines)


def llama_cpp_markdown(rows: list[dict]) -> list[str]:
    """The race against llama.cpp: tokens/s side by side, and each side's honest bits and KL where
    benchmarks/llamacpp_quality.py measured them on the same windows."""
    labels = list(dict.fromkeys(k for r in rows for k in r["llama_cpp"]))
    lines = ["### Against llama.cpp (optional, not in CI)", "",
             "The same prompt and token count through llama-cpp-python's `create_completion` (greedy, EOS "
             "forbidden by a logit bias) at the same thread count, interleaved with the runs above. 'own' = the "
             "model's published GGUF, which is XFP's source (KL 0 by definition); Q4_K_M / Q3_K_M = llama.cpp's "
             "own quantizer on that source's float32 weights, no imatrix, token embedding and output kept F16 "
             "like the default XFP folder (`benchmarks/llamacpp_quality.py`). The default folder's KL is far "
             "worse than Q4_K_M's; the race at equal KL, XFP's strict floor raised until it gets there, is "
             "docs/EQUAL_KL_RACE.md (`benchmarks/matched_kl.py`).", "",
             "| model | threads | XFP tok/s | XFP+emb tok/s | XFP compiled tok/s | "
             + " | ".join(f"llama.cpp {k} tok/s" for k in labels) + " | "
             + " | ".join(f"XFP / {k} | XFP compiled / {k}" for k in labels if k != "own") + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * (len(labels) + 2 * sum(k != "own" for k in labels))]
    for r in rows:
        speeds, best = r["llama_cpp"], r.get("xfp_compiled")
        cells = [r["model"], str(r["threads"]), f"{r['xfp']:.1f}", f"{r['xfp_emb']:.1f}",
                 "-" if best is None else f"{best:.1f}"]
        cells += [f"{speeds[k]:.1f}" if k in speeds else "-" for k in labels]
        for k in labels:
            if k != "own":
                cells += [f"**{ratio(r, 'xfp', LLAMA_PREFIX + k):.2f}x**" if k in speeds else "-",
                          f"**{ratio(r, 'xfp_compiled', LLAMA_PREFIX + k):.2f}x**" if k in speeds and best is not None
                          else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    quality = {r["model"]: r["llama_cpp_quality"] for r in rows if r.get("llama_cpp_quality")}
    if quality:
        lines += ["", "Quality of the same files (`python benchmarks/llamacpp_quality.py <model> --types "
                  + ",".join(KQUANTS) + "`: KL(source || model) per token on the same windows, honest bits over "
                  "the same attention and MLP matrices):", "",
                  "| model | file | honest bits | KL | ppl | windows |", "|---|---|---:|---:|---:|---:|"]
        for model, rows_by_method in quality.items():
            for method, q in rows_by_method.items():
                if method.endswith("-F32"):
                    continue
                lines.append(f"| {model} | {method} | {q['honest_bits']:.3f} | {q['kl']:.4f} | {q['ppl']:.2f} | "
                             f"{q['windows']} |")
    return lines


def main(argv: list[str] | None = None, *, as_markdown: bool = False) -> str | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=["default"])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true", help="skip the XFP reference-kernel column")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled XFP and float32 columns")
    ap.add_argument("--quick", action="store_true", help="32 tokens, 2 repetitions")
    args = ap.parse_args(argv)
    n, reps = (32, 2) if args.quick else (args.tokens, args.reps)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    rows = []
    for name in args.models:
        rows += bench_model(name, args.threads, n, reps, not args.no_reference, not args.no_compile)
    doc = markdown(rows)
    if as_markdown:
        return doc
    print()
    print(doc)
    return None


if __name__ == "__main__":
    main()
