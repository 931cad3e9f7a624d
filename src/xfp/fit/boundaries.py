"""The boundaries a fitted model must stay inside: memory (OOM) and quality (garbage, KL).

Memory: quantizing and loading each run in a fresh spawned process whose peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is read at the end of the step, next to the size of the
bare process (python + torch + transformers imported). For a larger model the peaks are predicted from
the table: quantizing reads the source and holds one matrix at a time (its float32 copy, the normalised
groups auto-select keeps, the candidate under test), so its excess grows with the parameters and with the
largest matrix; loading through
transformers builds the model in float32 before the XFP layers take the packed tensors, so its excess grows
with the parameters. The per-weight factors below were measured on SmolLM2-135M (docs/FIT.md).

Quality: the written folder is loaded through transformers like any user would (peak RSS taken there), then
each XFP layer is swapped for a dense layer holding its exact decoded matrix (`densify`, for speed only);
KL(source || model) is taken on the first windows of the offline text (Canterbury), and the generation check
(`xfp.evaluate.generation.garbage_score`, judged by the source) must pass.
"""

from __future__ import annotations

import resource
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from xfp.errors import XFPError
from xfp.fit.table import Table

QUANTIZE_BYTES_PER_PARAMETER = 2.0
"""Excess peak RSS while quantizing, per parameter of the source (the source's tensors held while they are
read). With QUANTIZE_BYTES_PER_WEIGHT, fitted to two SmolLM2 runs (docs/FIT.md): largest matrix 884,736
weights (a 576 x 1536 MLP matrix), 1066.4 MB peak - 788.6 MB bare = 277.8 MB; largest matrix 28.3 M weights
(the embedding, --quantize-embeddings), 2161.6 MB - 788.1 MB = 1373.5 MB. The line through them is 1.8 B per
parameter (134.5 M) plus 40 B per weight of the largest matrix; both rounded up."""

QUANTIZE_BYTES_PER_WEIGHT = 48.0
"""Excess peak RSS while quantizing, per weight of the largest matrix (auto-select holds its float32 copy,
the normalised groups it keeps and the candidate under test); see QUANTIZE_BYTES_PER_PARAMETER."""

LOAD_BYTES_PER_PARAMETER = 1.0
"""Excess peak RSS while loading an XFP folder, per parameter: measured on SmolLM2 (38% fit), 913.6 MB
peak - 788.6 MB bare = 125 MB for 134.5 M parameters (0.93 B/parameter); the highest since, 936.3 MB (1.10
B/parameter over a bare 788.6 MB), stays under the forecast because BARE_PROCESS_BYTES is rounded up. A folder
with quantized embeddings loaded without exceeding the bare process's peak."""

BARE_PROCESS_BYTES = 800 * 2**20
"""Peak RSS of a process that imported torch, transformers and xfp and did nothing yet (788.1-820.7 MB
measured; 838.9 MB here). One model calibrates these constants: treat the forecast for much larger models as
a first estimate."""

DEFAULT_MAX_KL = 0.5
"""KL(source || model) bound, nats/token, on the first windows of the offline text."""


@dataclass(frozen=True)
class MemoryForecast:
    quantize_bytes: int
    load_bytes: int

    def to_dict(self) -> dict:
        return {"quantize_peak_bytes": self.quantize_bytes, "load_peak_bytes": self.load_bytes}


def forecast(table: Table) -> MemoryForecast:
    """Predicted peak RSS of quantizing and of loading, from the table alone."""
    largest = max((m.weights for m in table.matrices), default=0)
    parameters = table.fp16_bytes // 2
    return MemoryForecast(int(BARE_PROCESS_BYTES + QUANTIZE_BYTES_PER_PARAMETER * parameters
                              + QUANTIZE_BYTES_PER_WEIGHT * largest),
                          int(BARE_PROCESS_BYTES + LOAD_BYTES_PER_PARAMETER * parameters))


