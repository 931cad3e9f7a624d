"""XFP fused CPU kernels against dense torch matmuls, measured side by side in one run.

Tables (every ratio compares timings taken in the same run, interleaved call by call):
- memory read bandwidth of this machine (torch sum over buffers from 16 MiB to 1 GiB);
- GEMV (batch 1, decode) on Llama-7B-like shapes at 2/3/4 bits, for both modes (V2: per-row codebooks;
  V2a, the default: groups of 64 with coded scales and offsets, one shared codebook, kept columns):
  XFP `cpu` kernel vs torch float32 and bfloat16 `F.linear` of the same shape, with the XFP kernel's
  effective GB/s (stored bytes / time) against the measured read bandwidth, and whether each matrix fits
  in L3;
- prefill (batch 16..512): XFP decoded tiles + BLAS vs torch float32, both modes;
- the build route: the same 4-bit GEMV as a numba kernel vs the C++ kernels (AVX-512, AVX2, portable).

Usage:
  python benchmarks/gemv.py                                 # print the tables
  python benchmarks/gemv.py --markdown docs/PERFORMANCE.md  # also run benchmarks/decode_speed.py (both models) and write
                                                            # the whole document (machine, tables, notes)
Options: --threads 1 2 (thread counts to measure), --reps N, --quick (one shape, fewer repetitions),
--modes v2 v2a (which modes to measure; both by default).
Matrices are random (uniform indices, sorted Gaussian codebooks, 0.5% outliers; V2a: G = 64, L = 1, the
writer's scale and offset tables, 8 kept columns per matrix): speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xfp.format.pack import pack
from xfp.format.reference import Packed, PackedV2, PackedV2a
from xfp.runtime import dispatch
from xfp.runtime.kernels import cpu

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (rows = out, cols = in): q/o, gate/up, down of Llama-7B
WIDTHS = [2, 3, 4]
OUTLIER_FRACTION = 0.005
PREFILL_BATCHES = [16, 128, 512]
MODES = ["v2", "v2a"]
V2A_GROUP, V2A_KEPT = 64, 8
MIB = 1 << 20


# -- machine --------------------------------------------------------------------------------------


def lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def cache_bytes(text: str | None) -> int | None:
    """'300 MiB (1 instance)' -> bytes."""
    m = re.match(r"([\d.]+)\s*([KMG])i?B", text or "")
    return int(float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]) if m else None


def machine() -> dict:
    info = lscpu()
    flags = set(info.get("Flags", "").split())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return {
        "cpu": info.get("Model name", platform.processor() or platform.machine())
        + (f" (family {info['CPU family']}, model {info['Model']})" if "CPU family" in info and "Model" in info else ""),
        "blas": "MKL" if torch.backends.mkl.is_available() else "no MKL",
        "cores": os.cpu_count(),
        "l2": info.get("L2 cache", "?"),
        "l3": info.get("L3 cache", "?"),
        "l3_bytes": cache_bytes(info.get("L3 cache")),
        "simd": ", ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                      "avx512_bf16", "amx_tile") if f in flags),
        "memory_gib": mem / (1 << 30),
        "hypervisor": info.get("Hypervisor vendor", "none"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel_isa": cpu.isa(),
        "load": os.getloadavg(),
    }


# -- timing ---------------------------------------------------------------------------------------


def side_by_side(fns: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    """Best seconds of each callable over `reps` calls, interleaved so that all see the same machine.

    Best, not median: on a shared machine other work only ever adds time, and the best of interleaved
    calls is what stays reproducible when a neighbour takes a core (medians are printed with --median)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    pick = statistics.median if os.environ.get("XFP_BENCH_MEDIAN") else min
    return {name: pick(t) for name, t in times.items()}


