"""Quantization speed on every linear weight of the default model (SmolLM2-135M-Instruct).

Prints, in one run on this machine: XFP auto-select (candidate widths 2, 3, 4; default floors and
outlier budgets) against round-to-nearest g128 4-bit on the same weights, in weights per second.
Loading and dequantizing the GGUF is not timed. Usage: python benchmarks/quantize_speed.py
"""

from __future__ import annotations

import os
import platform
import time

import torch

from xfp.classify import TensorClass, classify
from xfp.config import QuantConfig
from xfp.evaluate.baselines import rtn_asymmetric
from xfp.quantize.autoselect import quantize_matrix
from xfp.sources import fetch
from xfp.sources.base import open_source


def main() -> None:
    source = open_source(fetch.default_model_gguf())
    cfg = source.config()
    weights = []
    for name in source.tensor_names():
        d = classify(name, source.tensor_shape(name), True, cfg)
        if d.cls is not TensorClass.KEEP:
            weights.append((name, source.load(name)))
    total = sum(w.numel() for _, w in weights)
    config = QuantConfig(bits=(2, 3, 4))
    quantize_matrix(weights[0][1], config.floor_strict, config, weights[0][0])  # JIT warm-up (numba)

    start = time.perf_counter()
    bits = 0.0
    for name, w in weights:
        r = quantize_matrix(w, config.floor_strict, config, name)
        bits += r.layout.total_bytes * 8
    xfp_s = time.perf_counter() - start

    start = time.perf_counter()
    for _, w in weights:
        rtn_asymmetric(w, 4, 128)
    rtn_s = time.perf_counter() - start

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"weights: {len(weights)} linear matrices of SmolLM2-135M-Instruct, {total / 1e6:.1f} M weights")
    print(f"{'method':44s} {'seconds':>8s} {'M weights/s':>12s}")
    print(f"{'XFP auto-select (2/3/4 bits, floor 0.99 p1)':44s} {xfp_s:8.2f} {total / xfp_s / 1e6:12.2f}")
    print(f"{'RTN asymmetric g128 4-bit':44s} {rtn_s:8.2f} {total / rtn_s / 1e6:12.2f}")
    print(f"XFP / RTN speed ratio: {rtn_s / xfp_s:.3f}   (XFP chose {bits / total:.3f} honest bits/weight)")


if __name__ == "__main__":
    main()
