// The AVX-512 paths (F, BW, VL, DQ: Skylake-SP, Ice Lake, Zen 4 and later), with VNNI's vpdpbusd where the includer
// defines RYZEN_VNNI. Included by avx512.cpp and avx512vnni.cpp (native builds) and by simde_avx512.cpp and
// simde_avx512vnni.cpp (the same code on SIMDe's portable intrinsics, built for AVX2, so that it is tested on any
// AVX2 machine); the includer defines RYZEN_ENTRY, the name of the table's getter, and RYZEN_NAME.
//
// Integer dot products. vpdpbusd multiplies unsigned by signed bytes. int4 codes (0..15) are unsigned already. int8
// weights are stored unsigned, q + 128, so a block's dot comes out as dot(q, x) + 128 * sum(x): the second term
// depends on the row of activations alone, and the glue hands it over summed with the block scales (A8::total),
// subtracted once per output. Without VNNI (AVX-512BW), int8 takes llama.cpp's sign trick, |q| * (x * sign(q)) in
// vpmaddubsw (no pair of products can saturate: 2 * 127 * 127), and int4 the plain vpmaddubsw (2 * 15 * 127).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../kernels.h"

#if defined(RYZEN_SIMDE)
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#endif
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include "simde_shims.h"
#define RYZEN_HAVE_PATH 1
#elif defined(__x86_64__) || defined(_M_X64)
#ifdef RYZEN_VNNI
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#else
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#endif
#include <immintrin.h>
#define RYZEN_HAVE_PATH 1
#endif

namespace ryzen {
#ifdef RYZEN_HAVE_PATH
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Software prefetch distance in weight bytes: the panel stream is regular, but with 8 rows of integer products per
// 64-byte load the loop issues few loads and the hardware prefetcher fell behind (measured below in docs/native.md).
constexpr int64_t kAhead = 2048;

inline float hsum(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// -------------------------------------------------------------------------------- int8 weights, fp32 activations
// R rows against one weight row: each 16 weights are converted once for the R rows; per row two accumulators over
// runs of 32 and one horizontal sum, whatever R is.
template <int R>
void w8_tile(const float* x, const int8_t* qr, int64_t k, float* out) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + i))));
    const __m512 w1 =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + i + 16))));
    for (int r = 0; r < R; ++r) {
      acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * k + i), acc0[r]);
      acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * k + i + 16), acc1[r]);
    }
  }
  for (; i < k; i += 16) {
    const __mmask16 mk = lanes(k - i);
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, qr + i)));
    for (int r = 0; r < R; ++r) acc0[r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, x + r * k + i), acc0[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm512_add_ps(acc0[r], acc1[r]));
}

void w8_rows(const float* x, int64_t m, int64_t k, const int8_t* q, const float* scale, float* y, int64_t ldy,
             int64_t n0, int64_t n1) {
  float acc[4];
  for (int64_t n = n0; n < n1; ++n) {  // weight row outermost: it serves every tile of x from L1
    const int8_t* qr = q + n * k;
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int64_t rows = min64(4, m - r0);
      const float* xr = x + r0 * k;
      if (rows == 4) w8_tile<4>(xr, qr, k, acc);
      else if (rows == 3) w8_tile<3>(xr, qr, k, acc);
      else if (rows == 2) w8_tile<2>(xr, qr, k, acc);
      else w8_tile<1>(xr, qr, k, acc);
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * ldy + n] = acc[r] * scale[n];
    }
  }
}

// ---------------------------------------------------------------- integer products on activations rounded per 32
// Weights in panels of 16 output rows (kernels.h): one 64-byte load holds 4 inputs (int8) or 8 (int4) of each of the
// 16 rows, a 32-bit lane a row, and meets 4 activations broadcast to every lane: each vpdpbusd adds 4 products to
// each of 16 outputs, so a block of 32 inputs ends as 16 int32 dots, with no horizontal sum. The R rows of
// activations (up to kSmallM at once) share every weight load. Per row: one int32 accumulator a block, then one
// fp32 fma by the block's scale into the row's accumulator, in block order whatever R is.