def read_bandwidth(threads: list[int], reps: int) -> list[dict]:
    """GB/s of torch.sum over float32 buffers of several sizes (a read-only stream)."""
    rows = []
    for size in (16 * MIB, 64 * MIB, 256 * MIB, 1024 * MIB):
        buf = torch.ones(size // 4)
        row = {"bytes": size}
        for t in threads:
            torch.set_num_threads(t)
            s = side_by_side({"sum": lambda: buf.sum()}, max(3, reps // 2))["sum"]
            row[t] = size / s / 1e9
        rows.append(row)
        del buf
    return rows


# -- matrices -------------------------------------------------------------------------------------


def random_packed(rows: int, cols: int, bits: int, seed: int = 0) -> PackedV2:
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    codebook = (0.02 * torch.randn(rows, 1 << bits, generator=g)).sort(dim=1).values.half()
    n = int(rows * cols * OUTLIER_FRACTION)
    pos = torch.randperm(rows * cols, generator=g)[:n].sort().values.to(torch.int32)
    val = (0.1 * torch.randn(n, generator=g)).half()
    return PackedV2(rows, cols, bits, pack(indices, bits), codebook, pos, val)


def random_v2a(rows: int, cols: int, bits: int, seed: int = 0) -> PackedV2a:
    """A V2a matrix shaped like the writer's: G = 64, one codebook, geometric scale table, uniform offsets,
    0.5% outliers, V2A_KEPT kept columns."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // V2A_GROUP)
    indices = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    library = torch.randn(1, 1 << bits, generator=g).sort(dim=1).values.half()
    scale_table = torch.cat([torch.zeros(1), 0.02 * 2.0 ** (-16 * (255 - torch.arange(1, 256)) / 254)]).half()
    offset_table = ((torch.arange(256) - 128) * 0.005 / 127).half()
    scale = torch.randint(180, 256, (rows, groups), generator=g, dtype=torch.uint8)
    offset = torch.randint(100, 156, (rows, groups), generator=g, dtype=torch.uint8)
    kept = torch.randperm(cols, generator=g)[:V2A_KEPT].sort().values
    free = torch.ones(cols, dtype=torch.bool)
    free[kept] = False
    n = int(rows * cols * OUTLIER_FRACTION)
    pos = torch.randperm(rows * cols, generator=g)[: int(n * 1.01) + 8]
    pos = pos[free[pos % cols]][:n].sort().values.to(torch.int32)
    val = (0.1 * torch.randn(pos.numel(), generator=g)).half()
    kept_val = torch.randint(-127, 128, (rows, kept.numel()), generator=g, dtype=torch.int8)
    kept_scale = torch.full((kept.numel(),), 0.001).half()
    return PackedV2a(rows, cols, bits, V2A_GROUP, pack(indices, bits), library, scale, scale_table, offset,
                     offset_table, torch.zeros(rows, 0, dtype=torch.uint8), pos, val, kept.to(torch.int32), kept_val,
                     kept_scale)


def make_packed(mode: str, rows: int, cols: int, bits: int, seed: int = 0) -> Packed:
    return random_v2a(rows, cols, bits, seed) if mode == "v2a" else random_packed(rows, cols, bits, seed)


def stored_bytes(p: Packed) -> int:
    return p.layout.total_bytes


# -- benchmarks -----------------------------------------------------------------------------------


def gemv_table(shapes, widths, threads: list[int], reps: int, bandwidth: dict[int, float], l3: int | None,
               modes: list[str]) -> list[dict]:
    rows = []
    for r, c in shapes:
        w32 = torch.randn(r, c) * 0.02
        w16 = w32.bfloat16()
        x32 = torch.randn(1, c)
        x16 = x32.bfloat16()
        for mode, bits in [(mode, bits) for mode in modes for bits in widths]:
            packed = make_packed(mode, r, c, bits, seed=bits)
            state = cpu.prepare_any(packed)
            for t in threads:
                torch.set_num_threads(t)
                isa = cpu.isa()
                m = side_by_side({
                    "xfp": lambda: cpu.gemv(x32, packed, state, isa),
                    "fp32": lambda: F.linear(x32, w32),
                    "bf16": lambda: F.linear(x16, w16),
                }, reps)
                nbytes = stored_bytes(packed)
                rows.append({"shape": (r, c), "mode": mode, "bits": bits, "threads": t, "xfp_ms": m["xfp"] * 1e3,
                             "fp32_ms": m["fp32"] * 1e3, "bf16_ms": m["bf16"] * 1e3,
                             "vs_fp32": m["fp32"] / m["xfp"], "vs_bf16": m["bf16"] / m["xfp"],
                             "xfp_mib": nbytes / MIB, "gbs": nbytes / m["xfp"] / 1e9,
                             "of_bw": nbytes / m["xfp"] / 1e9 / bandwidth[t],
                             "fp32_gbs": r * c * 4 / m["fp32"] / 1e9,
                             "fits_l3": "" if l3 is None else "/".join(
                                 "yes" if b <= l3 else "no" for b in (nbytes, r * c * 2, r * c * 4))})
                print(f"gemv {r}x{c} {mode} {bits}b {t}t: xfp {m['xfp']*1e3:.2f} ms, fp32 {m['fp32']*1e3:.2f} ms, "
                      f"bf16 {m['bf16']*1e3:.2f} ms -> {m['fp32']/m['xfp']:.2f}x fp32, "
                      f"{m['bf16']/m['xfp']:.2f}x bf16, {nbytes / m['xfp'] / 1e9:.1f} GB/s", flush=True)
        del w32, w16
    return rows


def prefill_table(shapes, batches, threads: list[int], reps: int, modes: list[str]) -> list[dict]:
    rows = []
    for (r, c), mode in [(shape, mode) for shape in shapes for mode in modes]:
        w32 = torch.randn(r, c) * 0.02
        packed = make_packed(mode, r, c, 4, seed=4)
        state = cpu.prepare_any(packed)
        for m in batches:
            x = torch.randn(m, c)
            for t in threads:
                torch.set_num_threads(t)
                isa = cpu.isa()
                res = side_by_side({
                    "xfp": lambda: cpu.linear(x, packed, None, state),
                    "fp32": lambda: F.linear(x, w32),
                    "ref": lambda: dispatch.reference_linear(x, packed, None),
                }, max(3, reps // 4), warmup=1)
                rows.append({"shape": (r, c), "mode": mode, "m": m, "threads": t, "xfp_ms": res["xfp"] * 1e3,
                             "fp32_ms": res["fp32"] * 1e3, "ref_ms": res["ref"] * 1e3,
                             "vs_fp32": res["fp32"] / res["xfp"], "vs_ref": res["ref"] / res["xfp"]})
                print(f"prefill {r}x{c} {mode} 4b m={m} {t}t: xfp {res['xfp']*1e3:.1f} ms, fp32 {res['fp32']*1e3:.1f} ms, "
                      f"reference {res['ref']*1e3:.1f} ms", flush=True)
    return rows


def route_table(threads: list[int], reps: int) -> list[dict]:
    """The build-route decision: a numba 4-bit GEMV (LUT + FMA, prange over rows) vs the C++ kernels."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def numba_gemv4(codes, cb, x, y):  # pragma: no cover - benchmark only
        for r in numba.prange(codes.shape[0]):
            lut = cb[r]
            row = codes[r]
            acc = np.float32(0.0)
            for i in range(codes.shape[1]):
                b = row[i]
                acc += lut[b & 15] * x[2 * i] + lut[b >> 4] * x[2 * i + 1]
            y[r] = acc

    r, c = 11008, 4096
    packed = random_packed(r, c, 4, seed=4)
    state = cpu.prepare(packed)
    codes, cb = packed.codes.numpy(), packed.codebook.float().numpy()
    x = torch.randn(1, c)
    xn, y = x[0].numpy(), np.zeros(r, np.float32)
    start = time.perf_counter()
    numba_gemv4(codes, cb, xn, y)
    compile_s = time.perf_counter() - start
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        numba.set_num_threads(t)
        fns = {"numba": lambda: numba_gemv4(codes, cb, xn, y)}
        for isa in cpu.supported_isas():
            fns[f"c++ {isa}"] = (lambda isa=isa: cpu.gemv(x, packed, state, isa))
        m = side_by_side(fns, max(3, reps // 2), warmup=1)
        rows.append({"threads": t, "numba_compile_s": compile_s, **{k: v * 1e3 for k, v in m.items()}})
        print(f"route 11008x4096 4b {t}t: " + ", ".join(f"{k} {v*1e3:.2f} ms" for k, v in m.items()), flush=True)
    return rows


NOTES = """## How the kernel works, and why this route

- **Route: C++ compiled at first use, loaded with ctypes** (`src/xfp/runtime/kernels/`). One translation unit
  per instruction set (portable C++, AVX2+FMA+F16C, AVX-512 F/BW/VL/DQ) built with its own `-m` flags, so one
  library serves every x86-64 CPU and the choice is made at run time (`XFP_CPU_ISA` forces one; tests run
  every one the CPU has). Rows are split over torch's own OpenMP pool through `at::parallel_for`, the only
  torch header the kernels use, so `torch.set_num_threads` applies and no second thread pool competes for
  the cores. Two more units are the paths of a decode step's XFPLinear calls once the module's kernel
  state is armed (see 'What limits speed'): `ops.cpp` registers the fused GEMV as the torch operator
  `xfp::fused_linear` (compiled graphs), and `python.cpp` is its eager shortcut, a CPython function. The
  build needs only the machine's `c++` and torch's headers and libraries (no ninja): ~25-30 seconds on 2
  cores, once, cached under `$XFP_CACHE/kernels/` by a hash of sources, flags, compiler, torch and Python.
- **Why not numba** (already a dependency): see the route table. The straightforward numba LUT kernel
  cannot express the in-register table lookup (`vpermps`/`vpermt2ps` on a row's codebook held in one or
  two registers) nor the `vpshufb`/`vpsrlvd` unpacking of 3/5/6-bit fields, so LLVM emits scalar lookups or
  gathers; on top of that numba runs its own thread pool next to torch's.
- **GEMV (batch <= 8)**: per output row, the row's float16 codebook is converted once into float32
  registers; 16 packed indices become 16 weights by one permute (2-6 bits) or a gather (8 bits) and meet x
  in one FMA. 4- and 2-bit rows are read 16 bytes at a time (`vpmovzxbd` + shifts: 32/64 weights) against
  an x permuted to match once per call. Outliers add `(value - codebook[idx]) * x[col]` per row, the
  corrections being computed once per matrix and cached on the module. W_hat is never materialised.
- **V2a GEMV** (the default mode): x is zeroed on the kept columns once per call. With AVX-512 at 2-6
  bits, per row and group the group's library codebook (held in registers for the whole matrix when
  L = 1, reloaded per group when L > 1) is turned into the group's weights by one FMA per register,
  `float32(e*s + o)` (`e*s` is exact in float32), and the indices meet x through that table as in V2, into
  two alternating sets of accumulators: no per-group partial sums, no offset sums. Elsewhere (AVX2,
  scalar, 8 bits) x is also summed per group once per call, the partial dot product of each group is
  multiplied by its scale (`scale_table[code]`) and `sum_g offset_table[code_g] * xsum_g` adds the
  offsets. Either way a weight enters as its unrounded `e*s + o` (the format's W_hat rounds it to float16;
  the bound below covers that). Outliers add `(value - (e*s + o)) * x[col]`, kept columns
  `kept[r, j] * x[col_j]` (values prepared once per matrix, float32; x gathered at those columns once per
  call, so each row's kept part is a dense dot product). G must be a multiple of the ISA's chunk
  (16..64 columns; the writer's 64, 128 and 256 are); other group sizes take the portable kernel.
- **Prefill (batch > 8)**: blocks of rows are decoded exactly into a float32 tile and multiplied by
  `torch.mm`. The tile is 1 MiB (in L2) on one thread below 32 rows of x, where decoding bounds the time;
  8 MiB otherwise. With 1 MiB tiles at two threads, BLAS computed each small product on one thread: in a
  scratch A/B of 4096x4096 V2a at m = 16, two threads took 6.2 ms with 1 MiB tiles and 4.2 ms with 8 MiB
  (fp32 4.5 ms). At one thread 1 MiB stays the faster below m = 32 (6.5 against 7.5 ms), and from 32 rows
  on 8 MiB wins (9.5 against 10.9 ms at m = 32).
- **Dense float16 matrices** (the embedding an XFP folder keeps unquantized, and a tied lm_head reading it;
  `xfp.runtime.half`): they stay float16 in memory instead of being widened to the model's float32, and the
  lm_head's GEMV converts 16 weights per `vcvtph2ps` in registers and meets x in one FMA, four rows at a
  time, prefetching the rows 8 further on (a scratch A/B on the Intel machine, 49152x576 after a 256 MB
  write, not kept: one core read 9.8 GB/s without it, 15.5 GB/s with it); the sums are float32, so only
  the order of the additions differs from `F.linear` on the widened weight (bound `(cols + 16) * 2^-24 * sum_c |x_c| |w_c|`, tests/runtime/test_half.py).
- **Numerics**: float32 products and sums. Bound tested (tests/runtime/test_kernels.py) for every width,
  instruction set and odd shape: `|y - x @ W_hat.T| <= (cols + 2*outliers_in_row + 16) * 2^-24 *
  sum_c |x_c| (|W_hat[r,c]| + |codebook[r, idx(r,c)]|)`; V2a (tests/runtime/test_kernels_v2a.py):
  `|y - x @ W_hat.T| <= 2^-11 * (sum_c |x_c| |W_hat[r,c]| + 2^-14 sum_c |x_c|) + (cols + groups + 2*outliers + kept + 16)
  * 2^-24 * sum_c |x_c| (|e s| + |o| + |W_hat[r,c]|)`, the first term being float16's rounding of each weight.
  Decoded tiles are bit-exact (V2a: `float16(float32(e*s + o))` by the F16C conversion, then outliers and kept
  columns). bf16/fp16 inputs are
  computed in float32 and rounded once. Each row is computed by one thread in a fixed order: results are
  bit-identical across thread counts (GEMV).

## What limits speed

- GEMV is compute-bound here, not memory-bound: on a quiet machine XFP reads its bytes at well under the
  measured read bandwidth at 1 thread, and the second thread nearly halves the time. Every 16 weights cost
  a permute (the lookup) and an FMA, plus the index unpacking. With AVX-512 on Intel cores all of them run
  on the two vector ports 0 and 5 (the permutes and `vpmovzxbd` on port 5 alone); AMD's Zen 4 runs each
  512-bit operation as two 256-bit halves, so neither CPU gets more than about two such instructions per
  cycle. The machine line above says which CPU this run had. Fewer instructions per weight
  would need integer arithmetic (int8 activations and codebooks, `vpshufb` lookups, VNNI dot products, as
  llama.cpp does), which changes the numerics: not done. On AVX2-only CPUs (two permutes + a blend per 8
  weights at 4 bits, gathers at 5-8 bits) the kernels are further from memory speed still.
- In a decode step the picture changes: a model's matrices together (53 MB of codes for SmolLM2) outgrow
  what the cache keeps between steps, so every row comes from memory, and one core computing a row is
  faster than the hardware prefetchers fetching the next. The GEMV row loops therefore prefetch the row
  2 KB of codes ahead (with its scales, offsets and kept values), for rows of up to 2 KB (wider rows, as
  4096x11008's 5.5 KB, ran 10-45% slower prefetched whole and are left to the hardware, which follows a
  long run within a row well; 11008x4096's 2 KB rows gained 10-25%). Scratch A/B on the Intel machine, the
  210 decoder matrices of SmolLM2's default folder called in model order through the C entry points:
  9.1 ms without, 6.5 ms with at one thread (the same 60 matrices of one shape, 27 MB, ran at the
  in-cache rate either way); at two threads 3.6-3.8 ms either way. In the step table below, SmolLM2's
  'decoder matrices' at one thread took 14.9 ms in the previous run on this machine, before the prefetch.
  Kept columns (V2a: ~6 per row on SmolLM2, ~11 on Gemma) enter the AVX-512 kernel as one masked dense
  vector product per row with x gathered at them once per call, no longer one indirect load per value.
- Whether memory bandwidth grows with the second thread depends on the VM (the bandwidth table above says
  it for this run; on an earlier Intel VM it did not). When other work occupies a core, an OpenMP region
  waits for a time slice: with a load average above
  ~2 the 2-thread rows measure the scheduler, not the kernel (torch's own 2-thread rows suffer alike). The
  prefill path opens two parallel regions per tile (decode, then BLAS), so it suffers most.
- End to end, for a 135M model the matrices are small (576 wide: 2-5 groups per row in V2a) and the
  table "Where a decode step's time goes" splits a step. Everything that is not a matrix (attention, norms,
  rotary, residuals, the KV cache, `generate`'s own Python: `rest`) costs the XFP model what it costs the
  float32 source, and it does not shrink with a second thread; with the default folder the dense lm_head
  (the tied embedding as stored, float16: 49152x576, 57 MB per token; 113 MB for the float32 source) is
  added to it. `fp32 step / (rest + lm_head)` is the most any kernel can reach. XFP+emb
  (`--quantize-embeddings`) takes the lm_head through the fused XFP kernel (15 MB; compare the lm_head
  column of its rows with the default folder's), which is what separates the two XFP columns on SmolLM2; at
  two threads the single-threaded `rest` weighs more. Gemma-3-270M's tied embedding (262144x640, 335 MB in
  float16, 671 MB in float32) is most of its step in the default folder, so there XFP+emb is the one that
  can reach 2x. At two threads the matrices' time halves but `rest` does not, which caps the ratio at
  `fp32 step / (rest + lm_head + the matrices' bare C time)` even with no Python between kernels (the 210
  SmolLM2 matrices take ~3.6 ms at two threads called straight through the C entry points): 2.1x in one run
  on this machine, 2.4x in another, `rest` being what varies most between runs. Beyond that, two threads
  need a faster `rest`, not faster matrices. The compiled rows are that (`xfp generate --compile`:
  `compile_decode_steps`): inductor fuses the model's own per-step ops, so `rest` shrinks on both sides
  (the 'compiled fp32 vs eager fp32' column), and each XFP module is one operator call
  (`xfp.runtime.opaque`). Guards on the model's modules are kept whole (skipping them,
  `skip_guard_on_all_nn_modules_unsafe`, let a compiled step serve another model of the same class, which
  a benchmark crash showed; tests/runtime/test_opaque.py checks that each module gets its own call), except
  those on the XFP stored tensors, which the operator checks itself (below). A joint kernel call for the
  matrices that read one input
  (q/k/v, gate/up) was tried twice and dropped: in scratch A/Bs (not kept) it saved 2-6% of those
  matrices' time, about 1% of a step, at one or two threads; the joint call's own bookkeeping (checking
  every member's stored tensors, keeping the others' outputs for their call) costs about what the saved
  calls did. Per XFPLinear call the runtime costs ~9 us of Python beyond
  the kernel when one matrix is called in a tight loop: ~7 us for the module call and the cached fast
  path's checks (the kernel and instruction-set overrides, ~1.8 us of it through `os.environ.get`, ~0.2 us
  since `dispatch.environment_reader` reads `os.environ`'s own dict; every stored tensor's identity and
  in-place version), ~1.3 us for the output's `torch.empty`, ~1.1 us for the ctypes call. Swapping
  those checks out of a whole decode (scratch A/B, not kept) changed tokens/s by less than the spread
  between two loads of the same model (about 9%). Over the 210 matrices of a SmolLM2 step, calling the
  modules took 2.5-3.7 ms more than calling the C entry points directly with preallocated outputs
  (scratch measurement on the Intel machine, one thread): the Python of the different modules does not
  stay in cache between kernels. Hence `xfp::fused_linear` (`csrc/ops.cpp`): once the Python path has
  prepared a module's kernel state, it *arms* the module's handle in C++ (a copy of the matrix's C view,
  references to the state's tensors and to the stored tensors, their in-place versions, the overrides),
  and from then on `XFPLinear.forward` passes float32 inputs of up to 8 rows straight to the operator with
  the module's stored tensors. The operator checks in C++ what the fast path checked in Python (the same
  tensor objects at the same versions, the same `XFP_KERNEL` and `XFP_CPU_ISA`, a float32 bias) and calls
  the module's Python forward on any difference, so it computes the same bits
  (tests/runtime/test_fused_operator.py, which fails if the version check is removed). Scratch A/B (two
  loads of the default folder in one process, one with the operator switched off, runs interleaved, each
  order tried): +7 to +13% tokens/s eager at one thread, +4 to +10% at two; compiled, +4 to +8% at two
  threads. A compiled step passes the operator ~2700 stored tensors, each of which would get a guard
  checked before every step; `compile_decode_steps` drops those guards (`without_stored_tensor_guards`),
  since the operator checks the tensors itself. Called from Python, though, the operator still cost ~5 us
  a call before the kernel (parsing its arguments against the schema, boxing a V2a matrix's 13 stored
  tensors into a list, the dispatcher), against ~1 us for a CPython function making the same checks on the
  module's buffer dict (scratch measurement with empty kernels). So eager calls now take
  `cpu.fast_linear` (`csrc/python.cpp`, the same checks through `csrc/armed.h`), which declines (None) for
  tensor subclasses, wrapped inputs and active torch function or dispatch modes, leaving those to the
  operator. Scratch A/Bs (one model in one process, the shortcut switched on and off between generate
  calls, interleaved pairs): at two threads +5% and +4.4% (medians of 8 and 14 pairs); at one thread +5.9%
  (14 pairs), while in an 8-pair run the machine's drift (pairs from -36% to +56%) hid the effect.
- The decode loop asks for exactly N tokens with a one-line logits processor that forbids end-of-sequence;
  transformers' `min_new_tokens` does the same by building and searching a vocabulary-sized mask every
  step, about 1 ms per step on SmolLM2's 49k vocabulary (torch.profiler, scratch run) for every model
  alike, which only shrinks the ratios.
"""


# -- report ---------------------------------------------------------------------------------------


def build_seconds() -> float:
    """Seconds to compile the kernels from scratch (into a throwaway cache)."""
    import tempfile

    from xfp.runtime.kernels import build

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, XFP_CACHE=tmp)
        code = "import time,torch;from xfp.runtime.kernels import build as b;s=time.perf_counter();b.library_path();" \
               "print(time.perf_counter()-s)"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"kernel build failed: {out.stderr.strip()[-300:]}")
    del build
    return float(out.stdout.strip().splitlines()[-1])


def earlier_runs(doc: Path) -> list[str]:
    """Markdown lines listing the archived runs on other machines (`<doc's folder>/performance/*.md`, each
    linked with its title), or none."""
    runs = sorted((doc.parent / "performance").glob("*.md"))
    if not runs:
        return []
    lines = ["## Earlier runs on other machines", "",
             "The same command run on the CPUs this project was measured on before, kept as they were written:", ""]
    for run in runs:
        title = run.read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"- [{title}](performance/{run.name})")
    return lines + [""]


def markdown(info: dict, bw: list[dict], gemv: list[dict], prefill: list[dict], route: list[dict],
             threads: list[int], build_s: float, earlier: list[str]) -> str:
    from decode_speed import DOC_PLACEHOLDER  # same folder

    lines = ["# XFP performance (CPU)", "",
             "Generated by `python benchmarks/gemv.py --markdown docs/PERFORMANCE.md` (which also runs "
             "`benchmarks/decode_speed.py`). Every ratio compares timings taken in the same run, calls "
             "interleaved; kernel numbers are the best of N interleaved calls (other work on a shared machine only adds "
             "time; `--median` reports medians instead); decode numbers are medians, and decode ratios medians "
             "of per-repetition ratios (see that section).", "",
             "## Machine", "",
             f"- CPU: {info['cpu']}, {info['cores']} cores visible ({info['hypervisor']} guest), "
             f"{info['memory_gib']:.0f} GiB memory",
             f"- caches: L2 {info['l2']}, L3 {info['l3']} (as lscpu reports them: a VM sees the host's "
             "shared L3, not a share of it)",
             f"- SIMD: {info['simd']}; XFP kernel instruction set in use: `{info['kernel_isa']}`",
             f"- torch {info['torch']} ({info['blas']}), Python {info['python']}; threads measured: {threads}",
             f"- load average at the start of the run: {info['load'][0]:.2f} (anything above 0 is other work "
             "sharing the 2 cores; see 'What limits speed')",
             f"- kernel build from scratch (first use, then cached): {build_s:.1f} s", "",
             *earlier,
             "## Memory read bandwidth (torch.sum over float32)", "",
             "| buffer | " + " | ".join(f"{t} thread{'s' * (t > 1)} GB/s" for t in threads) + " |",
             "|---|" + "---:|" * len(threads)]
    for row in bw:
        lines.append(f"| {row['bytes'] // MIB} MiB | " + " | ".join(f"{row[t]:.1f}" for t in threads) + " |")
    lines += ["", "## GEMV (batch 1): XFP `cpu` kernel vs dense torch", "",
              "XFP bytes = every stored byte (codes, codebooks, 0.5% outliers, meta; V2a also scale and offset codes, "
              "tables and 8 kept int8 columns). GB/s = XFP bytes / time; "
              "'of bw' = that against the 1 GiB read bandwidth at the same thread count. 'fits L3' = XFP / "
              "bf16 / fp32 matrix against the L3 size lscpu reports.", "",
              "| shape (out x in) | mode | bits | threads | XFP ms | fp32 ms | bf16 ms | XFP vs fp32 | XFP vs bf16 | "
              "XFP MiB | XFP GB/s | of bw | fp32 GB/s | fits L3 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for g in gemv:
        lines.append(f"| {g['shape'][0]}x{g['shape'][1]} | {g['mode']} | {g['bits']} | {g['threads']} | {g['xfp_ms']:.2f} | "
                     f"{g['fp32_ms']:.2f} | {g['bf16_ms']:.2f} | **{g['vs_fp32']:.1f}x** | {g['vs_bf16']:.1f}x | "
                     f"{g['xfp_mib']:.1f} | {g['gbs']:.1f} | {100 * g['of_bw']:.0f}% | {g['fp32_gbs']:.1f} | "
                     f"{g['fits_l3']} |")
    lines += ["", "## Prefill (batch m): decoded tiles + BLAS vs torch float32 and the reference kernel", "",
              "4-bit. 'reference' = decode the whole matrix, then F.linear (the exact oracle, no fused kernel).", "",
              "| shape | mode | m | threads | XFP ms | fp32 ms | reference ms | XFP vs fp32 | XFP vs reference |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in prefill:
        lines.append(f"| {p['shape'][0]}x{p['shape'][1]} | {p['mode']} | {p['m']} | {p['threads']} | {p['xfp_ms']:.1f} | "
                     f"{p['fp32_ms']:.1f} | {p['ref_ms']:.1f} | {p['vs_fp32']:.2f}x | {p['vs_ref']:.1f}x |")
    if route:
        names = [k for k in route[0] if k not in ("threads", "numba_compile_s")]
        lines += ["", "## Build route: numba vs C++ (4-bit GEMV, 11008x4096)", "",
                  f"numba: the straightforward LUT kernel (`prange` over rows, fastmath), "
                  f"{route[0]['numba_compile_s']:.1f} s to JIT-compile; C++: this package's kernels.", "",
                  "| threads | " + " | ".join(f"{n} ms" for n in names) + " |",
                  "|---:|" + "---:|" * len(names)]
        for r in route:
            lines.append(f"| {r['threads']} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
    lines += ["", DOC_PLACEHOLDER, "", NOTES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="one shape, fewer repetitions")
    ap.add_argument("--markdown", type=Path, help="write the whole performance document here")
    ap.add_argument("--no-route", action="store_true", help="skip the numba vs C++ comparison")
    ap.add_argument("--median", action="store_true", help="report medians instead of best-of-N times")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="storage modes to measure")
    args = ap.parse_args(argv)
    if args.median:
        os.environ["XFP_BENCH_MEDIAN"] = "1"
    shapes = SHAPES[1:2] if args.quick else SHAPES
    reps = 7 if args.quick else args.reps

    cpu.library()  # build (or load) the kernels before anything is timed
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, L3 {info['l3']}, SIMD {info['simd']}, "
          f"kernel {info['kernel_isa']}, load {info['load'][0]:.2f}")
    bw = read_bandwidth(args.threads, reps)
    for row in bw:
        print(f"read bandwidth {row['bytes'] // MIB} MiB: " + ", ".join(f"{t}t {row[t]:.1f} GB/s" for t in args.threads))
    big = {t: bw[-1][t] for t in args.threads}
    gemv = gemv_table(shapes, WIDTHS, args.threads, reps, big, info["l3_bytes"], args.modes)
    prefill = prefill_table(shapes[:1] if args.quick else SHAPES[:2], PREFILL_BATCHES, args.threads, reps, args.modes)
    route = [] if args.no_route else route_table(args.threads, reps)
    if args.markdown:
        sys.path.insert(0, str(Path(__file__).parent))
        import decode_speed

        build_s = build_seconds()
        doc = markdown(info, bw, gemv, prefill, route, args.threads, build_s, earlier_runs(args.markdown))
        decode = decode_speed.main(["--models", *decode_speed.MODELS, "--threads", *map(str, args.threads)]
                                   + (["--quick"] if args.quick else []),
                                   as_markdown=True)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()
        doc = doc.replace(decode_speed.DOC_PLACEHOLDER, decode)
        doc += (f"\n\nLoad average at the end of the run (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
                f"on {os.cpu_count()} cores. The run itself keeps up to {max(args.threads)} cores busy, so a load up to "
                f"that is its own; above it, other work shared the machine (compare the load at the start).")
        args.markdown.write_text(doc + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
