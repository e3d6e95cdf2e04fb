// The AVX2 + FMA path (x86-64-v3: Haswell, Zen 1-3 and later). Included by avx2.cpp (the native build) and by
// simde_avx2.cpp (the same code on SIMDe's portable intrinsics, so that it is tested on any machine); the includer
// defines RYZEN_ENTRY, the name of the table's getter, and RYZEN_NAME.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../kernels.h"

#if defined(RYZEN_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx2.h>
#include <simde/x86/fma.h>
#define RYZEN_HAVE_PATH 1
#elif defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#define RYZEN_HAVE_PATH 1
#endif

namespace ryzen {
#ifdef RYZEN_HAVE_PATH
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
inline __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// y[m, n] = scale[n] * sum_k x[m, k] q[n, k], for a tile of R rows of x: each 8 int8 weights are converted once and
// used by the R rows. Every row accumulates in the same order whatever R is (four accumulators over runs of 32, the
// same horizontal sum), so a row's result does not depend on the rows computed with it.
template <int R>
void w8_tile(const float* x, const int8_t* qr, int64_t k, float* out) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    for (int j = 0; j < 4; ++j) {
      const __m256 w = i8x8(qr + i + 8 * j);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * k + i + 8 * j), acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float a = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
    for (int64_t t = i; t < k; ++t) a += x[r * k + t] * static_cast<float>(qr[t]);
    out[r] = a;
  }
}

void w8_rows(const float* x, int64_t m, int64_t k, const int8_t* q, const float* scale, float* y, int64_t ldy,
             int64_t n0, int64_t n1) {
  float acc[3];
  // Weight row outermost: a row read from memory serves every tile of x while it sits in L1.
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * k;
    for (int64_t r0 = 0; r0 < m; r0 += 3) {
      const int64_t rows = min64(3, m - r0);
      const float* xr = x + r0 * k;
      if (rows == 3) w8_tile<3>(xr, qr, k, acc);
      else if (rows == 2) w8_tile<2>(xr, qr, k, acc);
      else w8_tile<1>(xr, qr, k, acc);
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * ldy + n] = acc[r] * scale[n];
    }
  }
}

// ---------------------------------------------------------------- integer products on activations rounded per 32
// Weights in panels of 16 output rows (kernels.h); a 256-bit register takes half a panel step: 8 rows x 4 inputs.
// No VNNI here: int8 takes llama.cpp's sign trick, |q| * (x * sign(q)) in vpmaddubsw (2 * 127 * 127 cannot saturate),
// int4 codes (0..15) the plain vpmaddubsw; vpmaddwd by ones then sums each lane's 4 products. The R rows of a tile
// (up to 4) share every weight load; per row one int32 accumulator a block and one fp32 fma by its scale.

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline void store_half(const float* v, const float* scale, float* y, int64_t ldy, int64_t r, int64_t n0,
                       int64_t n_total) {
  for (int64_t j = 0; j < 8 && n0 + j < n_total; ++j) y[r * ldy + n0 + j] = scale != nullptr ? v[j] * scale[n0 + j] : v[j];
}

template <int R>
void w8a8_half(const A8& a, int64_t r0, const uint8_t* panel, int h, const float* scale, float* y, int64_t ldy,
               int64_t n0, int64_t n_total) {
  const int64_t k = a.k, blocks = k / 32;
  const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dots[R];
    for (int r = 0; r < R; ++r) dots[r] = _mm256_setzero_si256();
    const uint8_t* wb = panel + b * 8 * 64 + h * 32;
    for (int j = 0; j < 8; ++j) {
      const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64)), bias);
      const __m256i aw = _mm256_sign_epi8(ws, ws);
      for (int r = 0; r < R; ++r) {
        const __m256i xs = _mm256_sign_epi8(bcast4(a.q + (r0 + r) * k + b * 32 + 4 * j), ws);
        dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), _mm256_set1_ps(a.s[(r0 + r) * blocks + b]), acc[r]);
  }
  float v[8];
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(v, acc[r]);
    store_half(v, scale, y, ldy, r0 + r, n0, n_total);
  }
}

