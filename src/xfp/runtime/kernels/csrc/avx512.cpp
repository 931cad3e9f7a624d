// AVX-512 kernels (F, BW, VL, DQ + FMA, F16C): 16 float32 lanes.
//
// A row's codebook is converted to float32 once per row and kept in registers (2..6 bits) or in a
// stack table (8 bits); a group of 16 indices becomes 16 weights by one permute (vpermps/vpermt2ps) or
// a gather (8 bits), and meets x in one FMA. Indices come out of the packed bytes by
//   general (3, 5, 6, 8 bits): broadcast 16 bytes, vpshufb the 2-byte window of each lane, vpsrlvd;
//   4 and 2 bits: vpmovzxbd of 16 bytes, then shifts by 0/4 (0/2/4/6) give 32 (64) weights in
//   2 (4) phases, x being permuted to match once per call (see Activations in v2.h).
// Index bits above `bits` left in a lane are ignored by the lookups (tables of fewer than 16 entries are
// repeated over 16 lanes), so no masking is needed.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "v2.h"

namespace xfp {
namespace {

constexpr int L = 16;

template <int B>
struct Luts {
  __m512 t[B <= 4 ? 1 : (B == 5 ? 2 : 4)];
  alignas(64) float table[B == 8 ? 256 : 16];
};

template <int B>
inline void load_luts(const uint16_t* cb, Luts<B>& l) {
  if constexpr (B == 4) {
    l.t[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb)));
  } else if constexpr (B < 4) {  // 2**B entries, repeated over the 16 lanes
    const __m512 t = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << (1 << B)) - 1u), cb));
    l.t[0] = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                    _mm512_set1_epi32((1 << B) - 1)), t);
  } else if constexpr (B <= 6) {
    for (int i = 0; i < (1 << (B - 4)); ++i)
      l.t[i] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + 16 * i)));
  } else {
    for (int i = 0; i < 16; ++i)
      _mm512_store_ps(l.table + 16 * i,
                      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + 16 * i))));
  }
}

template <int B>
inline __m512 lookup(__m512i idx, const Luts<B>& l) {
  if constexpr (B <= 4) {
    return _mm512_permutexvar_ps(idx, l.t[0]);  // uses index bits 0..3
  } else if constexpr (B == 5) {
    return _mm512_permutex2var_ps(l.t[0], idx, l.t[1]);  // bits 0..4
  } else if constexpr (B == 6) {
    const __m512 lo = _mm512_permutex2var_ps(l.t[0], idx, l.t[1]);
    const __m512 hi = _mm512_permutex2var_ps(l.t[2], idx, l.t[3]);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
  } else {
    return _mm512_i32gather_ps(idx, l.table, 4);  // idx < 256: the unpacker reads one byte per lane
  }
}

// 16 indices in natural order from the 2*B bytes at p (16 bytes must be readable there).
template <int B>
struct Unpacker {
  __m512i shuf, shift;
  Unpacker() {
    alignas(64) int8_t s[64];
    alignas(64) int32_t sh[16];
    for (int k = 0; k < 16; ++k) {
      const int bit = k * B, off = bit >> 3;
      s[4 * k] = int8_t(off);
      s[4 * k + 1] = (bit & 7) + B > 8 ? int8_t(off + 1) : int8_t(-128);  // -128: vpshufb writes 0
      s[4 * k + 2] = s[4 * k + 3] = int8_t(-128);
      sh[k] = bit & 7;
    }
    shuf = _mm512_load_si512(s);
    shift = _mm512_load_si512(sh);
  }
  inline __m512i operator()(const uint8_t* p) const {
    const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_srlv_epi32(_mm512_shuffle_epi8(v, shuf), shift);
  }
};

// Points at `len` bytes from p if 16 can be read there, else at a zero-padded copy in `tail`.
inline const uint8_t* readable16(const uint8_t* p, int64_t len, uint8_t* tail) {
  if (len >= 16) return p;
  std::memset(tail, 0, 16);
  std::memcpy(tail, p, size_t(len));
  return tail;
}