inline __m512i bcast4(const int8_t* p) {  // 4 activations into every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

#ifndef RYZEN_VNNI
// 16 lanes of 4 signed products each, from signed weights w and activations x, without VNNI: llama.cpp's sign
// trick, |w| * (x * sign(w)) in vpmaddubsw (no pair can saturate: 2 * 127 * 127 < 32768), then pairs of pairs.
inline __m512i dot4_signed(__m512i aw, __mmask64 neg, __m512i x) {
  const __m512i xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
  return _mm512_madd_epi16(_mm512_maddubs_epi16(aw, xs), _mm512_set1_epi16(1));
}
inline __m512i dot4_unsigned(__m512i w, __m512i x) {  // int4 codes 0..15: 2 * 15 * 127 fits
  return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
}
#endif

inline void store_panel(float* y, int64_t ldy, int64_t r, int64_t n0, int64_t n_total, __m512 v) {
  _mm512_mask_storeu_ps(y + r * ldy + n0, lanes(n_total - n0), v);
}

// Independent integer accumulators per row: with few rows the chain of vpdpbusd into one register is bound by its
// latency (~4-5 cycles each), not by the weight stream; a block's int32 sum is exact in any order, so splitting it
// keeps every row's result bit-identical whatever R is (row independence).
template <int R>
constexpr int chains() {
  return R == 1 ? 4 : (R == 2 ? 2 : 1);
}

template <int R>
void w8a8_panel(const A8& a, int64_t r0, const uint8_t* panel, const float* scale, float* y, int64_t ldy, int64_t n0,
                int64_t n_total) {
  constexpr int C = chains<R>();
  const int64_t k = a.k, blocks = k / 32;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dots[C][R];
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) dots[c][r] = _mm512_setzero_si512();
    const uint8_t* wb = panel + b * 8 * 64;
    for (int j = 0; j < 8; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + j * 64 + kAhead), _MM_HINT_T0);
      const int c = j % C;
      const __m512i w = _mm512_loadu_si512(wb + j * 64);  // q + 128
#ifdef RYZEN_VNNI
      for (int r = 0; r < R; ++r)
        dots[c][r] = _mm512_dpbusd_epi32(dots[c][r], w, bcast4(a.q + (r0 + r) * k + b * 32 + 4 * j));
#else
      const __m512i ws = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));  // q
      const __m512i aw = _mm512_abs_epi8(ws);
      const __mmask64 neg = _mm512_movepi8_mask(ws);
      for (int r = 0; r < R; ++r)
        dots[c][r] = _mm512_add_epi32(dots[c][r], dot4_signed(aw, neg, bcast4(a.q + (r0 + r) * k + b * 32 + 4 * j)));
#endif
    }
    for (int r = 0; r < R; ++r) {
      __m512i d = dots[0][r];
      for (int c = 1; c < C; ++c) d = _mm512_add_epi32(d, dots[c][r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(a.s[(r0 + r) * blocks + b]), acc[r]);
    }
  }
  const __m512 sc = _mm512_maskz_loadu_ps(lanes(n_total - n0), scale + n0);
  for (int r = 0; r < R; ++r) {
#ifdef RYZEN_VNNI
    // vpdpbusd summed (q + 128) * x: take 128 * sum(x) (scaled per block, A8::total) off before the row scale
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(acc[r], _mm512_set1_ps(a.total[r0 + r])), sc);
#else
    const __m512 v = _mm512_mul_ps(acc[r], sc);
#endif
    store_panel(y, ldy, r0 + r, n0, n_total, v);
  }
}

