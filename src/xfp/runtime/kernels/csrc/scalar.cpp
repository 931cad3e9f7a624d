// Portable kernels: plain C++, natural column order (P = L = 1). The fallback where no SIMD path
// applies (another architecture, or XFP_CPU_ISA=scalar), and the readable statement of what the SIMD
// paths compute.
#include <algorithm>
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

// V2a, any group size: per group s * sum(e * x) over the group's columns (x zeroed on kept columns),
// then the shared per-row terms (v2.h).
void v2a_gemv_rows(const V2aMatrix& w, const V2aActivations& act, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  float lut[256];
  const int entries = 1 << w.bits;
  int id = -1;
  float out[kMaxM];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.codes + r * w.row_bytes;
    const uint8_t* sc = w.scale + r * w.groups;
    for (int i = 0; i < act.m; ++i) out[i] = 0.f;
    for (int32_t g = 0; g < w.groups; ++g) {
      const int want = w.ids ? w.ids[r * w.groups + g] : 0;
      if (want != id) {
        id = want;
        for (int j = 0; j < entries; ++j) lut[j] = half_to_float(w.library[id * entries + j]);
      }
      const int64_t c0 = int64_t(g) * w.group, c1 = std::min<int64_t>(c0 + w.group, w.cols);
      const float s = w.scale_table[sc[g]];
      for (int i = 0; i < act.m; ++i) {
        const float* x = act.xs + i * act.xs_stride;
        float acc = 0.f;
        for (int64_t c = c0; c < c1; ++c) acc += lut[index_at(row, w.row_bytes, c, w.bits)] * x[c];
        out[i] += s * acc;
      }
    }
    switch (act.m) {  // the shared tail is templated on the row count
      case 1: v2a_finish_row<1>(w, act, r, out); break;
      case 2: v2a_finish_row<2>(w, act, r, out); break;
      case 3: v2a_finish_row<3>(w, act, r, out); break;
      default: v2a_finish_row<4>(w, act, r, out); break;
    }
    for (int i = 0; i < act.m; ++i) y[i * ldy + r] = out[i];
  }
}

void v2a_decode_rows(const V2aMatrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  float lut[256];
  const int entries = 1 << w.bits;
  int id = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.codes + r * w.row_bytes;
    float* o = out + (r - r0) * ldo;
    for (int32_t g = 0; g < w.groups; ++g) {
      const int want = w.ids ? w.ids[r * w.groups + g] : 0;
      if (want != id) {
        id = want;
        for (int j = 0; j < entries; ++j) lut[j] = half_to_float(w.library[id * entries + j]);
      }
      const float s = w.scale_table[w.scale[r * w.groups + g]], off = w.offset_table[w.offset[r * w.groups + g]];
      const int64_t c0 = int64_t(g) * w.group, c1 = std::min<int64_t>(c0 + w.group, w.cols);
      for (int64_t c = c0; c < c1; ++c)  // e * s is exact in float32: one rounding, then one to float16
        o[c] = half_to_float(float_to_half(lut[index_at(row, w.row_bytes, c, w.bits)] * s + off));
    }
    v2a_overwrite_row(w, r, o);
  }
}

void half_gemv(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
               int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = w + r * cols;
    for (int i = 0; i < m; ++i) {
      const float* xi = x + i * ldx;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t c = 0;
      for (; c + 4 <= cols; c += 4)
        for (int k = 0; k < 4; ++k) acc[k] += half_to_float(row[c + k]) * xi[c + k];
      for (; c < cols; ++c) acc[0] += half_to_float(row[c]) * xi[c];
      y[i * ldy + r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  }
}

}  // namespace

IsaKernels scalar_kernels() {
  return {1, {1, 1, 1, 1, 1, 1, 1, 1, 1}, gemv_rows, decode_rows, v2a_gemv_rows, v2a_decode_rows, half_gemv};
}

}  // namespace xfp
