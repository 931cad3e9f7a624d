"""Figures of a quantized MoE folder, from its report.json: honest bits of routed experts, shared experts and
attention, the strict/lazy bytes split, and the per-stack summaries.

    nice -n 15 .venv/bin/python benchmarks/moe_report.py OUT_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    report = json.loads((Path(sys.argv[1]) / "report.json").read_text())
    rows = [t for t in report["tensors"] if "bits" in t]
    groups = {"routed experts (lazy)": [t for t in rows if "stack" in t],
              "shared experts (strict)": [t for t in rows if ".shared_expert" in t["name"]],
              "attention (strict)": [t for t in rows if ".self_attn." in t["name"]]}
    print(f"{'group':26s} {'matrices':>8s} {'honest bits':>11s} {'index bits':>10s} {'min p1 cos':>10s} {'below floor':>11s}")
    for name, g in groups.items():
        if not g:
            continue
        w = sum(t["shape"][0] * t["shape"][1] for t in g)
        honest = 8 * sum(t["bytes"] for t in g) / w
        index = sum(t["bits"] * t["shape"][0] * t["shape"][1] for t in g) / w
        low = min(t["cosine"][t["statistic"]] for t in g)
        missed = sum(not t["meets_floor"] for t in g)
        print(f"{name:26s} {len(g):8d} {honest:11.3f} {index:10.3f} {low:10.5f} {missed:11d}")
    print()
    for cls, c in report["classes"].items():
        print(f"class {cls:6s} floor {c['floor']}: {c['matrices']} matrices, {c['bytes'] / 2**20:.2f} MiB "
              f"({c.get('bytes_share', 0):.1%} of quantized bytes), {c['honest_bits']:.3f} honest bits")
    stacks = report.get("stacks", [])
    bits: dict[str, int] = {}
    for s in stacks:
        for b, n in s["bits"].items():
            bits[b] = bits.get(b, 0) + n
    if stacks:
        print(f"\n{len(stacks)} expert stacks, {sum(s['experts'] for s in stacks)} experts; widths {bits}; "
              f"select {stacks[0]['select']['select']}; escalated "
              f"{sum(len(s['select'].get('escalated', [])) for s in stacks)}; "
              f"lowest expert statistic {min(s['cosine_min_over_experts'] for s in stacks):.5f}; "
              f"below floor {sum(s['missed_floor'] for s in stacks)}")


if __name__ == "__main__":
    main()