template <int R>
void w4a8_panel(const A8& a, int64_t r0, const uint8_t* panel, const float* sp, const float* mp, int64_t group,
                float* y, int64_t ldy, int64_t n0, int64_t n_total) {
  constexpr int C = chains<R>();
  const int64_t k = a.k, blocks = k / 32, groups = k / group, per = group / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dots[C][R];
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) dots[c][r] = _mm512_setzero_si512();
    const uint8_t* wb = panel + b * 4 * 64;
    _mm_prefetch(reinterpret_cast<const char*>(wb + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kAhead + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kAhead + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + kAhead + 192), _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) {
      const __m512i w = _mm512_loadu_si512(wb + j * 64);
      const __m512i lo = _mm512_and_si512(w, low);                        // inputs 8j .. 8j+3 of the block
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);  // inputs 8j+4 .. 8j+7
      const int c0 = (2 * j) % C, c1 = (2 * j + 1) % C;
      for (int r = 0; r < R; ++r) {
        const int8_t* xr = a.q + (r0 + r) * k + b * 32 + 8 * j;
#ifdef RYZEN_VNNI
        dots[c0][r] = _mm512_dpbusd_epi32(dots[c0][r], lo, bcast4(xr));
        dots[c1][r] = _mm512_dpbusd_epi32(dots[c1][r], hi, bcast4(xr + 4));
#else
        dots[c0][r] = _mm512_add_epi32(dots[c0][r], dot4_unsigned(lo, bcast4(xr)));
        dots[c1][r] = _mm512_add_epi32(dots[c1][r], dot4_unsigned(hi, bcast4(xr + 4)));
#endif
      }
    }
    const __m512 sv = _mm512_loadu_ps(sp + (b / per) * kPanel);
    for (int r = 0; r < R; ++r) {
      __m512i d = dots[0][r];
      for (int c = 1; c < C; ++c) d = _mm512_add_epi32(d, dots[c][r]);
      const __m512 s = _mm512_mul_ps(sv, _mm512_set1_ps(a.s[(r0 + r) * blocks + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r]);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {  // the minimum times the sum of the rounded inputs of its group
    const __m512 mv = _mm512_loadu_ps(mp + g * kPanel);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.gsum[(r0 + r) * groups + g]), acc[r]);
  }
  for (int r = 0; r < R; ++r) store_panel(y, ldy, r0 + r, n0, n_total, acc[r]);
}

// A tile of R rows, R a compile-time constant (the accumulators stay in registers), for m rows in tiles of kSmallM.
#define RYZEN_BY_ROWS(m, CALL)                    \
  for (int64_t r0 = 0; r0 < (m); r0 += kSmallM) { \
    switch (min64(kSmallM, (m) - r0)) {           \
      case 8: CALL(8); break;                     \
      case 7: CALL(7); break;                     \
      case 6: CALL(6); break;                     \
      case 5: CALL(5); break;                     \
      case 4: CALL(4); break;                     \
      case 3: CALL(3); break;                     \
      case 2: CALL(2); break;                     \
      default: CALL(1); break;                    \
    }                                             \
  }

void w8a8_panels(const A8& a, const uint8_t* panels, const float* scale, float* y, int64_t ldy, int64_t n_total,
                 int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = panels + p * (a.k / 4) * 64;
#define RYZEN_W8A8(R) w8a8_panel<R>(a, r0, panel, scale, y, ldy, p * kPanel, n_total)
    RYZEN_BY_ROWS(a.m, RYZEN_W8A8)
#undef RYZEN_W8A8
  }
}

void w4a8_panels(const A8& a, const uint8_t* panels, const float* scale, const float* minimum, int64_t group, float* y,
                 int64_t ldy, int64_t n_total, int64_t p0, int64_t p1) {
  const int64_t groups = a.k / group;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = panels + p * (a.k / 8) * 64;
    const float* sp = scale + p * groups * kPanel;
    const float* mp = minimum + p * groups * kPanel;
#define RYZEN_W4A8(R) w4a8_panel<R>(a, r0, panel, sp, mp, group, y, ldy, p * kPanel, n_total)
    RYZEN_BY_ROWS(a.m, RYZEN_W4A8)
#undef RYZEN_W4A8
  }
}

// ------------------------------------------------------------------------------------------------- attention
float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = lanes(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i), acc);
  }
  return hsum(acc);
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = lanes(n - i);
    _mm512_mask_storeu_ps(y + i, mk, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(mk, x + i), _mm512_maskz_loadu_ps(mk, y + i)));
  }
}

// Cephes' exp polynomial (relative error ~2e-7), 16 lanes at a time.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447505531f));
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF);  // floor (SIMDe 0.7.4 misreads the NO_EXC bit)
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

inline __m512 abs512(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

inline float hmax(__m512 v) {
  const __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs) {
  const int64_t blocks = k / 32;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + r * k + b * 32;
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      const float d = hmax(_mm512_max_ps(abs512(v0), abs512(v1))) / 127.f;
      const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
      int8_t* out = xq + r * k + b * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id))));
      xs[r * blocks + b] = d;
    }
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

float exp_sum(float* p, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j), m));
    _mm512_storeu_ps(p + j, v);
    acc = _mm512_add_ps(acc, v);
  }
  float total = hsum(acc);
  for (; j < n; ++j) {
    p[j] = expf(p[j] - mx);
    total += p[j];
  }
  return total;
}