// out[i] = sum over the row of W[c] * x_i[c] (outliers excluded), 3/5/6/8 bits, natural order.
template <int B, int NM>
inline void dot_general(const uint8_t* row, int64_t row_bytes, int cols, const Luts<B>& l,
                        const Unpacker<B>& u, const Activations& a, float* out) {
  constexpr int GB = 2 * B;  // bytes per group of 16
  const int64_t groups = (cols + L - 1) / L;
  int64_t safe = row_bytes >= 16 ? (row_bytes - 16) / GB + 1 : 0;  // groups whose 16-byte read stays in the row
  if (safe > groups) safe = groups;
  __m512 acc0[NM], acc1[NM];
  for (int i = 0; i < NM; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= safe; g += 2) {
    const __m512 w0 = lookup<B>(u(row + g * GB), l);
    const __m512 w1 = lookup<B>(u(row + (g + 1) * GB), l);
    for (int i = 0; i < NM; ++i) {
      const float* x = a.xs + i * a.xs_stride + g * L;
      acc0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + L), acc1[i]);
    }
  }
  alignas(16) uint8_t tail[16];
  for (; g < groups; ++g) {
    const __m512 w = lookup<B>(u(readable16(row + g * GB, row_bytes - g * GB, tail)), l);
    for (int i = 0; i < NM; ++i)
      acc0[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(a.xs + i * a.xs_stride + g * L), acc0[i]);
  }
  for (int i = 0; i < NM; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i]));
}

// 4 bits (P = 2) or 2 bits (P = 4): 16 bytes hold P*16 indices; phase s of byte k is column 16*P*t + k*P + s.
// Two sets of accumulators take alternate blocks where registers allow (NM * P <= 8): half the FMA chain.
template <int B, int NM, int P>
inline void phased_block(const uint8_t* p, const float* xs, int64_t xs_stride, const Luts<B>& l, __m512 (&acc)[NM][P]) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  for (int s = 0; s < P; ++s) {
    const __m512 w = lookup<B>(s ? _mm512_srli_epi32(v, s * B) : v, l);
    for (int i = 0; i < NM; ++i) acc[i][s] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + i * xs_stride + s * L), acc[i][s]);
  }
}

