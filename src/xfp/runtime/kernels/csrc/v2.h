// Shared declarations of the fused V2 CPU kernels (docs/FORMAT.md, docs/PERFORMANCE.md).
//
// Each instruction set (scalar, AVX2, AVX-512) is one translation unit compiled with its own -m flags;
// api.cpp picks one at run time and splits rows over torch's threads. A kernel never materialises W_hat:
// per row it turns the packed indices into float32 weights in registers (codebook lookups by
// permute/gather) and multiplies them into x, then adds the row's outlier corrections.
#pragma once

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

struct IsaKernels {
  int lanes;         // L of the x layout
  int phases[9];     // P of the x layout, by bits
  GemvRowsFn gemv;
  DecodeRowsFn decode;
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

}  // namespace xfp