// Elements e..e+15 of a row as fp32: fp32 values, or int8/int4 codes (0..255 / 0..15) converted.
inline __m512 load16(const uint8_t* codes, const float* values, int64_t e, bool four) {
  if (values != nullptr) return _mm512_loadu_ps(values + e);
  __m128i c;
  if (four) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + e / 2));
    c = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));  // 2i low, 2i+1 high
  } else {
    c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + e));
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
}

void unpack_codes(const uint8_t* row, int64_t d, bool four, float* out) {
  int64_t e = 0;
  for (; e + 16 <= d; e += 16) _mm512_storeu_ps(out + e, load16(row, nullptr, e, four));
  for (; e < d; ++e)
    out[e] = four ? static_cast<float>((row[e >> 1] >> ((e & 1) << 2)) & 15) : static_cast<float>(row[e]);
}

// Scores of one key row for the G query heads that share it: the row read once, one accumulator per head.
template <int G>
void group_scores_g(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs, float* out) {
  __m512 a[G];
  for (int u = 0; u < G; ++u) a[u] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d; e += 16) {
    const __m512 x = load16(codes, keys, e, four);
    for (int u = 0; u < G; ++u) a[u] = _mm512_fmadd_ps(_mm512_loadu_ps(qs + u * d + e), x, a[u]);
  }
  for (int u = 0; u < G; ++u) out[u] = hsum(a[u]);
}

// Blocks of 16 channels outside, the slice's rows inside: G accumulators in registers, stored once per block; each
// element sums its rows in order.
template <int G>
void slice_values_g(const uint8_t* const* codes, const float* const* rows, int64_t n, int64_t d, bool four,
                    const float* w, int64_t gv, float* acc) {
  const int64_t ng = d / gv;
  for (int64_t e = 0; e < d; e += 16) {
    __m512 a[G];
    for (int u = 0; u < G; ++u) a[u] = _mm512_setzero_ps();
    const int64_t v_ = e / gv;
    for (int64_t jj = 0; jj < n; ++jj) {
      const __m512 x = load16(codes[jj], rows[jj], e, four);
      const float* wj = w + (jj * ng + v_) * G;
      for (int u = 0; u < G; ++u) a[u] = _mm512_fmadd_ps(_mm512_set1_ps(wj[u]), x, a[u]);
    }
    for (int u = 0; u < G; ++u) _mm512_storeu_ps(acc + u * d + e, a[u]);
  }
}

// G query heads per kv head as a compile-time constant (SmolLM2: 3; Llama 3 8B: 4; Qwen2.5 0.5B: 7).
#define RYZEN_BY_GROUP(group, CALL) \
  switch (group) {                  \
    case 1: CALL(1); return true;   \
    case 2: CALL(2); return true;   \
    case 3: CALL(3); return true;   \
    case 4: CALL(4); return true;   \
    case 5: CALL(5); return true;   \
    case 6: CALL(6); return true;   \
    case 7: CALL(7); return true;   \
    case 8: CALL(8); return true;   \
    default: return false;          \
  }

bool group_scores(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs, int64_t group,
                  float* out) {
  if (d % 16 != 0) return false;
#define RYZEN_SCORES(G) group_scores_g<G>(codes, keys, d, four, qs, out)
  RYZEN_BY_GROUP(group, RYZEN_SCORES)
#undef RYZEN_SCORES
}

bool slice_values(const uint8_t* const* codes, const float* const* rows, int64_t n, int64_t d, bool four,
                  const float* w, int64_t gv, int64_t group, float* acc) {
  if (d % 16 != 0 || gv % 16 != 0) return false;
#define RYZEN_VALUES(G) slice_values_g<G>(codes, rows, n, d, four, w, gv, acc)
  RYZEN_BY_GROUP(group, RYZEN_VALUES)
#undef RYZEN_VALUES
}

const Kernels kTable = {RYZEN_NAME, w8_rows, w8a8_panels, w4a8_panels, quantize_rows, silu_mul, dot, axpy, exp_sum, unpack_codes, group_scores,
                        slice_values};

}  // namespace

const Kernels* RYZEN_ENTRY() { return &kTable; }
#else
const Kernels* RYZEN_ENTRY() { return nullptr; }
#endif
}  // namespace ryzen
