// C entry points of the fused V2 CPU kernels, called through ctypes by xfp/runtime/kernels/cpu.py.
//
// Rows are split over torch's own intra-op threads (at::parallel_for, i.e. torch's OpenMP pool, so
// torch.set_num_threads applies and no second pool competes for the cores). Every row is computed by one
// thread in a fixed order, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "v2.h"

namespace xfp {
namespace {

// Below this many weights per task a thread is not worth waking (measured: docs/PERFORMANCE.md).
constexpr int64_t kMinWeightsPerTask = 1 << 16;
// Bytes of activations one pass may keep hot: under a 48 KiB L1d with room for the codes' stream.
constexpr int64_t kL1Bytes = 32 << 10;

bool isa_supported(int isa) {
  if (isa == kScalar) return true;
#if defined(XFP_X86)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

const IsaKernels* kernels(int isa) {
  static const IsaKernels scalar = scalar_kernels();
#if defined(XFP_X86)
  static const IsaKernels avx2 = avx2_kernels();
  static const IsaKernels avx512 = avx512_kernels();
  if (isa == kAvx512) return &avx512;
  if (isa == kAvx2) return &avx2;
#endif
  return isa == kScalar ? &scalar : nullptr;
}

// The kernels of `isa` if this CPU runs it and this build has it, else nullptr (checked once per ISA).
const IsaKernels* usable(int isa) {
  static const bool ok[3] = {isa_supported(kScalar), isa_supported(kAvx2), isa_supported(kAvx512)};
  return (isa >= 0 && isa < 3 && ok[isa]) ? kernels(isa) : nullptr;
}

bool valid_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8; }

int64_t grain_rows(int32_t cols) { return std::max<int64_t>(1, kMinWeightsPerTask / std::max<int32_t>(cols, 1)); }

// One activation row in the kernels' phase order: within each block of P * lanes columns, column b + kk * P + s
// goes to slot b + s * lanes + kk (columns past `cols` stay as they are, zero).
void interleave(const float* src, float* dst, int64_t cols, int64_t stride, int64_t P, int64_t lanes) {
  const int64_t block = P * lanes;
  for (int64_t b = 0; b < stride; b += block)
    for (int64_t kk = 0; kk < lanes; ++kk)
      for (int64_t s = 0; s < P; ++s)
        if (b + kk * P + s < cols) dst[b + s * lanes + kk] = src[b + kk * P + s];
}

}  // namespace
}  // namespace xfp

