"""report.json and REPORT.md of a quantized folder: every tensor's decision, size and cosine statistics."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from xfp import __version__
from xfp.config import STATISTICS, QuantConfig
from xfp.format import io
from xfp.moe.pipeline import stack_report
from xfp.sources.base import TensorSource


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def build(src: Path, source: TensorSource, out: Path, config: QuantConfig, summaries: list[dict],
          shards: list[dict], seconds: float) -> dict:
    quantized = [s for s in summaries if "bits" in s]
    kept = [s for s in summaries if "bits" not in s]
    q_weights = sum(s["shape"][0] * s["shape"][1] for s in quantized)
    q_bytes = sum(s["bytes"] for s in quantized)
    classes = {}
    for cls in ("strict", "lazy"):
        rows = [s for s in quantized if s["class"] == cls]
        if rows:
            w = sum(r["shape"][0] * r["shape"][1] for r in rows)
            b = sum(r["bytes"] for r in rows)
            classes[cls] = {"matrices": len(rows), "weights": w, "bytes": b, "honest_bits": 8 * b / w,
                            "floor": rows[0]["floor"], "missed_floor": sum(not r["meets_floor"] for r in rows)}
    for c in classes.values():  # the bytes split between the strict and the lazy class
        c["bytes_share"] = c["bytes"] / q_bytes
    source_files = [src] if src.is_file() else [p for p in src.iterdir() if p.suffix in (".safetensors", ".gguf")]
    parameters = sum(_numel(s["shape"]) for s in summaries)
    out_bytes = sum(s["bytes"] for s in shards)
    return {
        "xfp_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(src),
        "output": str(out),
        "config": config.to_dict(),
        "seconds": seconds,
        "totals": {
            "parameters": parameters,
            "source_file_bytes": sum(p.stat().st_size for p in source_files),
            "source_fp16_bytes": sum(s["source_fp16_bytes"] for s in summaries),
            "output_bytes": out_bytes,
            "bits_per_parameter": 8 * out_bytes / parameters,
            "quantized_matrices": len(quantized),
            "quantized_weights": q_weights,
            "quantized_bytes": q_bytes,
            "quantized_honest_bits": 8 * q_bytes / q_weights if q_weights else None,
            "quantized_index_bits": (sum(s["bits"] * _numel(s["shape"]) for s in quantized) / q_weights
                                     if q_weights else None),
            "kept_tensors": len(kept),
            "kept_bytes": sum(s["bytes"] for s in kept),
            "missed_floor": [s["name"] for s in quantized if not s["meets_floor"]],
            "warnings": [f"{s['name']}: {s['warning']}" for s in summaries if s.get("warning")],
        },
        "classes": classes,
        "stacks": stack_report(summaries),  # routed expert stacks (xfp.moe); empty for a dense model
        "shards": shards,
        "tensors": summaries,
    }


def _stack_lines(stacks: list[dict]) -> list[str]:
    """REPORT.md section on routed expert stacks: one row per stack."""
    if not stacks:
        return []
    lines = ["", "## Expert stacks", "",
             "| stack | class | experts | select | bits (experts) | honest bits (min..max) | cos stat over experts "
             "(min / median / max) | min channel cos | below floor |", "|---|---|---|---|---|---|---|---|---|"]
    for s in stacks:
        sel = s["select"]
        how = sel["select"] if sel["select"] == "expert" else (
            f"stack ({sel['bits']}b, sample {sel['sample']}, escalated {len(sel['escalated'])}"
            f"{', one codebook' if sel.get('stack_library') else ''})")
        bits = ", ".join(f"{b}b x{n}" for b, n in s["bits"].items())
        lines.append(f"| `{s['name']}` | {s['class']} | {s['experts']} | {how} | {bits} | {s['honest_bits']:.3f} "
                     f"({s['honest_bits_min']:.3f}..{s['honest_bits_max']:.3f}) | {s['cosine_min_over_experts']:.5f} / "
                     f"{s['cosine_median_over_experts']:.5f} / {s['cosine_max_over_experts']:.5f} ({s['statistic']}) | "
                     f"{s['cosine_min']:.5f} | {s['missed_floor']} |")
    return lines


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write(out: Path, report: dict) -> None:
    from xfp.pipeline.plots import write_plots

    io.atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    io.atomic_write(out / "REPORT.md", lambda tmp: tmp.write_text(markdown(report)))
    write_plots(out, report)


def markdown(report: dict) -> str:
    t = report["totals"]
    cfg = report["config"]
    lines = [
        "# XFP quantization report",
        "",
        f"- source: `{report['source']}`",
        f"- XFP {report['xfp_version']}, format {cfg['format_version']}, mode {cfg['mode']}, "
        f"statistic {cfg['statistic']}, floors strict {cfg['floor_strict']} / lazy {cfg['floor_lazy']}",
        f"- time: {report['seconds']:.1f} s",
        "",
        "## Totals",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {t['parameters']:,} |",
        f"| source files | {_mib(t['source_file_bytes'])} |",
        f"| source as fp16 | {_mib(t['source_fp16_bytes'])} |",
        f"| output files | {_mib(t['output_bytes'])} ({t['bits_per_parameter']:.3f} bits/parameter, "
        f"{t['output_bytes'] / t['source_fp16_bytes']:.1%} of fp16) |",
        f"| quantized matrices | {t['quantized_matrices']} ({t['quantized_weights']:,} weights, "
        f"{_mib(t['quantized_bytes'])}) |",
    ]
    if t["quantized_weights"]:
        lines.append(f"| quantized honest bits/weight | {t['quantized_honest_bits']:.3f} "
                     f"(index bits only: {t['quantized_index_bits']:.3f}) |")
    lines += [f"| kept tensors | {t['kept_tensors']} ({_mib(t['kept_bytes'])}) |",
              f"| matrices below their floor | {len(t['missed_floor'])} |", ""]
    if t["missed_floor"]:
        lines += ["**Below the floor even at the widest width:** " + ", ".join(f"`{n}`" for n in t["missed_floor"]), ""]
    if t["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in t["warnings"]] + [""]
    lines += ["## Classes", "", "| class | floor | matrices | honest bits | bytes | below floor |", "|---|---|---|---|---|---|"]
    for cls, c in report["classes"].items():
        share = f" ({c['bytes_share']:.1%})" if "bytes_share" in c else ""
        lines.append(f"| {cls} | {c['floor']} | {c['matrices']} | {c['honest_bits']:.3f} | {_mib(c['bytes'])}{share} "
                     f"| {c['missed_floor']} |")
    lines += _stack_lines(report.get("stacks") or [])
    stat_cols = " | ".join(f"cos {s}" for s in STATISTICS)
    lines += ["", "## Tensors", "",
              f"| tensor | class | shape | bits | outliers | honest bits | {stat_cols} | floor met | reason |",
              "|---|---|---|---|---|---|" + "---|" * len(STATISTICS) + "---|---|"]
    for s in report["tensors"]:
        shape = "x".join(map(str, s["shape"]))
        if "bits" in s:
            stats = " | ".join(f"{s['cosine'][k]:.5f}" for k in STATISTICS)
            lines.append(f"| `{s['name']}` | {s['class']} | {shape} | {s['bits']} | {s['outliers']} | "
                         f"{s['honest_bits']:.3f} | {stats} | {'yes' if s['meets_floor'] else '**no**'} | {s['reason']} |")
        else:
            empty = " | ".join("" for _ in STATISTICS)
            lines.append(f"| `{s['name']}` | keep ({s['stored_dtype']}) | {shape} | | | | {empty} | | {s['reason']} |")
    lines += ["", "Plots: `bits_per_layer.png`, `cosine_by_class.png`, `size_breakdown.png`.", ""]
    return "\n".join(lines)
