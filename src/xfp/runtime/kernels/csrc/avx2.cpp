// AVX2 kernels (AVX2 + FMA + F16C): 8 float32 lanes. Same structure as avx512.cpp:
//   lookups: vpermps on an 8-entry table (2, 3 bits; tables repeated over 8 lanes), two vpermps and a
//   blend on index bit 3 (4 bits), a gather from a float32 table (5, 6, 8 bits);
//   indices: general (3, 5, 6, 8 bits) broadcast 8 bytes, vpshufb each lane's 2-byte window, vpsrlvd;
//   4 and 2 bits: vpmovzxbd of 8 bytes, shifts give 16 (32) weights in 2 (4) phases.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "v2.h"

namespace xfp {
namespace {

constexpr int L = 8;

template <int B>
struct Luts {
  __m256 t[2];
  alignas(32) float table[B >= 5 ? (1 << B) : 8];
};

template <int B>
inline void load_luts(const uint16_t* cb, Luts<B>& l) {
  if constexpr (B == 3) {
    l.t[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb)));
  } else if constexpr (B == 2) {  // 4 entries, repeated over the 8 lanes
    int64_t q;
    std::memcpy(&q, cb, 8);
    l.t[0] = _mm256_cvtph_ps(_mm_set1_epi64x(q));
  } else if constexpr (B == 4) {
    l.t[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb)));
    l.t[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + 8)));
  } else {
    for (int i = 0; i < (1 << B); i += 8)
      _mm256_store_ps(l.table + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + i))));
  }
}

template <int B>
inline __m256 lookup(__m256i idx, const Luts<B>& l) {
  if constexpr (B <= 3) {
    return _mm256_permutevar8x32_ps(l.t[0], idx);  // uses index bits 0..2
  } else if constexpr (B == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(l.t[0], idx);
    const __m256 hi = _mm256_permutevar8x32_ps(l.t[1], idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
  } else {
    return _mm256_i32gather_ps(l.table, _mm256_and_si256(idx, _mm256_set1_epi32((1 << B) - 1)), 4);
  }
}

// 8 indices in natural order from the B bytes at p (8 bytes must be readable there).
template <int B>
struct Unpacker {
  __m256i shuf, shift;
  Unpacker() {
    alignas(32) int8_t s[32];
    alignas(32) int32_t sh[8];
    for (int k = 0; k < 8; ++k) {
      const int bit = k * B, off = bit >> 3;  // each 128-bit half holds the 8 bytes twice: off + 1 <= 7
      s[4 * k] = int8_t(off);
      s[4 * k + 1] = (bit & 7) + B > 8 ? int8_t(off + 1) : int8_t(-128);
      s[4 * k + 2] = s[4 * k + 3] = int8_t(-128);
      sh[k] = bit & 7;
    }
    shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
  }
  inline __m256i operator()(const uint8_t* p) const {
    int64_t q;
    std::memcpy(&q, p, 8);
    return _mm256_srlv_epi32(_mm256_shuffle_epi8(_mm256_set1_epi64x(q), shuf), shift);
  }
};

inline const uint8_t* readable8(const uint8_t* p, int64_t len, uint8_t* tail) {
  if (len >= 8) return p;
  std::memset(tail, 0, 8);
  std::memcpy(tail, p, size_t(len));
  return tail;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int B, int NM>
inline void dot_general(const uint8_t* row, int64_t row_bytes, int cols, const Luts<B>& l,
                        const Unpacker<B>& u, const Activations& a, float* out) {
  const int64_t groups = (cols + L - 1) / L;  // a group of 8 indices is B bytes
  int64_t safe = row_bytes >= 8 ? (row_bytes - 8) / B + 1 : 0;
  if (safe > groups) safe = groups;
  __m256 acc0[NM], acc1[NM];
  for (int i = 0; i < NM; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= safe; g += 2) {
    const __m256 w0 = lookup<B>(u(row + g * B), l);
    const __m256 w1 = lookup<B>(u(row + (g + 1) * B), l);
    for (int i = 0; i < NM; ++i) {
      const float* x = a.xs + i * a.xs_stride + g * L;
      acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + L), acc1[i]);
    }
  }
  alignas(8) uint8_t tail[8];
  for (; g < groups; ++g) {
    const __m256 w = lookup<B>(u(readable8(row + g * B, row_bytes - g * B, tail)), l);
    for (int i = 0; i < NM; ++i)
      acc0[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.xs + i * a.xs_stride + g * L), acc0[i]);
  }
  for (int i = 0; i < NM; ++i) out[i] = hsum(_mm256_add_ps(acc0[i], acc1[i]));
}