template <int B, int NM>
inline void dot_phased(const uint8_t* row, int64_t row_bytes, int cols, const Luts<B>& l, const Activations& a,
                       float* out) {
  constexpr int P = 8 / B;
  constexpr int U = NM * P <= 8 ? 2 : 1;
  const int64_t blocks = (cols + P * L - 1) / (P * L);
  const int64_t safe = std::min<int64_t>(blocks, row_bytes / 16);  // blocks whose 16 bytes lie in the row
  __m512 acc[U][NM][P];
  for (int k = 0; k < U; ++k)
    for (int i = 0; i < NM; ++i)
      for (int s = 0; s < P; ++s) acc[k][i][s] = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 2 <= safe; t += 2) {
    phased_block<B, NM, P>(row + 16 * t, a.xs + t * P * L, a.xs_stride, l, acc[0]);
    phased_block<B, NM, P>(row + 16 * (t + 1), a.xs + (t + 1) * P * L, a.xs_stride, l, acc[U - 1]);
  }
  alignas(16) uint8_t tail[16];
  for (; t < blocks; ++t)
    phased_block<B, NM, P>(readable16(row + 16 * t, row_bytes - 16 * t, tail), a.xs + t * P * L, a.xs_stride, l, acc[0]);
  for (int i = 0; i < NM; ++i) {
    __m512 sum = acc[0][i][0];
    for (int s = 1; s < P; ++s) sum = _mm512_add_ps(sum, acc[0][i][s]);
    for (int s = 0; s < P && U == 2; ++s) sum = _mm512_add_ps(sum, acc[U - 1][i][s]);
    out[i] = _mm512_reduce_add_ps(sum);
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
  constexpr int GB = 2 * B;
  const Unpacker<B> u;
  Luts<B> l;
  const int64_t groups = (w.cols + L - 1) / L;
  const __mmask16 last = __mmask16((1u << (w.cols - (groups - 1) * L)) - 1u);
  alignas(16) uint8_t tail[16];
  for (int64_t r = r0; r < r1; ++r) {
    load_luts<B>(w.codebook + (r << B), l);
    const uint8_t* row = w.codes + r * w.row_bytes;
    float* o = out + (r - r0) * ldo;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 v = lookup<B>(u(readable16(row + g * GB, w.row_bytes - g * GB, tail)), l);
      if (g + 1 < groups)
        _mm512_storeu_ps(o + g * L, v);
      else
        _mm512_mask_storeu_ps(o + g * L, last, v);
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

// ---- V2a (v2.h: V2aMatrix). A chunk is 16 bytes = P*16 columns (2, 4 bits, phase-major x) or 2*B bytes =
// 16 columns (other widths, natural order); the group size is a multiple of a chunk's columns.

template <int B>
struct V2aShape {
  static constexpr bool phased = B == 2 || B == 4;
  static constexpr int P = phased ? 8 / B : 1;
  static constexpr int cols = phased ? P * L : L;  // columns per chunk
  static constexpr int bytes = phased ? 16 : 2 * B;
};

// 2..6 bits: the group's scale and offset are folded into its codebook registers (one FMA per register and
// group: float32(e * s + o), e * s being exact in float32 as e and s are float16 values), so every chunk's
// products go straight into the row's accumulators: no per-group partial sums, no offset sums. Two sets of
// accumulators take alternate chunks, halving the FMA dependency chains, where registers allow
// (NM * phases <= 8).
template <int B, int NM, int NS>
inline void v2a_chunk(const uint8_t* p, const float* xs, int64_t xs_stride, const Luts<B>& l, const Unpacker<B>& u,
                      __m512 (&acc)[NM][NS]) {
  if constexpr (V2aShape<B>::phased) {
    phased_block<B, NM, NS>(p, xs, xs_stride, l, acc);
  } else {
    const __m512 wv = lookup<B>(u(p), l);
    for (int i = 0; i < NM; ++i) acc[i][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs + i * xs_stride), acc[i][0]);
  }
}

// l = base * s + o: the group's weights float32(e * s + o), rounded once (e * s is exact).
template <int B>
inline void group_luts(const Luts<B>& base, __m512 sv, __m512 ov, Luts<B>& l) {
  for (int k = 0; k < int(sizeof(base.t) / sizeof(base.t[0])); ++k) l.t[k] = _mm512_fmadd_ps(base.t[k], sv, ov);
}

template <int B, int NM>
void v2a_gemv_scaled(const V2aMatrix& w, const V2aActivations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  static_assert(B <= 6, "8 bits looks weights up in a memory table: v2a_gemv_grouped");
  using S = V2aShape<B>;
  constexpr int NS = S::phased ? S::P : 1;  // accumulators per set: one per phase
  constexpr int U = NM * NS <= 8 ? 2 : 1;   // sets
  const Unpacker<B> u;
  Luts<B> base, l;
  int id = -1;
  const int64_t per_group = w.group / S::cols;
  const int64_t chunks = (w.cols + S::cols - 1) / S::cols;
  // chunks whose 16-byte read stays inside the row
  const int64_t safe = w.row_bytes >= 16 ? std::min<int64_t>(chunks, (w.row_bytes - 16) / S::bytes + 1) : 0;
  alignas(16) uint8_t tail[16];
  float out[NM];
  const int64_t ahead = prefetch_distance(w.row_bytes);
  for (int64_t r = r0; r < r1; ++r) {
    if (r + ahead < r1) prefetch_row(w, r + ahead);
    const uint8_t* row = w.codes + r * w.row_bytes;
    const uint8_t* sc = w.scale + r * w.groups;
    const uint8_t* of = w.offset + r * w.groups;
    const uint8_t* ids = w.ids ? w.ids + r * w.groups : nullptr;
    __m512 acc[U][NM][NS];  // only indexed by unrolled constants: they stay in registers
    for (int k = 0; k < U; ++k)
      for (int i = 0; i < NM; ++i)
        for (int s = 0; s < NS; ++s) acc[k][i][s] = _mm512_setzero_ps();
    // groups whose chunks are all safe and come in pairs take the loop without bounds checks
    const int32_t fast = per_group % 2 == 0 ? int32_t(std::min<int64_t>(w.groups, safe / per_group)) : 0;
    // group g's codebook registers: its library entry, scaled and offset
    const auto prepare_group = [&](int32_t g) {
      if (ids || id < 0) {  // ids vary at random: reloading (1-4 conversions) beats a mispredict
        id = ids ? ids[g] : 0;
        load_luts<B>(w.library + (int64_t(id) << B), base);
      }
      group_luts<B>(base, _mm512_set1_ps(w.scale_table[sc[g]]), _mm512_set1_ps(w.offset_table[of[g]]), l);
    };
    int32_t g = 0;
    for (; g < fast; ++g) {
      prepare_group(g);
      const uint8_t* p = row + g * per_group * S::bytes;
      const float* xs = a.xs + g * per_group * S::cols;
      for (int64_t k = 0; k < per_group; k += 2, p += 2 * S::bytes, xs += 2 * S::cols) {
        v2a_chunk<B, NM, NS>(p, xs, a.xs_stride, l, u, acc[0]);
        v2a_chunk<B, NM, NS>(p + S::bytes, xs + S::cols, a.xs_stride, l, u, acc[U - 1]);
      }
    }
    for (; g < w.groups; ++g) {
      prepare_group(g);
      const int64_t c1 = std::min<int64_t>((g + 1) * per_group, chunks);
      for (int64_t c = g * per_group; c < c1; ++c) {
        const int64_t at = c * S::bytes;
        const uint8_t* p = c < safe ? row + at : readable16(row + at, w.row_bytes - at, tail);
        if (c & 1)  // constant indices only: a runtime index would put the accumulators in memory
          v2a_chunk<B, NM, NS>(p, a.xs + c * S::cols, a.xs_stride, l, u, acc[U - 1]);
        else
          v2a_chunk<B, NM, NS>(p, a.xs + c * S::cols, a.xs_stride, l, u, acc[0]);
      }
    }
    // the kept columns: their values times x there, into the accumulators (xkept is zero-padded)
    const float* kw = w.kept_w + r * int64_t(w.kept);
    for (int32_t j = 0; j < w.kept; j += L) {  // the mask keeps the last row's read inside kept_w
      const __mmask16 in_row = w.kept - j >= L ? __mmask16(0xffff) : __mmask16((1u << (w.kept - j)) - 1u);
      const __m512 kv = _mm512_maskz_loadu_ps(in_row, kw + j);
      for (int i = 0; i < NM; ++i)
        acc[0][i][0] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(a.xkept + i * a.xkept_stride + j), acc[0][i][0]);
    }
    for (int i = 0; i < NM; ++i) {
      __m512 sum = acc[0][i][0];
      for (int s = 1; s < NS; ++s) sum = _mm512_add_ps(sum, acc[0][i][s]);
      for (int s = 0; s < NS && U == 2; ++s) sum = _mm512_add_ps(sum, acc[U - 1][i][s]);
      out[i] = _mm512_reduce_add_ps(sum);
    }
    v2a_finish_row<NM, false, false>(w, a, r, out);  // the offsets and kept columns are in already
    for (int i = 0; i < NM; ++i) y[i * ldy + r] = out[i];
  }
}

