// Shared declarations of the fused V2 CPU kernels (docs/FORMAT.md, docs/PERFORMANCE.md).
//
// Each instruction set (scalar, AVX2, AVX-512) is one translation unit compiled with its own -m flags;
// api.cpp picks one at run time and splits rows over torch's threads. A kernel never materialises W_hat:
// per row it turns the packed indices into float32 weights in registers (codebook lookups by
// permute/gather) and multiplies them into x, then adds the row's outlier corrections.
#pragma once

#include <algorithm>
#include <cstdint>

namespace xfp {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// One stored V2 matrix (docs/FORMAT.md) plus its outliers in CSR form, prepared once per matrix.
struct V2Matrix {
  const uint8_t* codes;      // [rows, row_bytes] packed b-bit indices, each row LSB-first from a byte boundary
  const uint16_t* codebook;  // [rows, 1 << bits] float16 bit patterns
  const int32_t* ol_rowptr;  // [rows + 1] outliers of row r are [ol_rowptr[r], ol_rowptr[r + 1])
  const int32_t* ol_col;     // [n] their columns
  const float* ol_delta;     // [n] outlier value - codebook[r, index(r, col)]  (added to fused products)
  const float* ol_val;       // [n] outlier value as float32                     (written into decoded rows)
  int64_t row_bytes;         // ceil(cols * bits / 8)
  int32_t rows, cols, bits;
};

constexpr int kMaxM = 4;  // activation rows one pass over the codes serves
constexpr int64_t kHalfAhead = 8;  // rows a dense float16 product prefetches ahead of the ones it computes

// Activations laid out for one ISA and width. `xs` [m, xs_stride] is x zero-padded and, inside blocks of
// `phases * lanes` columns, permuted phase-major: xs[blk*P*L + s*L + k] = x[blk*P*L + k*P + s]. That is the
// order in which the inner loop produces weights when one byte holds P = 8 / bits indices (P = 1 otherwise).
struct Activations {
  const float* xs;
  int64_t xs_stride;
  const float* x;  // [m, ldx] the natural layout (outlier columns index into it)
  int64_t ldx;
  int m;           // 1..kMaxM
};

// y[i * ldy + r] = sum_c W_hat[r, c] * x[i, c], for i < act.m and r in [r0, r1).
using GemvRowsFn = void (*)(const V2Matrix& w, const Activations& act, float* y, int64_t ldy, int64_t r0,
                            int64_t r1);
// out[(r - r0) * ldo + c] = W_hat[r, c] as float32 (exact), for r in [r0, r1).
using DecodeRowsFn = void (*)(const V2Matrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1);

// One stored V2a matrix (docs/FORMAT.md, section 3), prepared once per matrix by cpu.py.
//
// The fused product never rounds a weight to float16: for every group it computes either
// s * sum_c e[c] * x[c] + o * sum_c x[c] (x times the exact real values e*s + o), or, where the group's
// codebook sits in registers (AVX-512, 2..6 bits), sum_c float32(e[c]*s + o) * x[c]; the format's W_hat
// rounds those values to float16. x is zeroed on the kept columns; then per row the outlier corrections
// (value - (e*s + o), prepared in float64, rounded once) and the kept columns' products. Decoded rows are
// exact: float16(float32(e*s + o)), then outliers, then kept columns.
struct V2aMatrix {
  const uint8_t* codes;        // [rows, row_bytes] packed b-bit indices, as V2
  const uint16_t* library;     // [lib, 1 << bits] float16 bit patterns
  const uint8_t* scale;        // [rows, groups] codes into scale_table
  const uint8_t* offset;       // [rows, groups] codes into offset_table
  const uint8_t* ids;          // [rows, groups] library ids, or null when lib == 1
  const float* scale_table;    // [256] float32 (exact copies of the float16 table)
  const float* offset_table;   // [256]
  const int32_t* ol_rowptr;    // [rows + 1] outliers of row r are [ol_rowptr[r], ol_rowptr[r + 1])
  const int32_t* ol_col;       // [n]
  const float* ol_delta;       // [n] outlier value - (e*s + o) at its position (added to fused products)
  const float* ol_val;         // [n] outlier value (written into decoded rows)
  const int32_t* kept_cols;    // [kept] strictly increasing
  const float* kept_w;         // [rows, kept] decoded kept values float16(q * scale), as float32
  int64_t row_bytes;           // ceil(cols * bits / 8)
  int32_t rows, cols, bits, group, lib, groups, kept;
};

// Activations of a V2a product: `xs` as for V2 (the ISA's layout) with the kept columns zeroed, plus the
// sums of x over every group's columns (kept columns excluded), for the offsets.
struct V2aActivations {
  const float* xs;
  int64_t xs_stride;
  const float* xsum;   // [m, xsum_stride] xsum[i * xsum_stride + g]
  int64_t xsum_stride;
  const float* x;      // [m, ldx] natural layout
  int64_t ldx;
  const float* xkept;  // [m, xkept_stride] x at the kept columns, in kept_cols order, zero-padded to whole vectors
  int64_t xkept_stride;
  int m;               // 1..kMaxM
};

constexpr int64_t kKeptPad = 16;  // xkept_stride is a multiple of it (a vector kernel reads whole vectors)

using V2aGemvRowsFn = void (*)(const V2aMatrix& w, const V2aActivations& act, float* y, int64_t ldy, int64_t r0,
                               int64_t r1);
using V2aDecodeRowsFn = void (*)(const V2aMatrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1);

// A dense float16 matrix (a tied embedding kept at its stored precision): y[i * ldy + r] =
// sum_c float(w[r * cols + c]) * x[i * ldx + c] for i < m (1..kMaxM) and r in [r0, r1), float32 FMAs.
using HalfGemvRowsFn = void (*)(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int m, float* y,
                                int64_t ldy, int64_t r0, int64_t r1);

struct IsaKernels {
  int lanes;         // L of the x layout
  int phases[9];     // P of the x layout, by bits
  GemvRowsFn gemv;
  DecodeRowsFn decode;
  V2aGemvRowsFn v2a_gemv;      // needs group % (lanes * phases[bits]) == 0 (api.cpp falls back to scalar)
  V2aDecodeRowsFn v2a_decode;  // needs group % lanes == 0
  HalfGemvRowsFn half_gemv;    // any cols
};

IsaKernels scalar_kernels();
#if defined(XFP_X86)
IsaKernels avx2_kernels();
IsaKernels avx512_kernels();
#endif

// float16 bit pattern -> float32 (exact; subnormals, infinities and NaN included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// float32 -> float16 bit pattern, rounded to nearest, ties to even, subnormals kept (F. Giesen's
// float_to_half_fast3_rtne; exact for every input, relies on the default rounding mode).
inline uint16_t float_to_half(float value) {
  uint32_t f;
  __builtin_memcpy(&f, &value, sizeof f);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t h;
  if (f >= (127u + 16u) << 23) {  // overflow to infinity, or NaN
    h = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (f < 113u << 23) {  // float16 subnormal or zero: align the mantissa by adding 0.5
    const uint32_t magic_bits = 126u << 23;
    float magic, a;
    __builtin_memcpy(&magic, &magic_bits, sizeof magic);
    __builtin_memcpy(&a, &f, sizeof a);
    a += magic;
    uint32_t abits;
    __builtin_memcpy(&abits, &a, sizeof abits);
    h = abits - magic_bits;
  } else {
    const uint32_t odd = (f >> 13) & 1u;
    f += (uint32_t(15 - 127) << 23) + 0xfffu + odd;
    h = f >> 13;
  }
  return uint16_t(h | (sign >> 16));
}

// out[i] += sum_j vals[j] * x_i[cols[j]] for i < NM, x_i = x + i * ldx: a row's outlier corrections or kept
// columns. Four independent partial sums per i, so the terms do not wait on one another's FMA latency.
template <int NM>
inline void add_sparse(const float* vals, const int32_t* cols, int32_t n, const float* x, int64_t ldx, float* out) {
  for (int i = 0; i < NM; ++i) {
    const float* xi = x + i * ldx;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int32_t j = 0;
    for (; j + 4 <= n; j += 4)
      for (int k = 0; k < 4; ++k) acc[k] += vals[j + k] * xi[cols[j + k]];
    for (; j < n; ++j) acc[0] += vals[j] * xi[cols[j]];
    out[i] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

// The part of a V2a row's product that every ISA shares: offsets times group sums (unless the kernel put the
// offsets into its weights), outlier corrections, kept columns (unless the kernel added them to its vectors:
// a dense dot product of the row's kept values with x at those columns). out[i] += ... for i < NM.
template <int NM, bool kOffsets = true, bool kKept = true>
inline void v2a_finish_row(const V2aMatrix& w, const V2aActivations& a, int64_t r, float* out) {
  const uint8_t* off = w.offset + r * w.groups;
  for (int i = 0; i < NM && kOffsets; ++i) {  // four independent sums: no chain of one FMA latency per group
    const float* xsum = a.xsum + i * a.xsum_stride;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int32_t g = 0;
    for (; g + 4 <= w.groups; g += 4)
      for (int k = 0; k < 4; ++k) acc[k] += w.offset_table[off[g + k]] * xsum[g + k];
    for (; g < w.groups; ++g) acc[0] += w.offset_table[off[g]] * xsum[g];
    out[i] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  const int32_t o0 = w.ol_rowptr[r];
  add_sparse<NM>(w.ol_delta + o0, w.ol_col + o0, w.ol_rowptr[r + 1] - o0, a.x, a.ldx, out);
  if (!kKept) return;
  const float* kw = w.kept_w + r * int64_t(w.kept);
  for (int i = 0; i < NM; ++i) {
    const float* xk = a.xkept + i * a.xkept_stride;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int32_t j = 0;
    for (; j + 4 <= w.kept; j += 4)
      for (int k = 0; k < 4; ++k) acc[k] += kw[j + k] * xk[j + k];
    for (; j < w.kept; ++j) acc[0] += kw[j] * xk[j];
    out[i] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

// In a decode step a model's matrices stream from memory (together they outgrow the cache), and one core
// computes a row faster than the hardware prefetchers bring the next ones in. So each GEMV row loop asks for
// the row kPrefetchBytes of codes ahead of the one it computes (its codes, and a V2a row's scales, offsets,
// library ids and kept values; a prefetch never faults, and stays inside the thread's own rows). Scratch
// A/B on the Intel machine of docs/PERFORMANCE.md, all 210 decoder matrices of SmolLM2's default folder
// called in model order at 1 thread (53 MB of codes): 9.1 ms without, 6.5 ms with (1-4 KB ahead all within
// noise of this); 2 threads: 3.6-3.8 ms either way. The rerunnable effect is PERFORMANCE.md's step table.
constexpr int64_t kPrefetchBytes = 2048;

// Rows between the one being computed and the one to prefetch. Rows wider than kPrefetchBytes are left to the
// hardware prefetchers (a long run within a row is what they follow well): prefetching such a row whole at
// once, 5.5 KB on 4096x11008, made that GEMV 10-45% slower at one thread (scratch A/B, benchmarks/gemv.py's
// matrices), while 2 KB rows (11008x4096) gained 10-25%.
inline int64_t prefetch_distance(int64_t row_bytes) {
  if (row_bytes > kPrefetchBytes) return int64_t(1) << 40;  // never reached: no prefetch
  return (kPrefetchBytes + row_bytes - 1) / std::max<int64_t>(row_bytes, 1);
}

// Always inlined: GCC deems a function that only prefetches free of effects, and drops calls it does not inline.
#define XFP_INLINE inline __attribute__((always_inline))

XFP_INLINE void prefetch_line(const void* p) {
  __builtin_prefetch(p, 0, 3);
}

XFP_INLINE void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) prefetch_line(c + b);
}

XFP_INLINE void prefetch_row(const V2Matrix& w, int64_t r) {
  prefetch_span(w.codes + r * w.row_bytes, w.row_bytes);
  prefetch_line(w.codebook + (r << w.bits));
}

XFP_INLINE void prefetch_row(const V2aMatrix& w, int64_t r) {
  prefetch_span(w.codes + r * w.row_bytes, w.row_bytes);
  prefetch_span(w.scale + r * w.groups, w.groups);
  prefetch_span(w.offset + r * w.groups, w.groups);
  if (w.ids) prefetch_span(w.ids + r * w.groups, w.groups);
  prefetch_span(w.kept_w + r * w.kept, w.kept * int64_t(sizeof(float)));
}

// Writes a decoded row's outliers, then its kept columns (the format's order: the kept column wins).
inline void v2a_overwrite_row(const V2aMatrix& w, int64_t r, float* o) {
  for (int32_t k = w.ol_rowptr[r]; k < w.ol_rowptr[r + 1]; ++k) o[w.ol_col[k]] = w.ol_val[k];
  const float* kw = w.kept_w + r * int64_t(w.kept);
  for (int32_t j = 0; j < w.kept; ++j) o[w.kept_cols[j]] = kw[j];
}

// A dense float16 product over rows [r0, r1) for m activation rows (1..kMaxM): four rows at a time, then one
// by one, each block prefetching the rows up to kHalfAhead further on (never past r1). K::rows<NM, R>(w,
// cols, x, ldx, y, ldy, r, ahead) computes rows r..r+R-1 (the ISA's own code); a row's result does not
// depend on the block it is in.
template <class K, int NM>
inline void half_gemv_blocks(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, float* y, int64_t ldy,
                             int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4)
    K::template rows<NM, 4>(w, cols, x, ldx, y, ldy, r, std::min<int64_t>(kHalfAhead, r1 - r - 4));
  for (; r < r1; ++r) K::template rows<NM, 1>(w, cols, x, ldx, y, ldy, r, 0);
}

template <class K>
inline void half_gemv_rows(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int m, float* y,
                           int64_t ldy, int64_t r0, int64_t r1) {
  switch (m) {
    case 1: return half_gemv_blocks<K, 1>(w, cols, x, ldx, y, ldy, r0, r1);
    case 2: return half_gemv_blocks<K, 2>(w, cols, x, ldx, y, ldy, r0, r1);
    case 3: return half_gemv_blocks<K, 3>(w, cols, x, ldx, y, ldy, r0, r1);
    default: return half_gemv_blocks<K, 4>(w, cols, x, ldx, y, ldy, r0, r1);
  }
}

}  // namespace xfp