template <int B, int NM>
inline void dot_phased(const uint8_t* row, int64_t row_bytes, int cols, const Luts<B>& l, const Activations& a,
                       float* out) {
  constexpr int P = 8 / B;
  const int64_t blocks = (cols + P * L - 1) / (P * L);  // a block is 8 bytes
  __m256 acc[NM][P];
  for (int i = 0; i < NM; ++i)
    for (int s = 0; s < P; ++s) acc[i][s] = _mm256_setzero_ps();
  alignas(8) uint8_t tail[8];
  for (int64_t t = 0; t < blocks; ++t) {
    const uint8_t* p = readable8(row + 8 * t, row_bytes - 8 * t, tail);
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    for (int s = 0; s < P; ++s) {
      const __m256 w = lookup<B>(s ? _mm256_srli_epi32(v, s * B) : v, l);
      for (int i = 0; i < NM; ++i)
        acc[i][s] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.xs + i * a.xs_stride + t * P * L + s * L), acc[i][s]);
    }
  }
  for (int i = 0; i < NM; ++i) {
    __m256 sum = acc[i][0];
    for (int s = 1; s < P; ++s) sum = _mm256_add_ps(sum, acc[i][s]);
    out[i] = hsum(sum);
  }
}

template <int B, int NM>
void gemv_rows_t(const V2Matrix& w, const Activations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  const Unpacker<B> u;
  Luts<B> l;
  float out[NM];
  const int64_t ahead = prefetch_distance(w.row_bytes);
  for (int64_t r = r0; r < r1; ++r) {
    if (r + ahead < r1) prefetch_row(w, r + ahead);
    load_luts<B>(w.codebook + (r << B), l);
    const uint8_t* row = w.codes + r * w.row_bytes;
    if constexpr (B == 2 || B == 4)
      dot_phased<B, NM>(row, w.row_bytes, w.cols, l, a, out);
    else
      dot_general<B, NM>(row, w.row_bytes, w.cols, l, u, a, out);
    const int32_t o0 = w.ol_rowptr[r];
    add_sparse<NM>(w.ol_delta + o0, w.ol_col + o0, w.ol_rowptr[r + 1] - o0, a.x, a.ldx, out);
    for (int i = 0; i < NM; ++i) y[i * ldy + r] = out[i];
  }
}

template <int B>
void decode_rows_t(const V2Matrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  const Unpacker<B> u;
  Luts<B> l;
  const int64_t groups = (w.cols + L - 1) / L;
  const int last = w.cols - int(groups - 1) * L;
  alignas(8) uint8_t tail[8];
  alignas(32) float buf[L];
  for (int64_t r = r0; r < r1; ++r) {
    load_luts<B>(w.codebook + (r << B), l);
    const uint8_t* row = w.codes + r * w.row_bytes;
    float* o = out + (r - r0) * ldo;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 v = lookup<B>(u(readable8(row + g * B, w.row_bytes - g * B, tail)), l);
      if (g + 1 < groups) {
        _mm256_storeu_ps(o + g * L, v);
      } else {
        _mm256_store_ps(buf, v);
        std::memcpy(o + g * L, buf, sizeof(float) * size_t(last));
      }
    }
    for (int32_t k = w.ol_rowptr[r]; k < w.ol_rowptr[r + 1]; ++k) o[w.ol_col[k]] = w.ol_val[k];
  }
}

