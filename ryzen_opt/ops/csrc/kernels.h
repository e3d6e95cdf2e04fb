// The primitives every instruction-set path of ryzen_native implements, as a table of plain functions.
//
// Why a table and plain pointers: each path lives in a file of its own, compiled for its own target
// (`#pragma GCC target`), and the extension picks one table at run time from the CPU's flags. Nothing here touches
// torch, and every helper a path defines has internal linkage, so no inline function compiled for AVX-512 can be
// merged by the linker into code that runs on a CPU without it. The torch-facing glue (ops.cpp) owns allocation,
// threading (at::parallel_for over output rows) and shapes; a path only computes.
//
// Row independence, the contract every path keeps: a row of activations is computed in the same order whatever the
// other rows are (its own accumulators, the same horizontal sums), so a token verified together with others gets
// the bits of a one-token step, and greedy speculative decoding stays the target's own.
#pragma once

#include <cstdint>

namespace ryzen {

constexpr int64_t kSmallM = 8;  // rows at most that the fused layer takes, and the integer GEMVs' row tile
constexpr int64_t kPanel = 16;  // output rows per weight panel

// Activations of m rows rounded to int8 per block of 32 (llama.cpp's Q8_0), with the forms the paths read.
struct A8 {
  const int8_t* q;     // [m, k] codes, -127..127
  const float* s;      // [m, k/32] block scales, max|x| / 127
  const float* gsum;   // [m, k/group] sum over each weight group of s * (sum of the block's codes); int4 only
  const float* total;  // [m] 128 * sum over blocks of s * (sum of the block's codes); for unsigned-weight dots
  int64_t m, k;
};

struct Kernels {
  const char* name;
  // y[r * ldy + n] = scale[n] * sum_i x[r, i] q[n, i] for n in [n0, n1): fp32 activations, int8 weights [N, k].
  void (*w8_rows)(const float* x, int64_t m, int64_t k, const int8_t* q, const float* scale, float* y, int64_t ldy,
                  int64_t n0, int64_t n1);
  // The integer GEMVs read weights in panels of 16 output rows (ryzen_opt.quant.pack_int8_panels and
  // pack_int4_panels): they write y[r * ldy + n] for every row r of a and the outputs n < n_total of panels [p0, p1).
  // int8: y[r, n] = scale[n] * sum_b s[r, b] * (sum_{i in b} xq[r, i] q[n, i]), panels of q + 128.
  void (*w8a8_panels)(const A8& a, const uint8_t* panels, const float* scale, float* y, int64_t ldy, int64_t n_total,
                      int64_t p0, int64_t p1);
  // int4: y[r, n] = sum_b scale[n, g(b)] s[r, b] (sum_{i in b} xq[r, i] c[n, i]) + sum_g minimum[n, g] gsum[r, g],
  // codes c 0..15; scale and minimum in panels too (pack_group_panels: [panels, groups, 16]).
  void (*w4a8_panels)(const A8& a, const uint8_t* panels, const float* scale, const float* minimum, int64_t group,
                      float* y, int64_t ldy, int64_t n_total, int64_t p0, int64_t p1);
  // Each run of 32 inputs of a row to int8 with one fp32 scale: d = max|x| / 127, q = round-half-even(x * (1 / d)).
  // Bit-exact on every path (the same fp32 operations; the vector paths round with the default MXCSR mode).
  void (*quantize_rows)(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs);
  // out[i] = silu(gate[i]) * up[i]
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float alpha, const float* x, float* y, int64_t n);
  // p[j] = exp(p[j] - mx) in place; returns the sum
  float (*exp_sum)(float* p, int64_t n, float mx);
  // a row of d KV-cache codes (uint8, or int4 two a byte, element 2i low) as fp32
  void (*unpack_codes)(const uint8_t* row, int64_t d, bool four, float* out);
  // out[u] = qs[u * d ..] . row for the group's query heads; the row is codes or fp32 keys. False where the path has
  // no form for this shape: the caller uses the scalar path's.
  bool (*group_scores)(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs, int64_t group,
                       float* out);
  // acc[u * d + e] = sum_jj w[(jj * (d / gv) + e / gv) * group + u] * row_jj[e] over n rows (codes or fp32 rows).
  // False where the path has no form for this shape: the caller goes row by row with axpy.
  bool (*slice_values)(const uint8_t* const* codes, const float* const* rows, int64_t n, int64_t d, bool four,
                       const float* w, int64_t gv, int64_t group, float* acc);
};

// Each path's table; nullptr where this build has no such path (not x86, or built without SIMDe).
const Kernels* scalar_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
const Kernels* avx512vnni_kernels();
const Kernels* avx2_simde_kernels();
const Kernels* avx512_simde_kernels();
const Kernels* avx512vnni_simde_kernels();

}  // namespace ryzen