// 8 bits: per group, s * sum(e * x) from partial sums (the codebook is a memory table, not registers).
template <int B, int NM>
void v2a_gemv_grouped(const V2aMatrix& w, const V2aActivations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  using S = V2aShape<B>;
  constexpr int NA = S::phased ? S::P : 2;  // independent accumulators per group
  const Unpacker<B> u;
  Luts<B> l;
  int id = -1;
  const int64_t per_group = w.group / S::cols;
  const int64_t chunks = (w.cols + S::cols - 1) / S::cols;
  alignas(16) uint8_t tail[16];
  float out[NM];
  const int64_t ahead = prefetch_distance(w.row_bytes);
  for (int64_t r = r0; r < r1; ++r) {
    if (r + ahead < r1) prefetch_row(w, r + ahead);
    const uint8_t* row = w.codes + r * w.row_bytes;
    const uint8_t* sc = w.scale + r * w.groups;
    const uint8_t* ids = w.ids ? w.ids + r * w.groups : nullptr;
    __m512 acc[NM];  // arrays of vectors are only indexed by unrolled constants: they stay in registers
    for (int i = 0; i < NM; ++i) acc[i] = _mm512_setzero_ps();
    for (int32_t g = 0; g < w.groups; ++g) {
      const int want = ids ? ids[g] : 0;
      if (want != id || (B <= 6 && ids)) {  // ids vary at random: reloading (1-4 conversions) beats a mispredict
        id = want;
        load_luts<B>(w.library + (int64_t(id) << B), l);
      }
      __m512 ga[NM][NA];
      for (int i = 0; i < NM; ++i)
        for (int s = 0; s < NA; ++s) ga[i][s] = _mm512_setzero_ps();
      const int64_t c0 = g * per_group, c1 = std::min<int64_t>(c0 + per_group, chunks);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t at = c * S::bytes;
        const uint8_t* p = at + 16 <= w.row_bytes ? row + at : readable16(row + at, w.row_bytes - at, tail);
        if constexpr (S::phased) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          for (int s = 0; s < S::P; ++s) {
            const __m512 wv = lookup<B>(s ? _mm512_srli_epi32(v, s * B) : v, l);
            for (int i = 0; i < NM; ++i)
              ga[i][s] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a.xs + i * a.xs_stride + c * S::cols + s * L), ga[i][s]);
          }
        } else {
          const __m512 wv = lookup<B>(u(p), l);
          for (int i = 0; i < NM; ++i)
            ga[i][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a.xs + i * a.xs_stride + c * L), ga[i][0]);
          if (++c == c1) break;  // the next chunk feeds the second accumulator
          const int64_t at1 = c * S::bytes;
          const uint8_t* p1 = at1 + 16 <= w.row_bytes ? row + at1 : readable16(row + at1, w.row_bytes - at1, tail);
          const __m512 wv1 = lookup<B>(u(p1), l);
          for (int i = 0; i < NM; ++i)
            ga[i][1] = _mm512_fmadd_ps(wv1, _mm512_loadu_ps(a.xs + i * a.xs_stride + c * L), ga[i][1]);
        }
      }
      const __m512 sv = _mm512_set1_ps(w.scale_table[sc[g]]);
      for (int i = 0; i < NM; ++i) {
        __m512 sum = ga[i][0];
        for (int s = 1; s < NA; ++s) sum = _mm512_add_ps(sum, ga[i][s]);
        acc[i] = _mm512_fmadd_ps(sum, sv, acc[i]);
      }
    }
    for (int i = 0; i < NM; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
    v2a_finish_row<NM>(w, a, r, out);
    for (int i = 0; i < NM; ++i) y[i * ldy + r] = out[i];
  }
}