template <int B>
void gemv_rows_b(const V2Matrix& w, const Activations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  switch (a.m) {
    case 1: return gemv_rows_t<B, 1>(w, a, y, ldy, r0, r1);
    case 2: return gemv_rows_t<B, 2>(w, a, y, ldy, r0, r1);
    case 3: return gemv_rows_t<B, 3>(w, a, y, ldy, r0, r1);
    default: return gemv_rows_t<B, 4>(w, a, y, ldy, r0, r1);
  }
}

void gemv_rows(const V2Matrix& w, const Activations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  switch (w.bits) {
    case 2: return gemv_rows_b<2>(w, a, y, ldy, r0, r1);
    case 3: return gemv_rows_b<3>(w, a, y, ldy, r0, r1);
    case 4: return gemv_rows_b<4>(w, a, y, ldy, r0, r1);
    case 5: return gemv_rows_b<5>(w, a, y, ldy, r0, r1);
    case 6: return gemv_rows_b<6>(w, a, y, ldy, r0, r1);
    default: return gemv_rows_b<8>(w, a, y, ldy, r0, r1);
  }
}

void decode_rows(const V2Matrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  switch (w.bits) {
    case 2: return decode_rows_t<2>(w, out, ldo, r0, r1);
    case 3: return decode_rows_t<3>(w, out, ldo, r0, r1);
    case 4: return decode_rows_t<4>(w, out, ldo, r0, r1);
    case 5: return decode_rows_t<5>(w, out, ldo, r0, r1);
    case 6: return decode_rows_t<6>(w, out, ldo, r0, r1);
    default: return decode_rows_t<8>(w, out, ldo, r0, r1);
  }
}

// ---- V2a (v2.h: V2aMatrix). A chunk is 8 bytes = P*8 columns (2, 4 bits, phase-major x) or B bytes =
// 8 columns (other widths, natural order); the group size is a multiple of a chunk's columns.

template <int B>
struct V2aShape {
  static constexpr bool phased = B == 2 || B == 4;
  static constexpr int P = phased ? 8 / B : 1;
  static constexpr int cols = phased ? P * L : L;  // columns per chunk
  static constexpr int bytes = phased ? 8 : B;
};