extern "C" {

// 1 if this CPU runs `isa` (0 scalar, 1 AVX2, 2 AVX-512) and this build contains it.
int xfp_isa_supported(int isa) { return xfp::usable(isa) != nullptr; }

// sizeof(V2Matrix): cpu.py checks its ctypes mirror against it.
int64_t xfp_v2_matrix_size() { return int64_t(sizeof(xfp::V2Matrix)); }

// The matrix arrives as a V2Matrix (v2.h) built once per matrix by cpu.py (ctypes mirror `_V2Matrix`). The
// outlier arrays may be null when there are none (ol_rowptr is all zeros then, so they are never read).
static bool valid(const xfp::V2Matrix* w) {
  return w && xfp::valid_bits(w->bits) && w->rows >= 1 && w->cols >= 1 &&
         w->row_bytes == (int64_t(w->cols) * w->bits + 7) / 8;
}

// y[i * ldy + r] = sum_c W_hat[r, c] * x[i * ldx + c] for i < m, r < rows. Returns 0, or -1 on bad arguments.
int xfp_v2_gemv(int isa, const xfp::V2Matrix* w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy) {
  const xfp::IsaKernels* k = xfp::usable(isa);
  if (!k || !valid(w) || m < 0 || ldx < w->cols || ldy < w->rows) return -1;
  if (m == 0) return 0;
  // x in the ISA's lane order, zero-padded to whole blocks.
  const int64_t P = k->phases[w->bits], lanes = k->lanes, block = P * lanes, cols = w->cols;
  const int64_t stride = (cols + block - 1) / block * block;
  std::vector<float> xs(size_t(m * stride), 0.f);
  for (int64_t i = 0; i < m; ++i) {
    xfp::interleave(x + i * ldx, xs.data() + i * stride, cols, stride, P, lanes);
  }
  // Activation rows per pass over the codes: as many as keep their x in L1 (re-read for every matrix row).
  const int64_t per_pass = std::clamp<int64_t>(xfp::kL1Bytes / (stride * int64_t(sizeof(float))), 1, xfp::kMaxM);
  at::parallel_for(0, w->rows, xfp::grain_rows(w->cols), [&](int64_t r0, int64_t r1) {
    for (int64_t i0 = 0; i0 < m; i0 += per_pass) {
      const int n = int(std::min<int64_t>(per_pass, m - i0));
      const xfp::Activations act{xs.data() + i0 * stride, stride, x + i0 * ldx, ldx, n};
      k->gemv(*w, act, y + i0 * ldy, ldy, r0, r1);
    }
  });
  return 0;
}

// out[(r - r0) * ldo + c] = W_hat[r, c] (float32, exact) for r in [r0, r1). Returns 0, or -1 on bad arguments.
int xfp_v2_decode(int isa, const xfp::V2Matrix* w, int64_t r0, int64_t r1, float* out, int64_t ldo) {
  const xfp::IsaKernels* k = xfp::usable(isa);
  if (!k || !valid(w) || r0 < 0 || r1 > w->rows || r0 > r1 || ldo < w->cols) return -1;
  at::parallel_for(r0, r1, xfp::grain_rows(w->cols), [&](int64_t a, int64_t b) {
    k->decode(*w, out + (a - r0) * ldo, ldo, a, b);
  });
  return 0;
}

// ---- V2a -----------------------------------------------------------------------------------------------

// sizeof(V2aMatrix): cpu.py checks its ctypes mirror against it.
int64_t xfp_v2a_matrix_size() { return int64_t(sizeof(xfp::V2aMatrix)); }

static bool valid_v2a(const xfp::V2aMatrix* w) {
  return w && xfp::valid_bits(w->bits) && w->rows >= 1 && w->cols >= 1 && w->group >= 1 && w->lib >= 1 &&
         w->lib <= 256 && w->groups == (int64_t(w->cols) + w->group - 1) / w->group && w->kept >= 0 &&
         w->kept <= w->cols && (w->lib == 1 || w->ids) && w->row_bytes == (int64_t(w->cols) * w->bits + 7) / 8;
}

// The kernels of `isa` if its chunks tile the matrix's groups, else the portable ones (any group size).
static const xfp::IsaKernels* v2a_kernels(const xfp::IsaKernels* k, const xfp::V2aMatrix* w, bool gemv) {
  const int64_t chunk = gemv ? int64_t(k->lanes) * k->phases[w->bits] : k->lanes;
  return w->group % chunk == 0 ? k : xfp::usable(xfp::kScalar);
}

// y[i * ldy + r] = sum_c W_hat[r, c] * x[i * ldx + c] for i < m, r < rows (W_hat's values before their
// float16 rounding, see V2aMatrix). Returns 0, or -1 on bad arguments.
int xfp_v2a_gemv(int isa, const xfp::V2aMatrix* w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy) {
  const xfp::IsaKernels* k = xfp::usable(isa);
  if (!k || !valid_v2a(w) || m < 0 || ldx < w->cols || ldy < w->rows) return -1;
  if (m == 0) return 0;
  k = v2a_kernels(k, w, true);
  const int64_t P = k->phases[w->bits], lanes = k->lanes, block = P * lanes, cols = w->cols;
  const int64_t stride = (cols + block - 1) / block * block;
  const int64_t groups = w->groups, G = w->group;
  std::vector<float> xs(size_t(m * stride), 0.f), xsum(size_t(m * groups), 0.f);
  std::vector<float> xk(size_t(m * cols));  // x with the kept columns zeroed
  for (int64_t i = 0; i < m; ++i) {
    float* xi = xk.data() + i * cols;
    std::copy(x + i * ldx, x + i * ldx + cols, xi);
    for (int32_t j = 0; j < w->kept; ++j) xi[w->kept_cols[j]] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0.0;  // one rounding: the offsets' products see float32(exact group sum)
      for (int64_t c = g * G; c < std::min(cols, (g + 1) * G); ++c) sum += xi[c];
      xsum[size_t(i * groups + g)] = float(sum);
    }
    xfp::interleave(xi, xs.data() + i * stride, cols, stride, P, lanes);
  }
  const int64_t per_pass = std::clamp<int64_t>(xfp::kL1Bytes / (stride * int64_t(sizeof(float))), 1, xfp::kMaxM);
  at::parallel_for(0, w->rows, xfp::grain_rows(w->cols), [&](int64_t r0, int64_t r1) {
    for (int64_t i0 = 0; i0 < m; i0 += per_pass) {
      const int n = int(std::min<int64_t>(per_pass, m - i0));
      const xfp::V2aActivations act{xs.data() + i0 * stride, stride, xsum.data() + i0 * groups, groups,
                                    x + i0 * ldx, ldx, n};
      k->v2a_gemv(*w, act, y + i0 * ldy, ldy, r0, r1);
    }
  });
  return 0;
}

// out[(r - r0) * ldo + c] = W_hat[r, c] (float32, exact) for r in [r0, r1). Returns 0, or -1 on bad arguments.
int xfp_v2a_decode(int isa, const xfp::V2aMatrix* w, int64_t r0, int64_t r1, float* out, int64_t ldo) {
  const xfp::IsaKernels* k = xfp::usable(isa);
  if (!k || !valid_v2a(w) || r0 < 0 || r1 > w->rows || r0 > r1 || ldo < w->cols) return -1;
  k = v2a_kernels(k, w, false);
  at::parallel_for(r0, r1, xfp::grain_rows(w->cols), [&](int64_t a, int64_t b) {
    k->v2a_decode(*w, out + (a - r0) * ldo, ldo, a, b);
  });
  return 0;
}

// ---- dense float16 ------------------------------------------------------------------------------------

// y[i * ldy + r] = sum_c float(w[r * cols + c]) * x[i * ldx + c] for i < m, r < rows: a dense float16
// matrix (w: float16 bit patterns, row-major, contiguous) times float32 activations, computed in float32.
// Returns 0, or -1 on bad arguments.
int xfp_f16_gemv(int isa, const uint16_t* w, int64_t rows, int64_t cols, const float* x, int64_t m, int64_t ldx,
                 float* y, int64_t ldy) {
  const xfp::IsaKernels* k = xfp::usable(isa);
  if (!k || !w || rows < 1 || cols < 1 || m < 0 || ldx < cols || ldy < rows) return -1;
  at::parallel_for(0, rows, xfp::grain_rows(int32_t(std::min<int64_t>(cols, INT32_MAX))), [&](int64_t r0, int64_t r1) {
    for (int64_t i0 = 0; i0 < m; i0 += xfp::kMaxM) {
      const int n = int(std::min<int64_t>(xfp::kMaxM, m - i0));
      k->half_gemv(w, cols, x + i0 * ldx, ldx, n, y + i0 * ldy, ldy, r0, r1);
    }
  });
  return 0;
}

}  // extern "C"