template <int R>
void w4a8_half(const A8& a, int64_t r0, const uint8_t* panel, int h, const float* sp, const float* mp, int64_t group,
               float* y, int64_t ldy, int64_t n0, int64_t n_total) {
  const int64_t k = a.k, blocks = k / 32, groups = k / group, per = group / 32;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dots[R];
    for (int r = 0; r < R; ++r) dots[r] = _mm256_setzero_si256();
    const uint8_t* wb = panel + b * 4 * 64 + h * 32;
    for (int j = 0; j < 4; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * 64));
      const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
      for (int r = 0; r < R; ++r) {
        const int8_t* xr = a.q + (r0 + r) * k + b * 32 + 8 * j;
        const __m256i d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, bcast4(xr)), ones);
        const __m256i d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, bcast4(xr + 4)), ones);
        dots[r] = _mm256_add_epi32(dots[r], _mm256_add_epi32(d0, d1));
      }
    }
    const __m256 sv = _mm256_loadu_ps(sp + (b / per) * kPanel + h * 8);
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_mul_ps(sv, _mm256_set1_ps(a.s[(r0 + r) * blocks + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), s, acc[r]);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 mv = _mm256_loadu_ps(mp + g * kPanel + h * 8);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a.gsum[(r0 + r) * groups + g]), acc[r]);
  }
  float v[8];
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(v, acc[r]);
    store_half(v, nullptr, y, ldy, r0 + r, n0, n_total);
  }
}

#define RYZEN_BY_ROWS4(m, CALL)                 \
  for (int64_t r0 = 0; r0 < (m); r0 += 4) {     \
    switch (min64(4, (m) - r0)) {               \
      case 4: CALL(4); break;                   \
      case 3: CALL(3); break;                   \
      case 2: CALL(2); break;                   \
      default: CALL(1); break;                  \
    }                                           \
  }

void w8a8_panels(const A8& a, const uint8_t* panels, const float* scale, float* y, int64_t ldy, int64_t n_total,
                 int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = panels + p * (a.k / 4) * 64;
    for (int h = 0; h < 2 && p * kPanel + 8 * h < n_total; ++h) {
#define RYZEN_W8A8(R) w8a8_half<R>(a, r0, panel, h, scale, y, ldy, p * kPanel + 8 * h, n_total)
      RYZEN_BY_ROWS4(a.m, RYZEN_W8A8)
#undef RYZEN_W8A8
    }
  }
}

void w4a8_panels(const A8& a, const uint8_t* panels, const float* scale, const float* minimum, int64_t group, float* y,
                 int64_t ldy, int64_t n_total, int64_t p0, int64_t p1) {
  const int64_t groups = a.k / group;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = panels + p * (a.k / 8) * 64;
    const float* sp = scale + p * groups * kPanel;
    const float* mp = minimum + p * groups * kPanel;
    for (int h = 0; h < 2 && p * kPanel + 8 * h < n_total; ++h) {
#define RYZEN_W4A8(R) w4a8_half<R>(a, r0, panel, h, sp, mp, group, y, ldy, p * kPanel + 8 * h, n_total)
      RYZEN_BY_ROWS4(a.m, RYZEN_W4A8)
#undef RYZEN_W4A8
    }
  }
}

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t i = 0;
  const __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Cephes' exp polynomial (relative error ~2e-7, as expf's fp32 rounding), 8 lanes at a time: softmax over thousands
// of cached positions spent most of its time in expf.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447505531f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// llama.cpp's quantize_row_q8_0 on AVX2: four vectors of 8, rounded (default MXCSR: half to even), packed to bytes.
void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs) {
  const int64_t blocks = k / 32;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + r * k + b * 32;
      __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
             v3 = _mm256_loadu_ps(v + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float d = _mm_cvtss_f32(m4) / 127.f;
      const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
      const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + r * k + b * 32), ordered);
      xs[r * blocks + b] = d;
    }
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

float exp_sum(float* p, int64_t n, float mx) {
  int64_t j = 0;
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, v);
    acc = _mm256_add_ps(acc, v);
  }
  float total = hsum(acc);
  for (; j < n; ++j) {
    p[j] = expf(p[j] - mx);
    total += p[j];
  }
  return total;
}

// Elements e..e+15 of a row as two fp32 vectors: fp32 values, or int8/int4 codes (0..255 / 0..15) converted.
inline void load16(const uint8_t* codes, const float* values, int64_t e, bool four, __m256& x0, __m256& x1) {
  if (values != nullptr) {
    x0 = _mm256_loadu_ps(values + e);
    x1 = _mm256_loadu_ps(values + e + 8);
    return;
  }
  __m128i c;
  if (four) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + e / 2));
    c = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));  // 2i low, 2i+1 high
  } else {
    c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + e));
  }
  x0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
  x1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
}

void unpack_codes(const uint8_t* row, int64_t d, bool four, float* out) {
  int64_t e = 0;
  for (; e + 16 <= d; e += 16) {
    __m256 x0, x1;
    load16(row, nullptr, e, four, x0, x1);
    _mm256_storeu_ps(out + e, x0);
    _mm256_storeu_ps(out + e + 8, x1);
  }
  for (; e < d; ++e)
    out[e] = four ? static_cast<float>((row[e >> 1] >> ((e & 1) << 2)) & 15) : static_cast<float>(row[e]);
}