template <int B, int NM>
void v2a_gemv_rows_t(const V2aMatrix& w, const V2aActivations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  using S = V2aShape<B>;
  constexpr int NA = S::phased ? S::P : 2;  // independent accumulators per group
  const Unpacker<B> u;
  Luts<B> l;
  int id = -1;
  const int64_t per_group = w.group / S::cols;
  const int64_t chunks = (w.cols + S::cols - 1) / S::cols;
  alignas(8) uint8_t tail[8];
  float out[NM];
  const int64_t ahead = prefetch_distance(w.row_bytes);
  for (int64_t r = r0; r < r1; ++r) {
    if (r + ahead < r1) prefetch_row(w, r + ahead);
    const uint8_t* row = w.codes + r * w.row_bytes;
    const uint8_t* sc = w.scale + r * w.groups;
    const uint8_t* ids = w.ids ? w.ids + r * w.groups : nullptr;
    __m256 acc[NM];  // arrays of vectors are only indexed by unrolled constants: they stay in registers
    for (int i = 0; i < NM; ++i) acc[i] = _mm256_setzero_ps();
    for (int32_t g = 0; g < w.groups; ++g) {
      const int want = ids ? ids[g] : 0;
      if (want != id || (B <= 6 && ids)) {  // ids vary at random: reloading (1-4 conversions) beats a mispredict
        id = want;
        load_luts<B>(w.library + (int64_t(id) << B), l);
      }
      __m256 ga[NM][NA];
      for (int i = 0; i < NM; ++i)
        for (int s = 0; s < NA; ++s) ga[i][s] = _mm256_setzero_ps();
      const int64_t c0 = g * per_group, c1 = std::min<int64_t>(c0 + per_group, chunks);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t at = c * S::bytes;
        const uint8_t* p = at + 8 <= w.row_bytes ? row + at : readable8(row + at, w.row_bytes - at, tail);
        if constexpr (S::phased) {
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
          for (int s = 0; s < S::P; ++s) {
            const __m256 wv = lookup<B>(s ? _mm256_srli_epi32(v, s * B) : v, l);
            for (int i = 0; i < NM; ++i)
              ga[i][s] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.xs + i * a.xs_stride + c * S::cols + s * L), ga[i][s]);
          }
        } else {
          const __m256 wv = lookup<B>(u(p), l);
          for (int i = 0; i < NM; ++i)
            ga[i][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.xs + i * a.xs_stride + c * L), ga[i][0]);
          if (++c == c1) break;  // the next chunk feeds the second accumulator
          const int64_t at1 = c * S::bytes;
          const uint8_t* p1 = at1 + 8 <= w.row_bytes ? row + at1 : readable8(row + at1, w.row_bytes - at1, tail);
          const __m256 wv1 = lookup<B>(u(p1), l);
          for (int i = 0; i < NM; ++i)
            ga[i][1] = _mm256_fmadd_ps(wv1, _mm256_loadu_ps(a.xs + i * a.xs_stride + c * L), ga[i][1]);
        }
      }
      const __m256 sv = _mm256_set1_ps(w.scale_table[sc[g]]);
      for (int i = 0; i < NM; ++i) {
        __m256 sum = ga[i][0];
        for (int s = 1; s < NA; ++s) sum = _mm256_add_ps(sum, ga[i][s]);
        acc[i] = _mm256_fmadd_ps(sum, sv, acc[i]);
      }
    }
    for (int i = 0; i < NM; ++i) out[i] = hsum(acc[i]);
    v2a_finish_row<NM>(w, a, r, out);
    for (int i = 0; i < NM; ++i) y[i * ldy + r] = out[i];
  }
}

template <int B>
void v2a_decode_rows_t(const V2aMatrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  constexpr int GB = B;  // bytes per 8 columns
  const Unpacker<B> u;
  Luts<B> l;
  int id = -1;
  const int64_t per_group = w.group / L;
  const int64_t chunks = (w.cols + L - 1) / L;
  const int last = w.cols - int(chunks - 1) * L;
  alignas(32) float buf[L];
  alignas(8) uint8_t tail[8];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.codes + r * w.row_bytes;
    float* o = out + (r - r0) * ldo;
    for (int32_t g = 0; g < w.groups; ++g) {
      const int want = w.ids ? w.ids[r * w.groups + g] : 0;
      if (want != id) {
        id = want;
        load_luts<B>(w.library + (int64_t(id) << B), l);
      }
      const __m256 sv = _mm256_set1_ps(w.scale_table[w.scale[r * w.groups + g]]);
      const __m256 ov = _mm256_set1_ps(w.offset_table[w.offset[r * w.groups + g]]);
      const int64_t c0 = g * per_group, c1 = std::min<int64_t>(c0 + per_group, chunks);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t at = c * GB;
        const uint8_t* p = at + 8 <= w.row_bytes ? row + at : readable8(row + at, w.row_bytes - at, tail);
        // e * s is exact in float32, so the FMA rounds once, as the format's float32(e * s + o)
        const __m256 v = _mm256_fmadd_ps(lookup<B>(u(p), l), sv, ov);
        const __m256 h = _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        if (c + 1 < chunks)
          _mm256_storeu_ps(o + c * L, h);
        else
        {
          _mm256_store_ps(buf, h);
          std::memcpy(o + c * L, buf, sizeof(float) * size_t(last));
        }
      }
    }
    v2a_overwrite_row(w, r, o);
  }
}