template <int B, int NM>
void v2a_gemv_rows_t(const V2aMatrix& w, const V2aActivations& a, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  if constexpr (B <= 6)
    v2a_gemv_scaled<B, NM>(w, a, y, ldy, r0, r1);
  else
    v2a_gemv_grouped<B, NM>(w, a, y, ldy, r0, r1);
}

template <int B>
void v2a_decode_rows_t(const V2aMatrix& w, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  constexpr int GB = 2 * B;  // bytes per 16 columns
  const Unpacker<B> u;
  Luts<B> l;
  int id = -1;
  const int64_t per_group = w.group / L;
  const int64_t chunks = (w.cols + L - 1) / L;
  const __mmask16 last = __mmask16((1u << (w.cols - (chunks - 1) * L)) - 1u);
  alignas(16) uint8_t tail[16];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.codes + r * w.row_bytes;
    float* o = out + (r - r0) * ldo;
    for (int32_t g = 0; g < w.groups; ++g) {
      const int want = w.ids ? w.ids[r * w.groups + g] : 0;
      if (want != id) {
        id = want;
        load_luts<B>(w.library + (int64_t(id) << B), l);
      }
      const __m512 sv = _mm512_set1_ps(w.scale_table[w.scale[r * w.groups + g]]);
      const __m512 ov = _mm512_set1_ps(w.offset_table[w.offset[r * w.groups + g]]);
      const int64_t c0 = g * per_group, c1 = std::min<int64_t>(c0 + per_group, chunks);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t at = c * GB;
        const uint8_t* p = at + 16 <= w.row_bytes ? row + at : readable16(row + at, w.row_bytes - at, tail);
        // e * s is exact in float32, so the FMA rounds once, as the format's float32(e * s + o)
        const __m512 v = _mm512_fmadd_ps(lookup<B>(u(p), l), sv, ov);
        const __m512 h = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        if (c + 1 < chunks)
          _mm512_storeu_ps(o + c * L, h);
        else
          _mm512_mask_storeu_ps(o + c * L, last, h);
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

// Dense float16 rows: R rows at a time, 16 columns a step (vcvtph2ps, one FMA per activation row); the
// last partial step by masked loads. R * NM independent accumulators hide the FMA latency. The rows
// `ahead` further on are prefetched meanwhile: one core streams a matrix from memory about 1.5x faster
// with it (scratch A/B on the Intel machine of docs/PERFORMANCE.md, cold cache; see its notes).
struct HalfRows {
  template <int NM, int R>
  static void rows(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, float* y, int64_t ldy,
                   int64_t r, int64_t ahead) {
    __m512 acc[R][NM];
    for (int k = 0; k < R; ++k)
      for (int i = 0; i < NM; ++i) acc[k][i] = _mm512_setzero_ps();
    const uint16_t* row = w + r * cols;
    int64_t c = 0;
    for (; c + L <= cols; c += L) {
      __m512 xv[NM];
      for (int i = 0; i < NM; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + c);
      for (int k = 0; k < R; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(row + (k + ahead) * cols + c), _MM_HINT_T0);
        const __m512 wv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k * cols + c)));
        for (int i = 0; i < NM; ++i) acc[k][i] = _mm512_fmadd_ps(wv, xv[i], acc[k][i]);
      }
    }
    if (c < cols) {
      const __mmask16 mask = __mmask16((1u << (cols - c)) - 1u);
      __m512 xv[NM];
      for (int i = 0; i < NM; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, x + i * ldx + c);
      for (int k = 0; k < R; ++k) {
        const __m512 wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row + k * cols + c));
        for (int i = 0; i < NM; ++i) acc[k][i] = _mm512_fmadd_ps(wv, xv[i], acc[k][i]);
      }
    }
    for (int k = 0; k < R; ++k)
      for (int i = 0; i < NM; ++i) y[i * ldy + r + k] = _mm512_reduce_add_ps(acc[k][i]);
  }
};

void half_gemv(const uint16_t* w, int64_t cols, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
               int64_t r0, int64_t r1) {
  half_gemv_rows<HalfRows>(w, cols, x, ldx, m, y, ldy, r0, r1);
}

}  // namespace

IsaKernels avx512_kernels() {
  return {L, {1, 1, 4, 1, 2, 1, 1, 1, 1}, gemv_rows, decode_rows, v2a_gemv_rows, v2a_decode_rows, half_gemv};
}

}  // namespace xfp