// acc[u] = sum over the slice's rows jj of w[(jj * ng + e / gv) * G + u] * row_jj, for the G heads. Blocks of 16
// channels outside, rows inside: the 2G accumulators stay in registers for the whole slice and are stored once.
// Each element still sums its rows in order, so a row's bits do not depend on the rows beside it.
template <int G>
void slice_values_g(const uint8_t* const* codes, const float* const* rows, int64_t n, int64_t d, bool four,
                    const float* w, int64_t gv, float* acc) {
  const int64_t ng = d / gv;
  for (int64_t e = 0; e < d; e += 16) {
    __m256 a0[G], a1[G];
    for (int u = 0; u < G; ++u) a0[u] = a1[u] = _mm256_setzero_ps();
    const int64_t v_ = e / gv;
    for (int64_t jj = 0; jj < n; ++jj) {
      __m256 x0, x1;
      load16(codes[jj], rows[jj], e, four, x0, x1);
      const float* wj = w + (jj * ng + v_) * G;
      for (int u = 0; u < G; ++u) {
        const __m256 a = _mm256_broadcast_ss(wj + u);
        a0[u] = _mm256_fmadd_ps(a, x0, a0[u]);
        a1[u] = _mm256_fmadd_ps(a, x1, a1[u]);
      }
    }
    for (int u = 0; u < G; ++u) {
      _mm256_storeu_ps(acc + u * d + e, a0[u]);
      _mm256_storeu_ps(acc + u * d + e + 8, a1[u]);
    }
  }
}

// Scores of one key row for the G query heads that share it, the row read once (unpacked in registers). G is a
// compile-time constant, so the 2G accumulators stay in registers; two per head halve the FMA chain.
template <int G>
void group_scores_g(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs, float* out) {
  __m256 a0[G], a1[G];
  for (int u = 0; u < G; ++u) a0[u] = a1[u] = _mm256_setzero_ps();
  for (int64_t e = 0; e < d; e += 16) {
    __m256 x0, x1;
    load16(codes, keys, e, four, x0, x1);
    for (int u = 0; u < G; ++u) {
      a0[u] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + u * d + e), x0, a0[u]);
      a1[u] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + u * d + e + 8), x1, a1[u]);
    }
  }
  for (int u = 0; u < G; ++u) out[u] = hsum(_mm256_add_ps(a0[u], a1[u]));
}

bool group_scores(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs, int64_t group,
                  float* out) {
  if (d % 16 != 0) return false;
  switch (group) {
    case 1: group_scores_g<1>(codes, keys, d, four, qs, out); return true;
    case 2: group_scores_g<2>(codes, keys, d, four, qs, out); return true;
    case 3: group_scores_g<3>(codes, keys, d, four, qs, out); return true;
    case 4: group_scores_g<4>(codes, keys, d, four, qs, out); return true;
    case 5: group_scores_g<5>(codes, keys, d, four, qs, out); return true;
    case 6: group_scores_g<6>(codes, keys, d, four, qs, out); return true;
    default: return false;
  }
}

bool slice_values(const uint8_t* const* codes, const float* const* rows, int64_t n, int64_t d, bool four,
                  const float* w, int64_t gv, int64_t group, float* acc) {
  if (d % 16 != 0 || gv % 16 != 0) return false;
  switch (group) {
    case 1: slice_values_g<1>(codes, rows, n, d, four, w, gv, acc); return true;
    case 2: slice_values_g<2>(codes, rows, n, d, four, w, gv, acc); return true;
    case 3: slice_values_g<3>(codes, rows, n, d, four, w, gv, acc); return true;
    case 4: slice_values_g<4>(codes, rows, n, d, four, w, gv, acc); return true;
    case 5: slice_values_g<5>(codes, rows, n, d, four, w, gv, acc); return true;
    case 6: slice_values_g<6>(codes, rows, n, d, four, w, gv, acc); return true;
    default: return false;
  }
}

const Kernels kTable = {RYZEN_NAME, w8_rows, w8a8_panels, w4a8_panels, quantize_rows, silu_mul, dot, axpy, exp_sum, unpack_codes, group_scores,
                        slice_values};

}  // namespace

const Kernels* RYZEN_ENTRY() { return &kTable; }
#else
const Kernels* RYZEN_ENTRY() { return nullptr; }
#endif
}  // namespace ryzen
