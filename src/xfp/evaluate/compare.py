"""`xfp compare`: quality per honest bit of several methods on one source model, measured the same way.

Fake quantization: each method's W_hat (the exact matrix its real decoder would give) is swapped into one
transformers model of the source, tensor by tensor, by pointer (no copy for float32 W_hat, one upcast
for float16 ones). All methods are quantized first and their W_hat kept in memory (methods x quantized
weights x 2 or 4 bytes: ~0.2-0.4 GB per method for the 135M / 270M models); then the windows are scored
once, window by window: the source runs once per window and every method right after it, so the source
pass happens once per compare and no per-window logits are stored. Finished windows and generation checks
are journaled under OUT/.compare-work, so `--resume` continues an interrupted run (a full compare of the
default method set takes about an hour on two CPU cores).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from xfp.errors import XFPError
from xfp.evaluate import generation, models
from xfp.evaluate.methods import FakeQuantized, MethodContext, MethodSpec, fake_quantize, quantized_names
from xfp.evaluate.perplexity import token_windows
from xfp.evaluate.scoring import Scores, score_windows


class WeightSwap:
    """One model whose quantized parameters can be set to the source's or to any method's W_hat."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.model = model
        self.params = {}
        for name in names:
            try:
                self.params[name] = model.get_parameter(name)
            except AttributeError:
                raise XFPError(f"the transformers model has no parameter '{name}' that the source stores") from None
        self.original = {name: p.data for name, p in self.params.items()}
        self._current: object = "source"

    def activate(self, w_hat: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """Set every quantized parameter to `w_hat` (None: the source's) and return the model."""
        key = "source" if w_hat is None else id(w_hat)
        if key != self._current:
            for name, param in self.params.items():
                t = self.original[name] if w_hat is None else w_hat[name]
                if t.shape != param.shape:
                    raise XFPError(f"tensor '{name}': W_hat {tuple(t.shape)} does not fit {tuple(param.shape)}")
                param.data = t if t.dtype == param.dtype else t.to(param.dtype)
            self._current = key
        return self.model


@dataclass
class Row:
    """One line of the comparison. kl / top1 / delta_ppl are None for the source row; garbage is None when
    the generation check was skipped."""

    method: str
    family: str
    about: str
    honest_bits: float | None
    stored_bytes: int | None
    weights: int | None
    ppl: float
    delta_ppl: float | None
    kl: float | None
    top1: float | None
    quantize_s: float | None
    eval_s: float
    garbage: float | None = None
    garbage_passed: bool | None = None


def source_format_bits(src: Path, names: list[str]) -> dict | None:
    """For a GGUF source: the storage types of the quantized tensors and their bits per weight as published."""
    from xfp.sources.base import GGUF_MAGIC

    if src.is_dir():
        return None
    with open(src, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            return None
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from xfp.sources.gguf_file import GGUFSource

    gguf = GGUFSource(src)
    known = set(gguf.tensor_names())
    types: dict[str, int] = {}
    stored = weights = 0
    for name in names:
        if name not in known:
            continue
        label = gguf.tensor_dtype(name)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[label]]
        n = math.prod(gguf.tensor_shape(name))
        stored += n // block * size
        weights += n
        types[label] = types.get(label, 0) + 1
    return {"types": types, "bits": 8.0 * stored / weights if weights else None}


class Journal:
    """Finished work of one compare, appended line by line to `<out>/.compare-work/journal.jsonl`.

    The first line holds the run's settings (source fingerprint, text, windows, methods, prompts, xfp
    version). With `resume`, a journal whose settings are equal is read back, so an interrupted compare
    only redoes what is missing (quantization is recomputed when a method still has work: it is
    deterministic); any other journal is started afresh. Without a folder everything stays in memory.
    """

    def __init__(self, folder: Path | None, settings: dict, resume: bool):
        self.path = None if folder is None else Path(folder) / ".compare-work" / "journal.jsonl"
        self.records: dict[tuple[str, str], object] = {}
        if self.path is None:
            return
        head = json.dumps({"settings": settings}, sort_keys=True)
        if resume and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines and lines[0] == head:
                for line in lines[1:]:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line torn by the interruption: drop it and the rest
                        break
                    self.records[(record["kind"], record["key"])] = record["data"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as handle:  # rewritten: settings + the good records
            handle.write(head + "\n")
            for (kind, key), data in self.records.items():
                handle.write(json.dumps({"kind": kind, "key": key, "data": data}) + "\n")

    def get(self, kind: str, key: str) -> object | None:
        return self.records.get((kind, str(key)))

    def add(self, kind: str, key: str, data: object) -> None:
        self.records[(kind, str(key))] = data
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"kind": kind, "key": str(key), "data": data}) + "\n")

    def finish(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


def run_compare(src: str | Path, methods: list[MethodSpec], *, text: str | Path | None = None, ctx: int = 512,
                stride: int | None = None, max_windows: int | None = 32, garbage: bool = True,
                prompts: tuple[str, ...] = generation.PROMPTS, out: str | Path | None = None, resume: bool = False,
                progress: bool = True) -> dict:
    """Quantize the source with every method, score all on the same windows; returns the JSON-ready result.

    garbage: also run the generation sanity check (`generation.garbage_report`) on `prompts`.
    out: write compare.json / compare.md / pareto.png there at the end, and journal finished work under
    `out/.compare-work` meanwhile; resume: continue an interrupted compare with the same settings.
    """
    began = time.perf_counter()
    src_path = models.resolve(src)
    folder = models.hf_folder(src_path)
    from xfp.sources.base import open_source

    source = open_source(folder)
    config = source.config()
    if "quantization_config" in config:
        raise XFPError(f"{folder}: is already quantized ({config['quantization_config'].get('quant_method')}); "
                       "compare needs the unquantized source")
    model, tokenizer = models.load(folder)
    names = quantized_names(source, config)
    if not names:
        raise XFPError(f"{src_path}: no tensor is classified for quantization")
    swap = WeightSwap(model, names)
    text_path = Path(text) if text is not None else models.default_text()
    ids = models.text_ids(tokenizer, text_path)
    bos = models.bos_to_prepend(tokenizer)
    windows = token_windows(ids, ctx, ctx if stride is None else stride, max_windows, bos=bos is not None)
    import xfp

    settings = {"source": str(src_path), "fingerprint": source.fingerprint(), "text": str(text_path),
                "text_tokens": len(ids), "windows": [list(w) for w in windows], "bos": bos,
                "methods": [m.name for m in methods], "garbage": garbage, "prompts": list(prompts),
                "xfp": xfp.__version__}
    journal = Journal(None if out is None else Path(out), settings, resume)

    todo_windows = [i for i in range(len(windows)) if journal.get("window", i) is None]
    needs_garbage = {m.name for m in methods if garbage and journal.get("garbage", m.name) is None}
    mctx = MethodContext(source=source, config=config, model=model)
    quantized: dict[str, FakeQuantized] = {}
    for spec in methods:
        if not todo_windows and spec.name not in needs_garbage:
            continue
        swap.activate(None)  # methods see the source model as it is
        fq = fake_quantize(spec, mctx, names, progress=progress)
        quantized[spec.name] = fq
        if journal.get("quantized", spec.name) is None:
            journal.add("quantized", spec.name, {"stored_bytes": fq.stored_bytes, "weights": fq.weights,
                                                 "seconds": fq.seconds})
        if progress:
            print(f"  {spec.name}: {fq.honest_bits:.3f} honest bits, {fq.seconds:.1f} s", flush=True)

    candidates = {name: (lambda fq=fq: swap.activate(fq.w_hat)) for name, fq in quantized.items()}
    for i in tqdm(todo_windows, desc=f"windows (source + {len(methods)} methods)", disable=not progress,
                  unit="window"):
        one = score_windows(ids, [windows[i]], candidates, reference=lambda: swap.activate(None), bos_id=bos,
                            progress=False)
        journal.add("window", i, {name: s.sums() for name, s in one.items()})
    scores = {name: Scores(name) for name in ["source"] + [m.name for m in methods]}
    for i in range(len(windows)):
        for name, sums in journal.get("window", i).items():
            scores[name].add(Scores.from_sums(name, sums))

    reports: dict[str, generation.GarbageReport] = {}
    if garbage:
        source_runs = generation.greedy_continuations(swap.activate(None), tokenizer, prompts, bos_id=bos)
        source_nll = None
        for spec in tqdm(methods, desc="generation sanity", disable=not progress, unit="method"):
            if spec.name in needs_garbage:
                runs = generation.greedy_continuations(swap.activate(quantized[spec.name].w_hat), tokenizer, prompts,
                                                       bos_id=bos)
                judge = swap.activate(None)
                if source_nll is None:
                    source_nll = [generation.continuation_nll(judge, r) for r in source_runs]
                report = generation.garbage_report(runs, source_runs,
                                                   [generation.continuation_nll(judge, r) for r in runs], source_nll,
                                                   tokenizer)
                journal.add("garbage", spec.name, report.to_dict())
            reports[spec.name] = generation.GarbageReport(**journal.get("garbage", spec.name))
        reports["source"] = generation.garbage_report(source_runs, source_runs, None, None, tokenizer)

    base = scores["source"]
    rows = [Row("source", "source", "the source model as loaded (float32)", None, None, None, base.ppl, None, None,
                None, None, base.seconds)]
    for spec in methods:
        q, s = journal.get("quantized", spec.name), scores[spec.name]
        rows.append(Row(spec.name, spec.family, spec.about, 8.0 * q["stored_bytes"] / q["weights"], q["stored_bytes"],
                        q["weights"], s.ppl, s.ppl - base.ppl, s.kl, s.top1, q["seconds"], s.seconds))
    for row in rows:
        if row.method in reports:
            row.garbage, row.garbage_passed = reports[row.method].score, reports[row.method].passed
    import transformers

    result = {
        "source": str(src_path),
        "model_folder": str(folder),
        "source_format": source_format_bits(src_path, names),
        "text": str(text_path),
        "ctx": ctx,
        "stride": ctx if stride is None else stride,
        "windows": len(windows),
        "tokens": base.tokens,
        "bos": None if bos is None else tokenizer.convert_ids_to_tokens(bos),
        "quantized_tensors": len(names),
        "rows": [asdict(row) for row in rows],
        "garbage": {name: report.to_dict() for name, report in reports.items()},
        "garbage_threshold": generation.GARBAGE_THRESHOLD,
        "seconds": time.perf_counter() - began,
        "resumed": len(todo_windows) < len(windows) or (garbage and len(needs_garbage) < len(methods)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"xfp": xfp.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    if out is not None:
        write_outputs(result, Path(out))
        journal.finish()
    return result


# -- output ---------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    """The rows as a Markdown table (also readable as plain text)."""
    head = ("| method | honest bits | ppl | Δppl | KL (nats) | top-1 | garbage | quantize s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in result["rows"]:
        g = "-" if r["garbage"] is None else f"{r['garbage']:.3f}{'' if r['garbage_passed'] else ' ✗'}"
        lines.append(f"| {r['method']} | {_fmt(r['honest_bits'], '.3f')} | {r['ppl']:.3f} | "
                     f"{_fmt(r['delta_ppl'], '+.3f')} | {_fmt(r['kl'], '.4f')} | {_fmt(r['top1'], '.3f')} | {g} | "
                     f"{_fmt(r['quantize_s'], '.1f')} |")
    return "\n".join(lines)


def describe(result: dict) -> str:
    """One line saying what was measured."""
    fmt = result.get("source_format")
    published = ""
    if fmt and fmt.get("bits"):
        types = ", ".join(f"{k} x{v}" for k, v in sorted(fmt["types"].items()))
        published = f"; the quantized tensors were published as {types} ({fmt['bits']:.3f} bits/weight)"
    bos = f"BOS {result['bos']} prepended to each window" if result["bos"] else "no BOS"
    return (f"{Path(result['source']).name}: {result['windows']} windows of {result['ctx']} tokens (stride "
            f"{result['stride']}, {bos}), {result['tokens']} scored tokens of {Path(result['text']).name}; "
            f"{result['quantized_tensors']} quantized tensors{published}")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (fewer or equal bits and lower or equal KL), by bits."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(result: dict, path: Path) -> None:
    """KL (log) against honest bits, one marker per family, the Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["kl"] is not None and r["honest_bits"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"rtn": "s", "nf": "^", "hqq": "D", "xfp": "o", "llama.cpp": "P"}
    for family in sorted({r["family"] for r in rows}):
        fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["honest_bits"])
        ax.plot([r["honest_bits"] for r in fam], [max(r["kl"], 1e-6) for r in fam], marker=markers.get(family, "x"),
                linestyle="-" if family == "xfp" else "none", label=family)
        for r in fam:
            ax.annotate(r["method"], (r["honest_bits"], max(r["kl"], 1e-6)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    points = [(r["honest_bits"], max(r["kl"], 1e-6)) for r in rows]
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="gray",
                linestyle="--", linewidth=0.8, label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel("honest bits / weight (every stored byte of the quantized matrices)")
    ax.set_ylabel("mean KL(source || method), nats / token")
    ax.set_title(f"{Path(result['source']).name}: {result['windows']} x {result['ctx']} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


RERUN_SAME = ("source", "text", "ctx", "stride", "windows", "tokens", "bos", "quantized_tensors")
"""What a rerun must share with the compare whose rows it replaces."""


def merge_rerun(old: dict, fresh: dict, drop: tuple[str, ...] = (), ppl_rtol: float = 1e-4) -> dict:
    """The compare `old` with the rows of `fresh` (a compare of some methods on the same windows) put in place
    of its rows of the same methods, new methods appended, and the rows of `drop` (made stale by a change,
    not rerun) removed; `reruns` lists each merge. XFPError when the two differ in what makes rows comparable
    (`RERUN_SAME`, or the source's perplexity beyond `ppl_rtol`)."""
    differ = [k for k in RERUN_SAME if fresh.get(k) != old.get(k)]
    ppl_old, ppl_new = (next(r["ppl"] for r in res["rows"] if r["method"] == "source") for res in (old, fresh))
    if differ or abs(ppl_new - ppl_old) > ppl_rtol * ppl_old:
        raise XFPError(f"the rerun was not measured like the compare it would join "
                       f"({', '.join(differ) or f'source ppl {ppl_new} != {ppl_old}'}); rerun the whole compare")
    new_rows = {r["method"]: r for r in fresh["rows"] if r["method"] != "source"}
    if set(drop) & set(new_rows):
        raise XFPError(f"a rerun method cannot also be dropped: {', '.join(sorted(set(drop) & set(new_rows)))}")
    dropped = [r["method"] for r in old["rows"] if r["method"] in drop]
    rows = [new_rows.pop(r["method"], r) for r in old["rows"] if r["method"] not in drop] + list(new_rows.values())
    garbage = {**{k: v for k, v in old["garbage"].items() if k not in drop},
               **{k: v for k, v in fresh["garbage"].items() if k != "source"}}
    note = {"methods": [r["method"] for r in fresh["rows"] if r["method"] != "source"], "dropped": dropped,
            "date": fresh["date"], "seconds": fresh["seconds"], "versions": fresh["versions"]}
    return {**old, "rows": rows, "garbage": garbage, "reruns": [*old.get("reruns", []), note]}


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    """compare.json, compare.md (the table) and pareto.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "table": out / "compare.md", "plot": out / "pareto.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(f"{describe(result)}\n\n{format_table(result)}\n", encoding="utf-8")
    plot_pareto(result, paths["plot"])
    return paths
