// Portable kernels: plain C++, natural column order (P = L = 1). The fallback where no SIMD path
// applies (another architecture, or XFP_CPU_ISA=scalar), and the readable statement of what the SIMD
// paths compute.
#include <cstring>

#include "v2.h"

namespace xfp {
namespace {

// Index of column c in a packed row: a (bits + 7)-bit window from byte (c*bits)/8 holds it; the second
// byte is read only if it exists.
inline uint32_t index_at(const uint8_t* row, int64_t row_bytes, int64_t c, int bits) {
  const int64_t bit = c * bits;
  const int64_t byte = bit >> 3;
  uint32_t window = row[byte];
  if (byte + 1 < row_bytes) window |= uint32_t(row[byte + 1]) << 8;
  return (window >> (bit & 7)) & ((1u << bits) - 1u);
}

void gemv_rows(const V2Matrix& w, const Activations& act, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  float lut[256];
  const int entries = 1 << w.bits;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.codes + r * w.row_bytes;
    for (int j = 0; j < entries; ++j) lut[j] = half_to_float(w.codebook[r * entries + j]);
    for (int i = 0; i < act.m; ++i) {
      const float* x = act.xs + i * act.xs_stride;
      float acc = 0.f;
      for (int64_t c = 0; c < w.cols; ++c) acc += lut[index_at(row, w.row_bytes, c, w.bits)] * x[c];
      const float* xn = act.x + i * act.ldx;
      for (int32_t o = w.ol_rowptr[r]; o < w.ol_rowptr[r + 1]; ++o) acc += w.ol_delta[o] * xn[w.ol_col[o]];
      y[i * ldy + r] = acc;
    }
  }
}

void decode_rows(const V2Matrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  float lut[256];
  const int entries = 1 << w.bits;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.codes + r * w.row_bytes;
    float* o = out + (r - r0) * ldo;
    for (int j = 0; j < entries; ++j) lut[j] = half_to_float(w.codebook[r * entries + j]);
    for (int64_t c = 0; c < w.cols; ++c) o[c] = lut[index_at(row, w.row_bytes, c, w.bits)];
    for (int32_t k = w.ol_rowptr[r]; k < w.ol_rowptr[r + 1]; ++k) o[w.ol_col[k]] = w.ol_val[k];
  }
}

}  // namespace

IsaKernels scalar_kernels() { return {1, {1, 1, 1, 1, 1, 1, 1, 1, 1}, gemv_rows, decode_rows}; }

}  // namespace xfp