def check_forecast(table: Table, max_ram: int | None) -> MemoryForecast:
    f = forecast(table)
    if max_ram is not None:
        worst = max(f.quantize_bytes, f.load_bytes)
        if worst > max_ram:
            step = "quantizing" if f.quantize_bytes >= f.load_bytes else "loading"
            raise XFPError(f"--max-ram {max_ram / 2**20:.0f} MiB is below the predicted peak while {step} "
                           f"({worst / 2**20:.0f} MiB, a forecast calibrated on SmolLM2-135M); raise --max-ram")
    return f


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _in_child(fn, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _bare() -> int:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import xfp  # noqa: F401

    return peak_rss()


def _write(src: str, out: str, table: Table, plan) -> dict:
    bare = _bare()
    from xfp.fit.output import write_plan

    report = write_plan(src, out, table, plan)
    return {"bare_bytes": bare, "peak_bytes": peak_rss(), "output_bytes": report["totals"]["output_bytes"],
            "seconds": report["seconds"]}


def write_measured(src: str | Path, out: str | Path, table: Table, plan) -> dict:
    """Write the plan's folder in a fresh process; its peak RSS and the folder's real size."""
    return _in_child(_write, str(src), str(out), table, plan)


def _check(out: str, source: str, windows: int, ctx: int, garbage: bool) -> dict:
    bare = _bare()
    from xfp.evaluate import generation, models
    from xfp.evaluate.perplexity import token_windows
    from xfp.evaluate.scoring import score_windows

    model, tokenizer = generation.load_model(Path(out))
    loaded = peak_rss()
    densify(model)
    reference, _ = models.load(source)
    models.same_vocabulary(model, reference)
    ids = models.text_ids(tokenizer)
    bos = models.bos_to_prepend(tokenizer)
    spans = token_windows(ids, ctx, ctx, windows, bos=bos is not None)
    scores = score_windows(ids, spans, {"model": lambda: model}, reference=lambda: reference, bos_id=bos,
                           progress=False)
    m, s = scores["model"], scores["source"]
    result = {"bare_bytes": bare, "load_peak_bytes": loaded, "kl": m.kl, "top1": m.top1, "ppl": m.ppl,
              "source_ppl": s.ppl, "windows": len(spans), "ctx": ctx, "tokens": m.tokens}
    if garbage:
        g = generation.garbage_score(model, tokenizer, reference)
        result.update(garbage=g.score, garbage_passed=g.passed, garbage_threshold=g.threshold)
    return result


def densify(model) -> int:
    """Replace every XFPLinear of a loaded model by a float32 nn.Linear holding its exact decoded matrix
    (`xfp.format.reference.decode`, the oracle every kernel matches), so the KL windows and the generation
    check run at dense speed; the numbers are those of the stored tensors. Returns how many were replaced.
    An `XFPEmbedding` stays: a lookup already decodes only its rows, exactly."""
    import torch
    from torch import nn

    from xfp.format.reference import decode
    from xfp.runtime.linear import XFPLinear

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, XFPLinear)]
    for name, m in targets:
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            dense.weight.copy_(decode(m.packed()).float())
            if m.bias is not None:
                dense.bias.copy_(m.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    return len(targets)


def check_quality(out: str | Path, source: str | Path, *, windows: int = 4, ctx: int = 512,
                  garbage: bool = True) -> dict:
    """Load the folder `out` in a fresh process (its peak RSS after loading), then KL and the generation
    check against `source` (an alias, folder or GGUF file)."""
    return _in_child(_check, str(out), str(source), windows, ctx, garbage)


def passes(quality: dict, max_kl: float) -> tuple[bool, str]:
    """(passed, reason) of a `check_quality` result."""
    if quality.get("garbage_passed") is False:
        return False, f"generation check failed (garbage {quality['garbage']:.3f} > {quality['garbage_threshold']})"
    if quality["kl"] > max_kl:
        return False, f"KL {quality['kl']:.4f} > --max-kl {max_kl}"
    return True, "passed"
