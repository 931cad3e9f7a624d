"""PNG plots of a quantization report: bits along depth, cosine distribution per class, size breakdown."""

from __future__ import annotations

import re
from pathlib import Path

from xfp.format import io
from xfp.pipeline.worker import COSINE_HIST_EDGES

_LAYER = re.compile(r"\.(?:layers|h|blocks?)\.(\d+)\.")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def write_plots(out: Path, report: dict) -> None:
    plt = _plt()
    quantized = [s for s in report["tensors"] if "bits" in s]

    fig, ax = plt.subplots(figsize=(9, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for s in quantized:
        m = _LAYER.search(s["name"])
        if m:
            kind = s["name"][m.end():].removesuffix(".weight")
            series.setdefault(kind, []).append((int(m.group(1)), s["honest_bits"]))
    for kind, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("honest bits / weight")
    ax.set_title("Bits chosen per matrix along depth (every stored byte counted)")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2)
    _save(fig, out / "bits_per_layer.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    centers = [max(lo, 1e-8) for lo in COSINE_HIST_EDGES[:-1]]
    for cls in ("strict", "lazy"):
        hists = [s["cosine_hist"] for s in quantized if s["class"] == cls]
        if not hists:
            continue
        total = [sum(col) for col in zip(*hists)]
        n = sum(total)
        ax.step(centers, [c / n for c in total], where="post", label=cls)
    ax.set_xscale("log")
    ax.set_xlabel("1 - cosine (per output channel)")
    ax.set_ylabel("fraction of channels")
    ax.set_title("Per-channel cosine distribution by class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out / "cosine_by_class.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    parts: dict[str, int] = {}
    for s in quantized:
        for part, b in s["bytes_by_part"].items():
            parts[part] = parts.get(part, 0) + b
    parts["kept tensors"] = report["totals"]["kept_bytes"]
    labels = list(parts)
    ax.barh(labels, [parts[k] / 2**20 for k in labels])
    ax.set_xlabel("MiB")
    ax.set_title("Where the bytes go")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, out / "size_breakdown.png")
    plt.close(fig)
