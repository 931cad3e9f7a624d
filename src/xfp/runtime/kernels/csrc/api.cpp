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

// One GEMV call: x laid out for the matrix's kernel (and, V2a, zeroed on the kept columns and summed per
// group, and gathered at the kept columns), and where the rows go.
class GemvJob {
 public:
  void prepare(const IsaKernels* k, const V2Matrix* w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy) {
    set(k, x, m, ldx, y, ldy, w->rows, w->cols, k->phases[w->bits]);
    v2_ = w;
    for (int64_t i = 0; i < m; ++i) interleave(x + i * ldx, xs_.data() + i * stride_, cols_, stride_, phases_, lanes_);
  }

  void prepare(const IsaKernels* k, const V2aMatrix* w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy) {
    set(k, x, m, ldx, y, ldy, w->rows, w->cols, k->phases[w->bits]);
    v2a_ = w;
    const int64_t G = w->group;
    groups_ = w->groups;
    xsum_.assign(size_t(m * groups_), 0.f);
    kept_stride_ = (w->kept + kKeptPad - 1) / kKeptPad * kKeptPad;
    xkept_.assign(size_t(m * kept_stride_), 0.f);
    std::vector<float> xk(static_cast<size_t>(cols_));  // x with the kept columns zeroed
    for (int64_t i = 0; i < m; ++i) {
      std::copy(x + i * ldx, x + i * ldx + cols_, xk.data());
      for (int32_t j = 0; j < w->kept; ++j) {
        xkept_[size_t(i * kept_stride_ + j)] = xk[size_t(w->kept_cols[j])];
        xk[size_t(w->kept_cols[j])] = 0.f;
      }
      for (int64_t g = 0; g < groups_; ++g) {
        double sum = 0.0;  // one rounding: the offsets' products see float32(exact group sum)
        for (int64_t c = g * G; c < std::min(cols_, (g + 1) * G); ++c) sum += xk[size_t(c)];
        xsum_[size_t(i * groups_ + g)] = float(sum);
      }
      interleave(xk.data(), xs_.data() + i * stride_, cols_, stride_, phases_, lanes_);
    }
  }

  // Every row, split over torch's threads; each row computed by one thread.
  void run() const {
    if (m_ == 0) return;
    at::parallel_for(0, rows_, grain_rows(int32_t(cols_)), [&](int64_t r0, int64_t r1) { compute(r0, r1); });
  }

 private:
  void compute(int64_t r0, int64_t r1) const {
    for (int64_t i0 = 0; i0 < m_; i0 += per_pass_) {
      const int n = int(std::min<int64_t>(per_pass_, m_ - i0));
      if (v2_) {
        const Activations act{xs_.data() + i0 * stride_, stride_, x_ + i0 * ldx_, ldx_, n};
        k_->gemv(*v2_, act, y_ + i0 * ldy_, ldy_, r0, r1);
      } else {
        const V2aActivations act{xs_.data() + i0 * stride_, stride_, xsum_.data() + i0 * groups_, groups_,
                                 x_ + i0 * ldx_, ldx_, xkept_.data() + i0 * kept_stride_, kept_stride_, n};
        k_->v2a_gemv(*v2a_, act, y_ + i0 * ldy_, ldy_, r0, r1);
      }
    }
  }

  void set(const IsaKernels* k, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy, int64_t rows,
           int64_t cols, int64_t phases) {
    k_ = k, x_ = x, m_ = m, ldx_ = ldx, y_ = y, ldy_ = ldy, rows_ = rows, cols_ = cols;
    phases_ = phases, lanes_ = k->lanes;
    const int64_t block = phases_ * lanes_;
    stride_ = (cols + block - 1) / block * block;  // x zero-padded to whole blocks
    xs_.assign(size_t(m * stride_), 0.f);
    // activation rows per pass over the codes: as many as keep their x in L1 (re-read for every matrix row)
    per_pass_ = std::clamp<int64_t>(kL1Bytes / (stride_ * int64_t(sizeof(float))), 1, kMaxM);
  }

  const IsaKernels* k_ = nullptr;
  const V2Matrix* v2_ = nullptr;
  const V2aMatrix* v2a_ = nullptr;
  const float* x_ = nullptr;
  float* y_ = nullptr;
  int64_t m_ = 0, ldx_ = 0, ldy_ = 0, rows_ = 0, cols_ = 0, phases_ = 1, lanes_ = 1, stride_ = 0, per_pass_ = 1;
  int64_t groups_ = 0, kept_stride_ = 0;
  std::vector<float> xs_, xsum_, xkept_;
};

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
  xfp::GemvJob job;
  job.prepare(k, w, x, m, ldx, y, ldy);
  job.run();
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
  xfp::GemvJob job;
  job.prepare(v2a_kernels(k, w, true), w, x, m, ldx, y, ldy);
  job.run();
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