template <int B>
void v2a_gemv_rows_b(const V2aMatrix& w, const V2aActivations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  switch (a.m) {
    case 1: return v2a_gemv_rows_t<B, 1>(w, a, y, ldy, r0, r1);
    case 2: return v2a_gemv_rows_t<B, 2>(w, a, y, ldy, r0, r1);
    case 3: return v2a_gemv_rows_t<B, 3>(w, a, y, ldy, r0, r1);
    default: return v2a_gemv_rows_t<B, 4>(w, a, y, ldy, r0, r1);
  }
}

void v2a_gemv_rows(const V2aMatrix& w, const V2aActivations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  switch (w.bits) {
    case 2: return v2a_gemv_rows_b<2>(w, a, y, ldy, r0, r1);
    case 3: return v2a_gemv_rows_b<3>(w, a, y, ldy, r0, r1);
    case 4: return v2a_gemv_rows_b<4>(w, a, y, ldy, r0, r1);
    case 5: return v2a_gemv_rows_b<5>(w, a, y, ldy, r0, r1);
    case 6: return v2a_gemv_rows_b<6>(w, a, y, ldy, r0, r1);
    default: return v2a_gemv_rows_b<8>(w, a, y, ldy, r0, r1);
  }
}

void v2a_decode_rows(const V2aMatrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  switch (w.bits) {
    case 2: return v2a_decode_rows_t<2>(w, out, ldo, r0, r1);
    case 3: return v2a_decode_rows_t<3>(w, out, ldo, r0, r1);
    case 4: return v2a_decode_rows_t<4>(w, out, ldo, r0, r1);
    case 5: return v2a_decode_rows_t<5>(w, out, ldo, r0, r1);
    case 6: return v2a_decode_rows_t<6>(w, out, ldo, r0, r1);
    default: return v2a_decode_rows_t<8>(w, out, ldo, r0, r1);
  }
}

// Dense float16 rows: R rows at a time, 8 columns a step (vcvtph2ps, one FMA per activation row); the
// last columns (fewer than 8) in scalar order after the vector sum. The rows `ahead` further on are
// prefetched meanwhile (as avx512.cpp).
struct HalfRows {
  template <int NM, int R>
  static void rows(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, float* y, int64_t ldy,
                   int64_t r, int64_t ahead) {
    __m256 acc[R][NM];
    for (int k = 0; k < R; ++k)
      for (int i = 0; i < NM; ++i) acc[k][i] = _mm256_setzero_ps();
    const uint16_t* row = w + r * cols;
    int64_t c = 0;
    for (; c + L <= cols; c += L) {
      __m256 xv[NM];
      for (int i = 0; i < NM; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + c);
      for (int k = 0; k < R; ++k) {
        if (c % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + (k + ahead) * cols + c), _MM_HINT_T0);
        const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k * cols + c)));
        for (int i = 0; i < NM; ++i) acc[k][i] = _mm256_fmadd_ps(wv, xv[i], acc[k][i]);
      }
    }
    for (int k = 0; k < R; ++k)
      for (int i = 0; i < NM; ++i) {
        float sum = hsum(acc[k][i]);
        for (int64_t t = c; t < cols; ++t) sum += half_to_float(row[k * cols + t]) * x[i * ldx + t];
        y[i * ldy + r + k] = sum;
      }
  }
};

void half_gemv(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
               int64_t r0, int64_t r1) {
  half_gemv_rows<HalfRows>(w, cols, x, ldx, m, y, ldy, r0, r1);
}

}  // namespace

IsaKernels avx2_kernels() {
  return {L, {1, 1, 4, 1, 2, 1, 1, 1, 1}, gemv_rows, decode_rows, v2a_gemv_rows, v2a_decode_rows, half_gemv};
}

}  // namespace xfp
