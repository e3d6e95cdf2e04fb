"""Native CPU kernels for weight-only int8 / int4 linears, compiled on first use for the machine at hand.

Why our own kernels (measured on SmolLM2-135M, prose held out from tuning):

- fbgemm's dynamic int8 linear quantizes *activations* per tensor. Real LLMs carry outlier activation channels, so
  one scale per tensor wrecks the prefill (relative top-1 loss 36% on SmolLM2 on an AVX2 CPU, where fbgemm also drops
  to 7-bit activations without VNNI). Weight-only int8 keeps the activations in fp32 and loses nothing measurable.
- ATen's weight-only kernels take bf16 activations (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) and
  bf16 scales; on CPUs without AVX-512 BF16 they also run slowly.

So these kernels compute exactly the dequantized product in fp32, ``y = x @ (q * scale [+ min]).T``, reading the
weights as int8 or packed nibbles (the bytes a decode step streams are the quantized ones), with fp32 scales:

- ``w8_linear(x, q, scale)``: ``q`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``.
- ``w4_linear(x, packed, scale, minimum, group)``: ``packed`` uint8 ``[N, K/2]`` in the layout of
  :func:`ryzen_opt.quant.pack_int4_runs` (in each run of 32 inputs, byte ``j`` holds input ``j`` in its low nibble
  and input ``j + 16`` in its high one, so both halves unpack to contiguous lanes), ``scale``/``minimum`` fp32
  ``[N, K/group]``.

int8 inputs up to 512 rows (decode, speculative verification, prompts) run one kernel in tiles of 3 rows that convert
each weight once per tile; every row is computed in the same order whatever the others are, so a token's logits do
not depend on the batch it is verified in. (Dequantizing the whole matrix to fp32 per call cost ~6 ms per layer for a
32-token prefill.) Longer int8 inputs, and int4 inputs over ``SMALL_M`` rows, dequantize once and call ATen's GEMM.
Both are parallel over output rows with torch's own thread pool
(``torch.set_num_threads`` holds).

**Instruction sets, chosen at run time.** The source has two paths: AVX2 + FMA intrinsics, and plain loops. At first
use :func:`select_isa` reads the CPU's flags and picks the best path it supports, and the extension is built for
exactly that target (``-march=x86-64-v3`` for ``avx2``, ``-march=x86-64`` for ``scalar``, so that the compiler's own
vectorizer cannot slip in instructions the path does not claim). ``RYZEN_OPT_NATIVE_ISA=avx2|scalar`` forces one
(the tests force each); ``RYZEN_OPT_NATIVE=0`` turns the extension off and every caller uses ATen's kernels.
:func:`isa` says which path runs, and the KernelOptimizer's report records it. There is no AVX-512 path yet: an
AVX-512 CPU runs the AVX2 one (it could not be tested on the machines this was written on).

The extension is built with ``torch.utils.cpp_extension`` (g++ and ninja) into torch's extension cache, named by a
hash of the source, the path and torch's version, under a file lock; a machine that cannot build it gets ``None``
from :func:`ops` and a logged reason, and callers fall back to ATen's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from typing import Any

import torch

from ryzen_opt.errors import ConfigError

logger = logging.getLogger(__name__)

SMALL_M = 8  # rows of x at most that take the GEMV path (the speculative decoder verifies at most 8 tokens)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RYZEN_AVX2 1
#endif

static constexpr int64_t kSmallM = SMALL_M_VALUE;
static constexpr int64_t kTileM = 512;

#ifdef RYZEN_AVX2
static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
static inline __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// y[m, n] = scale[n] * sum_k x[m, k] q[n, k], for a tile of R rows of x: each 8 int8 weights are converted once and
// used by the R rows. Every row accumulates in the same order whatever R is (four accumulators over runs of 32, the
// same horizontal sum), so a row's result does not depend on the rows computed with it.
template <int R>
static void w8_tile(const float* x, const int8_t* qr, int64_t k, float* out) {
#ifdef RYZEN_AVX2
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
#else
  for (int r = 0; r < R; ++r) {
    float a = 0.f;
    for (int64_t t = 0; t < k; ++t) a += x[r * k + t] * static_cast<float>(qr[t]);
    out[r] = a;
  }
#endif
}

static void w8_rows(const float* x, int64_t m, const int8_t* q, const float* scale, float* y, int64_t n_total,
                    int64_t k, int64_t n0, int64_t n1) {
  float acc[3];
  // Weight row outermost: a row read from memory serves every tile of x while it sits in L1 (with the tiles
  // outermost, each tile streamed the whole matrix again: 4 rows cost as much as 6).
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * k;
    for (int64_t r0 = 0; r0 < m; r0 += 3) {
      const int64_t rows = std::min<int64_t>(3, m - r0);
      const float* xr = x + r0 * k;
      if (rows == 3) w8_tile<3>(xr, qr, k, acc);
      else if (rows == 2) w8_tile<2>(xr, qr, k, acc);
      else w8_tile<1>(xr, qr, k, acc);
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * n_total + n] = acc[r] * scale[n];
    }
  }
}

// ------------------------------------------------------------------ GEMV on activations quantized per block of 32
// llama.cpp's Q8_0 for activations: each run of 32 inputs of a row becomes int8 with one fp32 scale (max|x| / 127,
// rounded to nearest even). The weight-by-activation products then run in integers (AVX2 maddubs: 32 products in two
// instructions, against four conversions and fmas per 8 in fp32), and one fp32 fma per block applies the scales.

static void quantize_q8_rows(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs) {
  const int64_t blocks = k / 32;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + r * k + b * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int8_t* out = xq + r * k + b * 32;
      for (int j = 0; j < 32; ++j) out[j] = static_cast<int8_t>(std::nearbyint(v[j] * id));
      xs[r * blocks + b] = d;
    }
  }
}

#ifdef RYZEN_AVX2
static inline __m256 block_dot_i8(__m256i w, __m256i x) {  // 8 partial sums of 32 int8 x int8 products, as fp32
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
static inline __m256 block_dot_u4(__m256i w, __m256i x) {  // weights 0..15 are already unsigned
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
#endif

#ifdef RYZEN_AVX2
// R rows of activations against one weight row: each weight block is loaded and made unsigned once for the R rows
// (a verification of several tokens then costs less than that many steps). Each row keeps two accumulators (even and
// odd blocks) and sums them the same way whatever R is, so a row's result does not depend on the rows beside it.
template <int R>
static void w8a8_tile(const int8_t* xq, const float* xs, int64_t k, const int8_t* qr, float* out) {
  const int64_t blocks = k / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + b * 32));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + b * 32 + 32));
    const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = xq + r * k + b * 32;
      const __m256i x0 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr)), w0);
      const __m256i x1 = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32)), w1);
      const __m256 d0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, x0), ones));
      const __m256 d1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a1, x1), ones));
      acc0[r] = _mm256_fmadd_ps(d0, _mm256_set1_ps(xs[r * blocks + b]), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(d1, _mm256_set1_ps(xs[r * blocks + b + 1]), acc1[r]);
    }
  }
  for (; b < blocks; ++b) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + b * 32));
    for (int r = 0; r < R; ++r) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + b * 32));
      acc0[r] = _mm256_fmadd_ps(block_dot_i8(w0, x0), _mm256_set1_ps(xs[r * blocks + b]), acc0[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}
#endif

// y[r, n] = scale[n] * sum_b xs[r, b] * (sum_{i in b} xq[r, i] q[n, i])
static void w8a8_rows(const int8_t* xq, const float* xs, int64_t m, const int8_t* q, const float* scale, float* y,
                      int64_t n_total, int64_t k, int64_t n0, int64_t n1) {
  const int64_t blocks = k / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * k;
#ifdef RYZEN_AVX2
    float acc[4];
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int64_t rows = std::min<int64_t>(4, m - r0);
      const int8_t* xr = xq + r0 * k;
      const float* sr = xs + r0 * blocks;
      if (rows == 4) w8a8_tile<4>(xr, sr, k, qr, acc);
      else if (rows == 3) w8a8_tile<3>(xr, sr, k, qr, acc);
      else if (rows == 2) w8a8_tile<2>(xr, sr, k, qr, acc);
      else w8a8_tile<1>(xr, sr, k, qr, acc);
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * n_total + n] = acc[r] * scale[n];
    }
#else
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* xr = xq + r * k;
      const float* sr = xs + r * blocks;
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t d = 0;
        for (int j = 0; j < 32; ++j) d += static_cast<int32_t>(xr[b * 32 + j]) * static_cast<int32_t>(qr[b * 32 + j]);
        acc += static_cast<float>(d) * sr[b];
      }
      y[r * n_total + n] = acc * scale[n];
    }
#endif
  }
}

// y[r, n] = sum_g scale[n, g] * sum_{b in g} xs[r, b] * (sum_{i in b} xq[r, i] q[n, i]) + minimum[n, g] * xsum[r, g]
// with xsum[r, g] = sum_{b in g} xs[r, b] * sum_{i in b} xq[r, i]
#ifdef RYZEN_AVX2
// R rows against one int4 weight row; the nibbles of each block are unpacked once for the R rows. Per row the
// arithmetic is the same whatever R is (two accumulators, even and odd blocks; the minimum's term eight groups a step).
template <int R>
static void w4a8_tile(const int8_t* xq, const float* xs, const float* xsum, int64_t k, int64_t group,
                      const uint8_t* pr, const float* sg, const float* mg, float* out) {
  const int64_t groups = k / group, blocks = k / 32, per = group / 32;
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + b * 16));
    const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + b * 16 + 16));
    const __m256i w0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b0, 4), b0), low);
    const __m256i w1 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b1, 4), b1), low);
    const float s0 = per == 1 ? sg[b] : sg[b / per], s1 = per == 1 ? sg[b + 1] : sg[(b + 1) / per];
    for (int r = 0; r < R; ++r) {
      const int8_t* xr = xq + r * k + b * 32;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32));
      acc0[r] = _mm256_fmadd_ps(block_dot_u4(w0, x0), _mm256_set1_ps(xs[r * blocks + b] * s0), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(block_dot_u4(w1, x1), _mm256_set1_ps(xs[r * blocks + b + 1] * s1), acc1[r]);
    }
  }
  for (; b < blocks; ++b) {
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + b * 16));
    const __m256i w0 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b0, 4), b0), low);
    for (int r = 0; r < R; ++r) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + b * 32));
      acc0[r] = _mm256_fmadd_ps(block_dot_u4(w0, x0), _mm256_set1_ps(xs[r * blocks + b] * sg[b / per]), acc0[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    // sum_g minimum[g] * xsum[r, g], eight groups a step: as a scalar chain of 18-48 dependent adds it cost as much
    // as the row's whole integer dot product.
    const float* xg = xsum + r * groups;
    __m256 tv = _mm256_setzero_ps();
    int64_t g8 = 0;
    for (; g8 + 8 <= groups; g8 += 8) tv = _mm256_fmadd_ps(_mm256_loadu_ps(mg + g8), _mm256_loadu_ps(xg + g8), tv);
    float tail = hsum(tv);
    for (; g8 < groups; ++g8) tail += mg[g8] * xg[g8];
    out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + tail;
  }
}
#endif

static void w4a8_rows(const int8_t* xq, const float* xs, const float* xsum, int64_t m, const uint8_t* p,
                      const float* scale, const float* minimum, float* y, int64_t n_total, int64_t k, int64_t group,
                      int64_t n0, int64_t n1) {
  const int64_t groups = k / group, blocks = k / 32, per = group / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pr = p + n * (k / 2);
    const float* sg = scale + n * groups;
    const float* mg = minimum + n * groups;
#ifdef RYZEN_AVX2
    float acc[4];
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int64_t rows = std::min<int64_t>(4, m - r0);
      const int8_t* xr = xq + r0 * k;
      const float* sr = xs + r0 * blocks;
      const float* xg = xsum + r0 * groups;
      if (rows == 4) w4a8_tile<4>(xr, sr, xg, k, group, pr, sg, mg, acc);
      else if (rows == 3) w4a8_tile<3>(xr, sr, xg, k, group, pr, sg, mg, acc);
      else if (rows == 2) w4a8_tile<2>(xr, sr, xg, k, group, pr, sg, mg, acc);
      else w4a8_tile<1>(xr, sr, xg, k, group, pr, sg, mg, acc);
      for (int64_t r = 0; r < rows; ++r) y[(r0 + r) * n_total + n] = acc[r];
    }
#else
    for (int64_t r = 0; r < m; ++r) {
      const int8_t* xr = xq + r * k;
      const float* sr = xs + r * blocks;
      const float* xg = xsum + r * groups;
      float tail = 0.f;
      for (int64_t g = 0; g < groups; ++g) tail += mg[g] * xg[g];
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* bytes = pr + b * 16;
        int32_t d = 0;
        for (int j = 0; j < 16; ++j) {
          d += static_cast<int32_t>(bytes[j] & 15) * xr[b * 32 + j] +
               static_cast<int32_t>(bytes[j] >> 4) * xr[b * 32 + 16 + j];
        }
        acc += static_cast<float>(d) * (sr[b] * sg[b / per]);
      }
      y[r * n_total + n] = acc + tail;
    }
#endif
  }
}

std::tuple<torch::Tensor, torch::Tensor> quantize_q8(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) % 32 == 0,
              "quantize_q8: x float32 [M, K] with K a multiple of 32");
  auto xc = x.contiguous();
  auto xq = torch::empty(xc.sizes(), xc.options().dtype(torch::kChar));
  auto xs = torch::empty({xc.size(0), xc.size(1) / 32}, xc.options());
  quantize_q8_rows(xc.data_ptr<float>(), xc.size(0), xc.size(1), xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  return {xq, xs};
}

static int64_t grain(int64_t k) { return std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(k, 1)); }

torch::Tensor w8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && q.scalar_type() == torch::kChar, "w8_linear: x float32, q int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat, "w8_linear: scale float32");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1) && scale.numel() == q.size(0),
              "w8_linear: x [M, K], q [N, K], scale [N]");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  if (m > kTileM) return torch::linear(x, q.to(torch::kFloat) * scale.unsqueeze(1));
  auto xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  auto y = torch::empty({m, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, m <= kSmallM ? grain(k) : 16, [&](int64_t n0, int64_t n1) {
    w8_rows(xp, m, qp, sp, yp, n, k, n0, n1);
  });
  return y;
}

// w8_linear with the activations of up to kSmallM rows rounded to int8 per block of 32 (w8a8_rows); longer inputs,
// or a width that is not a multiple of 32, take w8_linear's fp32 path.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  if (m > kSmallM || k % 32 != 0) return w8_linear(x, q, scale);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && q.scalar_type() == torch::kChar, "w8a8_linear: x float32, q int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat, "w8a8_linear: scale float32");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && k == q.size(1) && scale.numel() == n,
              "w8a8_linear: x [M, K], q [N, K], scale [N]");
  auto xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  auto y = torch::empty({m, n}, x.options());
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<int8_t> xq(m * k);
  std::vector<float> xs(m * (k / 32));
  quantize_q8_rows(xc.data_ptr<float>(), m, k, xq.data(), xs.data());
  at::parallel_for(0, n, grain(k), [&](int64_t n0, int64_t n1) {
    w8a8_rows(xq.data(), xs.data(), m, qp, sp, yp, n, k, n0, n1);
  });
  return y;
}

torch::Tensor w4_dequantize(torch::Tensor packed, torch::Tensor scale, torch::Tensor minimum, int64_t group) {
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  auto b = packed.view({n, k / 32, 16});
  auto q = torch::cat({torch::bitwise_and(b, 15), torch::bitwise_right_shift(b, 4)}, 2).view({n, k}).to(torch::kFloat);
  auto w = q.view({n, k / group, group}) * scale.unsqueeze(2) + minimum.unsqueeze(2);
  return w.view({n, k});
}

torch::Tensor w4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor minimum,
                        int64_t group) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && packed.scalar_type() == torch::kByte,
              "w4_linear: x float32, packed uint8");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(x.dim() == 2 && packed.size(1) * 2 == k && k % 32 == 0 && group % 32 == 0 && k % group == 0,
              "w4_linear: K must be a multiple of 32 and of group (a multiple of 32)");
  if (m > kSmallM) return torch::linear(x, w4_dequantize(packed, scale, minimum, group));
  auto xc = x.contiguous(), pc = packed.contiguous(), sc = scale.contiguous(), mc = minimum.contiguous();
  auto y = torch::empty({m, n}, x.options());
  const float* xp = xc.data_ptr<float>();
  const uint8_t* pp = pc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = k / group, blocks = k / 32;
  std::vector<int8_t> xq(m * k);
  std::vector<float> xqs(m * blocks), xsum(m * groups, 0.f);
  quantize_q8_rows(xp, m, k, xq.data(), xqs.data());
  // The minimum multiplies the sum of the *quantized* inputs (as llama.cpp's Q4_1 x Q8_1 does): the result is then
  // exactly the dequantized weight times the rounded activations. With the exact sum instead, the rounding error
  // meets q * scale (0..15 steps) rather than the weight, and measured 4x larger.
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t total = 0;
      for (int j = 0; j < 32; ++j) total += xq[r * k + b * 32 + j];
      xsum[r * groups + b * 32 / group] += xqs[r * blocks + b] * static_cast<float>(total);
    }
  at::parallel_for(0, n, grain(k / 2), [&](int64_t n0, int64_t n1) {
    w4a8_rows(xq.data(), xqs.data(), xsum.data(), m, pp, sp, mp, yp, n, k, group, n0, n1);
  });
  return y;
}


// ---------------------------------------------------------------------------------------------- one decoder layer
// A Llama-family layer (RMSNorm, fused q|k|v, RoPE, GQA attention over a static cache, o, RMSNorm, fused gate|up,
// SiLU-gated MLP, down) for T <= kSmallM new rows at positions pos .. pos+T-1, in one call: the ~40 small ATen ops
// and Python lines a layer costs per token in eager mode become one dispatch. Every row is computed in the same order
// whatever T is (row-wise norms, the row-independent GEMV kernels, one query row per attention task), so the logits
// of a token do not depend on the rows verified with it.

static torch::Tensor run_linear(int64_t kind, const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c,
                                int64_t group, const torch::Tensor& x) {
  if (kind == 1) return w8_linear(x, a, b);
  if (kind == 2) return w4_linear(x, a, b, c, group);
  if (kind == 3) return w8a8_linear(x, a, b);
  return torch::mm(x, a);  // kind 0: fp32 weight stored transposed [K, N]
}

static void rms_norm_rows(const float* x, const float* w, float eps, int64_t t, int64_t d, float* out) {
  for (int64_t r = 0; r < t; ++r) {
    const float* xr = x + r * d;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = w[i] * (xr[i] * inv);
  }
}

// x[hd] <- x * cos + rotate_half(x) * sin (HF's convention: cos/sin are [hd], the two halves repeated)
static void rope_inplace(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

static inline float dot(const float* a, const float* b, int64_t n) {
#ifdef RYZEN_AVX2
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

static inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef RYZEN_AVX2
  const __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// p[j] = exp(p[j] - mx) in place; returns the sum. AVX2: Cephes' exp polynomial (relative error ~2e-7, as
// std::exp's fp32 rounding), 8 lanes at a time; softmax over thousands of cached positions spent most of its time here.
#ifdef RYZEN_AVX2
static inline __m256 exp256(__m256 x) {
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
#endif

static inline float exp_sum(float* p, int64_t n, float mx) {
  int64_t j = 0;
  float total = 0.f;
#ifdef RYZEN_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, v);
    acc = _mm256_add_ps(acc, v);
  }
  total = hsum(acc);
#endif
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - mx);
    total += p[j];
  }
  return total;
}

// The two halves of a Llama layer around its attention, shared by decode_layer (static cache) and by the lean loop
// with a cache that attends on its own storage (the quantized KV cache): w, kinds and groups as in decode_layer.
// layer_qkv: RMSNorm, q|k|v, RoPE on q and k; returns [T, q + 2 kv] rows.
torch::Tensor layer_qkv(torch::Tensor h, at::TensorList w, at::IntArrayRef kinds, at::IntArrayRef groups,
                        torch::Tensor norm1, double eps1, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                        int64_t kv_heads) {
  TORCH_CHECK(h.scalar_type() == torch::kFloat && h.dim() == 2 && h.is_contiguous(), "layer: h [T, D] fp32");
  TORCH_CHECK(w.size() == 12 && kinds.size() == 4 && groups.size() == 4, "layer: 4 linears x 3 tensors");
  const int64_t t = h.size(0), d = h.size(1);
  TORCH_CHECK(t <= kSmallM, "layer: at most ", kSmallM, " rows");
  const int64_t hd = cos.size(1);
  TORCH_CHECK(cos.size(0) == t, "layer: cos/sin [T, head_dim]");
  auto x = torch::empty_like(h);
  rms_norm_rows(h.data_ptr<float>(), norm1.data_ptr<float>(), static_cast<float>(eps1), t, d, x.data_ptr<float>());
  auto qkv = run_linear(kinds[0], w[0], w[1], w[2], groups[0], x).contiguous();  // [T, q + 2 kv]
  float* qp = qkv.data_ptr<float>();
  const float* cp = cos.contiguous().data_ptr<float>();
  const float* sp = sin.contiguous().data_ptr<float>();
  const int64_t width = qkv.size(1);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t hh = 0; hh < heads + kv_heads; ++hh)
      rope_inplace(qp + r * width + hh * hd, cp + r * hd, sp + r * hd, hd);
  return qkv;
}

// layer_out: h + o(attn), RMSNorm, gate|up, SiLU gating, down, residual; attn is [T, q] rows.
torch::Tensor layer_out(torch::Tensor h, torch::Tensor attn, at::TensorList w, at::IntArrayRef kinds,
                        at::IntArrayRef groups, torch::Tensor norm2, double eps2) {
  TORCH_CHECK(w.size() == 12 && kinds.size() == 4 && groups.size() == 4, "layer: 4 linears x 3 tensors");
  TORCH_CHECK(attn.is_contiguous() && attn.size(0) == h.size(0), "layer: attn [T, q] rows, contiguous");
  const int64_t t = h.size(0), d = h.size(1);
  auto h1 = h + run_linear(kinds[1], w[3], w[4], w[5], groups[1], attn);
  auto x = torch::empty_like(h);
  rms_norm_rows(h1.data_ptr<float>(), norm2.data_ptr<float>(), static_cast<float>(eps2), t, d, x.data_ptr<float>());
  auto gu = run_linear(kinds[2], w[6], w[7], w[8], groups[2], x).contiguous();  // [T, 2 I]
  const int64_t inter = gu.size(1) / 2;
  auto act = torch::empty({t, inter}, h.options());
  const float* gp = gu.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  for (int64_t r = 0; r < t; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gp[r * 2 * inter + i];
      actp[r * inter + i] = g / (1.f + std::exp(-g)) * gp[r * 2 * inter + inter + i];
    }
  h1 += run_linear(kinds[3], w[9], w[10], w[11], groups[3], act);
  return h1;
}

torch::Tensor kv_attend(torch::Tensor q, at::TensorList chunks, int64_t bits, torch::Tensor rk, torch::Tensor rv,
                        double scale);

torch::Tensor decode_layer(torch::Tensor h, at::TensorList w, at::IntArrayRef kinds, at::IntArrayRef groups,
                           torch::Tensor norm1, torch::Tensor norm2, double eps1, double eps2, torch::Tensor k_cache,
                           torch::Tensor v_cache, int64_t pos, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                           int64_t kv_heads, double scale) {
  const int64_t t = h.size(0);
  const int64_t hd = k_cache.size(3), max_len = k_cache.size(2);
  TORCH_CHECK(pos + t <= max_len, "decode_layer: the rows must fit inside the cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat,
              "decode_layer: contiguous fp32 caches [1, kv_heads, max_len, head_dim]");
  TORCH_CHECK(cos.size(1) == hd, "decode_layer: cos/sin [T, head_dim]");
  const int64_t q_size = heads * hd, kv_size = kv_heads * hd;
  auto qkv = layer_qkv(h, w, kinds, groups, norm1, eps1, cos, sin, heads, kv_heads);
  const float* qp = qkv.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t width = q_size + 2 * kv_size;
  for (int64_t r = 0; r < t; ++r) {
    const float* row = qp + r * width;
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::memcpy(kc + (g * max_len + pos + r) * hd, row + q_size + g * hd, hd * sizeof(float));
      std::memcpy(vc + (g * max_len + pos + r) * hd, row + q_size + kv_size + g * hd, hd * sizeof(float));
    }
  }
  // The attention is kv_attend's with no quantized chunks: the filled prefix of the cache is its fp32 rest.
  auto q = qkv.narrow(1, 0, q_size).view({t, heads, hd}).transpose(0, 1).contiguous();
  auto keys = k_cache[0].narrow(1, 0, pos + t), values = v_cache[0].narrow(1, 0, pos + t);
  auto attn = kv_attend(q, {}, 8, keys, values, scale).transpose(0, 1).reshape({t, q_size}).contiguous();
  return layer_out(h, attn, w, kinds, groups, norm2, eps2);
}

// Which path this build compiled: the ISA the Python side asked for, as the compiler saw it.
static std::string built_isa() {
#ifdef RYZEN_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

// Attention of q [Hq, T, D] over a KIVI-quantized KV cache read in its stored form, plus full-precision rest keys
// and values [Hk, R, D] (the residual window, then the T new tokens: new token i sees the rest up to R - T + i).
// chunks: 6 tensors per entry of G tokens (G may differ between entries), batch dimension dropped:
//   kq [Hk, G, D] uint8 (int4: [Hk, G, D/2], two a byte, element 2i low), k_scale, k_lo [Hk, KG, D] (per channel,
//   one row per key group of G / KG tokens, the same in every entry); vq like kq, v_scale, v_lo [Hk, G, NG, 1] (per
//   token, NG groups of D/NG channels). Rows are contiguous; heads may be further apart (views into merged chunks).
// A score is q . (kq * ks + kl) = (q * ks) . kq + q . kl, so keys are never dequantized; values accumulate as
// p * vs * vq + p * vl per group. Each stored row is unpacked once for all the query heads that share its kv head.
// Parallel as flash-decoding: tasks are (kv head, query row, slice of the tokens); each keeps its own max, sum and
// accumulator, merged at the end (exact softmax up to fp32 rounding).
#ifdef RYZEN_AVX2
// Elements e..e+15 of a row as two fp32 vectors: fp32 values, or int8/int4 codes (0..255 / 0..15) converted.
static inline void load16(const uint8_t* codes, const float* values, int64_t e, bool four, __m256& x0, __m256& x1) {
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
#endif

static inline void unpack_codes(const uint8_t* row, int64_t d, bool four, float* out) {
  int64_t e = 0;
#ifdef RYZEN_AVX2
  for (; e + 16 <= d; e += 16) {
    __m256 x0, x1;
    load16(row, nullptr, e, four, x0, x1);
    _mm256_storeu_ps(out + e, x0);
    _mm256_storeu_ps(out + e + 8, x1);
  }
#endif
  for (; e < d; ++e)
    out[e] = four ? static_cast<float>((row[e >> 1] >> ((e & 1) << 2)) & 15) : static_cast<float>(row[e]);
}

#ifdef RYZEN_AVX2
// acc[u] = sum over the slice's rows jj of w[(jj * ng + e / gv) * G + u] * row_jj (codes unpacked in registers, or
// fp32 rows), for the G heads. Blocks of 16 channels outside, rows inside: the 2G accumulators stay in registers
// for the whole slice and are stored once, where a row-by-row update would load and store every block every row.
// Each element still sums its rows in order lo..hi, so a row's bits do not depend on the rows beside it.
template <int G>
static inline void slice_values_g(const uint8_t* const* codes, const float* const* rows, int64_t n, int64_t d,
                                  bool four, const float* w, int64_t gv, float* acc) {
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

// Scores of one key row for the G query heads that share it: out[u] = qs[u] . row, the row read once (unpacked from
// its codes in registers). G is a compile-time constant, so the 2G accumulators stay in registers (a runtime count
// spilled them to the stack, one store per FMA); two per head halve the FMA chain. (A tree of horizontal adds over
// 8 rows in place of the per-row hsum measured no faster: out-of-order execution hides the hsum.)
template <int G>
static inline void group_scores_g(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs,
                                  float* out) {
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
#endif

// out[u] = qs[u] . row for the group's heads (any group and shape; the scalar build).
static inline void group_scores(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs,
                                int64_t group, float* out) {
#ifdef RYZEN_AVX2
  if (d % 16 == 0) {
    switch (group) {
      case 1: return group_scores_g<1>(codes, keys, d, four, qs, out);
      case 2: return group_scores_g<2>(codes, keys, d, four, qs, out);
      case 3: return group_scores_g<3>(codes, keys, d, four, qs, out);
      case 4: return group_scores_g<4>(codes, keys, d, four, qs, out);
      case 5: return group_scores_g<5>(codes, keys, d, four, qs, out);
      case 6: return group_scores_g<6>(codes, keys, d, four, qs, out);
      default: break;
    }
  }
#endif
  std::vector<float> row(d);
  if (keys == nullptr) unpack_codes(codes, d, four, row.data());
  const float* x = keys != nullptr ? keys : row.data();
  for (int64_t u = 0; u < group; ++u) out[u] = dot(qs + u * d, x, d);
}

// acc = sum over rows of w * row as slice_values_g; false where no vector path fits (the caller goes row by row).
static inline bool slice_values(const uint8_t* const* codes, const float* const* rows, int64_t n, int64_t d,
                                bool four, const float* w, int64_t gv, int64_t group, float* acc) {
#ifdef RYZEN_AVX2
  if (d % 16 == 0 && gv % 16 == 0) {
    switch (group) {
      case 1: slice_values_g<1>(codes, rows, n, d, four, w, gv, acc); return true;
      case 2: slice_values_g<2>(codes, rows, n, d, four, w, gv, acc); return true;
      case 3: slice_values_g<3>(codes, rows, n, d, four, w, gv, acc); return true;
      case 4: slice_values_g<4>(codes, rows, n, d, four, w, gv, acc); return true;
      case 5: slice_values_g<5>(codes, rows, n, d, four, w, gv, acc); return true;
      case 6: slice_values_g<6>(codes, rows, n, d, four, w, gv, acc); return true;
      default: break;
    }
  }
#endif
  (void)codes, (void)rows, (void)n, (void)d, (void)four, (void)w, (void)gv, (void)group, (void)acc;
  return false;
}

// acc[u] += w[u] * scale_of(e) * row for one row (the generic path), the value scale changing every gv channels.
static inline void group_values(const uint8_t* codes, const float* values, int64_t d, bool four, const float* w,
                                const float* scales, int64_t gv, int64_t group, float* acc) {
  std::vector<float> row(d);
  if (values == nullptr) unpack_codes(codes, d, four, row.data());
  const float* x = values != nullptr ? values : row.data();
  for (int64_t u = 0; u < group; ++u)
    for (int64_t v_ = 0; v_ < d / gv; ++v_)
      axpy(w[u] * (scales != nullptr ? scales[v_] : 1.f), x + v_ * gv, acc + u * d + v_ * gv, gv);
}

torch::Tensor kv_attend(torch::Tensor q, at::TensorList chunks, int64_t bits, torch::Tensor rk, torch::Tensor rv,
                        double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous(), "kv_attend: q [Hq, T, D] fp32");
  TORCH_CHECK(rk.dim() == 3 && rk.scalar_type() == torch::kFloat && rv.scalar_type() == torch::kFloat &&
                  rk.stride(2) == 1 && rv.stride(2) == 1 && rk.stride(1) == rk.size(2) &&
                  rv.stride(1) == rv.size(2) && rk.stride(0) == rv.stride(0),
              "kv_attend: rest keys/values [Hk, R, D] fp32, rows contiguous (a head may be a cache's prefix)");
  TORCH_CHECK(chunks.size() % 6 == 0, "kv_attend: 6 tensors per chunk");
  TORCH_CHECK(bits == 8 || bits == 4, "kv_attend: bits 8 or 4");
  const int64_t hq = q.size(0), t = q.size(1), d = q.size(2), hk = rk.size(0), r = rk.size(1);
  TORCH_CHECK(hq % hk == 0 && r >= t && rk.size(2) == d, "kv_attend: shapes");
  const int64_t n_chunks = static_cast<int64_t>(chunks.size()) / 6;
  // An entry holds its tokens in key-scale groups of gk tokens (the same gk for all): one group per entry (a chunk
  // list), or several (chunks merged into one buffer, so that a long cache passes a few tensors, not hundreds).
  const int64_t gk = n_chunks ? chunks[0].size(1) / chunks[1].size(1) : 1;
  const int64_t ng = n_chunks ? chunks[4].size(2) : 1;
  const int64_t gv = d / ng;
  const bool four = bits == 4;
  const int64_t row_bytes = four ? d / 2 : d;
  std::vector<const uint8_t*> kq(n_chunks), vq(n_chunks);
  std::vector<const float*> ks(n_chunks), kl(n_chunks), vs(n_chunks), vl(n_chunks);
  std::vector<int64_t> kq_hs(n_chunks), ks_hs(n_chunks), vq_hs(n_chunks), vs_hs(n_chunks), off(n_chunks + 1, 0);
  std::vector<int32_t> entry_of;  // key group -> entry
  for (int64_t c = 0; c < n_chunks; ++c) {
    const auto& cq = chunks[c * 6];
    const auto& cs = chunks[c * 6 + 1];
    const auto& cvq = chunks[c * 6 + 3];
    const auto& cvs = chunks[c * 6 + 4];
    for (int64_t i = 0; i < 6; ++i) TORCH_CHECK(chunks[c * 6 + i].size(0) == hk, "kv_attend: chunk tensors [Hk, ...]");
    TORCH_CHECK(cq.scalar_type() == torch::kUInt8 && cvq.scalar_type() == torch::kUInt8 && cq.sizes() == cvq.sizes() &&
                    cq.size(2) == row_bytes && cq.stride(2) == 1 && cq.stride(1) == row_bytes &&
                    cvq.stride(2) == 1 && cvq.stride(1) == row_bytes,
                "kv_attend: chunk codes [Hk, G, row bytes] uint8, rows contiguous");
    TORCH_CHECK(cs.sizes() == chunks[c * 6 + 2].sizes() && cs.strides() == chunks[c * 6 + 2].strides() &&
                    cs.size(1) * gk == cq.size(1) && cs.size(2) == d && cs.stride(2) == 1 && cs.stride(1) == d &&
                    cs.scalar_type() == torch::kFloat,
                "kv_attend: key scales/lows [Hk, key groups, D] fp32, the same tokens per key group in every entry");
    TORCH_CHECK(cvs.sizes() == chunks[c * 6 + 5].sizes() && cvs.strides() == chunks[c * 6 + 5].strides() &&
                    cvs.dim() == 4 && cvs.size(1) == cq.size(1) && cvs.size(2) == ng && cvs.size(3) == 1 &&
                    cvs.stride(1) == ng && cvs.stride(2) == 1 && cvs.scalar_type() == torch::kFloat,
                "kv_attend: value scales/lows [Hk, G, NG, 1] fp32");
    kq[c] = cq.data_ptr<uint8_t>();
    ks[c] = cs.data_ptr<float>();
    kl[c] = chunks[c * 6 + 2].data_ptr<float>();
    vq[c] = cvq.data_ptr<uint8_t>();
    vs[c] = cvs.data_ptr<float>();
    vl[c] = chunks[c * 6 + 5].data_ptr<float>();
    kq_hs[c] = cq.stride(0), ks_hs[c] = cs.stride(0), vq_hs[c] = cvq.stride(0), vs_hs[c] = cvs.stride(0);
    off[c + 1] = off[c] + cq.size(1);
    entry_of.insert(entry_of.end(), cs.size(1), static_cast<int32_t>(c));
  }
  const int64_t stored = off[n_chunks], group = hq / hk;
  TORCH_CHECK(group <= 64, "kv_attend: at most 64 query heads per kv head");
  // Slices of kSlice tokens at fixed absolute positions (stored, then the fp32 rest); a query row's slices past what
  // it may see are empty. Fixed boundaries keep a row's sums in one order however many rows come with it, so a token
  // verified with others gets the bits of a one-token step (greedy speculative decoding stays lossless).
  constexpr int64_t kSlice = 64;
  const int64_t total = stored + r;
  const int64_t slices = std::max<int64_t>(1, (total + kSlice - 1) / kSlice);
  const int64_t tasks = hk * t * slices;
  std::vector<float> part_m(tasks * group), part_l(tasks * group), part_acc(tasks * group * d);
  const float* qp = q.data_ptr<float>();
  const float* rkp = rk.data_ptr<float>();
  const float* rvp = rv.data_ptr<float>();
  const int64_t rs = rk.stride(0);  // between heads: R * D, or max_len * D for a static cache's filled prefix
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, tasks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qs(group * d), base(group), p(group * kSlice), lsum(group * ng),
        qall(group * d), wv(kSlice * ng * group);
    std::vector<const uint8_t*> vcodes(kSlice);
    std::vector<const float*> vrows(kSlice);
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t kv = task / (t * slices), i = (task / slices) % t, slice = task % slices;
      const int64_t lo = slice * kSlice;
      const int64_t hi = std::min(std::min(lo + kSlice, total), stored + r - t + i + 1);
      const int64_t n = std::max<int64_t>(0, hi - lo);
      const float* qrow[64];
      for (int64_t u = 0; u < group; ++u) {
        qrow[u] = qp + ((kv * group + u) * t + i) * d;
        std::memcpy(qall.data() + u * d, qrow[u], d * sizeof(float));  // the group's queries side by side
      }
      float* ps = p.data();
      // scores
      int64_t key_group = -1;
      float su[64];
      for (int64_t j = lo; j < hi; ++j) {
        if (j < stored) {
          const int64_t c = entry_of[j / gk], at_j = j - off[c];
          if (j / gk != key_group) {  // q * k_scale and q . k_lo of this key group
            key_group = j / gk;
            const int64_t at = kv * ks_hs[c] + (at_j / gk) * d;
            for (int64_t u = 0; u < group; ++u) {
              const float* s_ = ks[c] + at;
              for (int64_t e = 0; e < d; ++e) qs[u * d + e] = qrow[u][e] * s_[e];
              base[u] = dot(qrow[u], kl[c] + at, d);
            }
          }
          group_scores(kq[c] + kv * kq_hs[c] + at_j * row_bytes, nullptr, d, four, qs.data(), group, su);
          for (int64_t u = 0; u < group; ++u) ps[u * n + j - lo] = (base[u] + su[u]) * sc;
        } else {
          group_scores(nullptr, rkp + kv * rs + (j - stored) * d, d, four, qall.data(), group, su);
          for (int64_t u = 0; u < group; ++u) ps[u * n + j - lo] = su[u] * sc;
        }
      }
      // softmax pieces
      for (int64_t u = 0; u < group; ++u) {
        float* pu = ps + u * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, pu[j]);
        part_m[task * group + u] = mx;
        part_l[task * group + u] = n ? exp_sum(pu, n, mx) : 0.f;
      }
      // values: the weights of each row (p, times the row's value scale of each channel group), then the sums
      float* acc = part_acc.data() + task * group * d;
      std::fill(lsum.begin(), lsum.end(), 0.f);
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t jj = j - lo;
        float* wj = wv.data() + jj * ng * group;
        if (j < stored) {
          const int64_t c = entry_of[j / gk], at_j = j - off[c];
          const float* s_ = vs[c] + kv * vs_hs[c] + at_j * ng;
          const float* l_ = vl[c] + kv * vs_hs[c] + at_j * ng;
          vcodes[jj] = vq[c] + kv * vq_hs[c] + at_j * row_bytes;
          vrows[jj] = nullptr;
          for (int64_t v_ = 0; v_ < ng; ++v_)
            for (int64_t u = 0; u < group; ++u) {
              wj[v_ * group + u] = ps[u * n + jj] * s_[v_];
              lsum[u * ng + v_] += ps[u * n + jj] * l_[v_];  // added once, below
            }
        } else {
          vcodes[jj] = nullptr;
          vrows[jj] = rvp + kv * rs + (j - stored) * d;
          for (int64_t v_ = 0; v_ < ng; ++v_)
            for (int64_t u = 0; u < group; ++u) wj[v_ * group + u] = ps[u * n + jj];
        }
      }
      if (!slice_values(vcodes.data(), vrows.data(), n, d, four, wv.data(), gv, group, acc)) {
        std::fill(acc, acc + group * d, 0.f);
        float wu[64];
        for (int64_t jj = 0; jj < n; ++jj) {
          for (int64_t u = 0; u < group; ++u) wu[u] = ps[u * n + jj];
          const int64_t j = lo + jj;
          const int64_t c = j < stored ? entry_of[j / gk] : 0;
          const float* s_ = vcodes[jj] != nullptr ? vs[c] + kv * vs_hs[c] + (j - off[c]) * ng : nullptr;
          group_values(vcodes[jj], vrows[jj], d, four, wu, s_, gv, group, acc);
        }
      }
      for (int64_t u = 0; u < group; ++u)
        for (int64_t e = 0; e < d; ++e) acc[u * d + e] += lsum[u * ng + e / gv];
    }
  });
  auto out = torch::empty_like(q);
  float* op = out.data_ptr<float>();
  for (int64_t kv = 0; kv < hk; ++kv)
    for (int64_t i = 0; i < t; ++i)
      for (int64_t u = 0; u < group; ++u) {
        const int64_t first = (kv * t + i) * slices;
        float mx = -INFINITY;
        for (int64_t s_ = 0; s_ < slices; ++s_) mx = std::max(mx, part_m[(first + s_) * group + u]);
        float total = 0.f;
        float* o = op + ((kv * group + u) * t + i) * d;
        std::fill(o, o + d, 0.f);
        for (int64_t s_ = 0; s_ < slices; ++s_) {
          const float l = part_l[(first + s_) * group + u];
          if (l == 0.f) continue;
          const float w = std::exp(part_m[(first + s_) * group + u] - mx);
          total += w * l;
          axpy(w, part_acc.data() + ((first + s_) * group + u) * d, o, d);
        }
        for (int64_t e = 0; e < d; ++e) o[e] /= total;
      }
  return out;
}

// One Llama layer over a KIVI-quantized KV cache, in one call: layer_qkv, then kv_attend over the stored chunks and
// the residual window with the new tokens appended, then layer_out. Returns the layer's output and the grown residual
// keys and values [Hk, R + T, D], which the cache keeps (it quantizes them into chunks when the window overflows).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> decode_layer_kv(
    torch::Tensor h, at::TensorList w, at::IntArrayRef kinds, at::IntArrayRef groups, torch::Tensor norm1,
    torch::Tensor norm2, double eps1, double eps2, at::TensorList chunks, int64_t bits, torch::Tensor res_k,
    torch::Tensor res_v, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t kv_heads, double scale) {
  const int64_t t = h.size(0), hd = cos.size(1);
  const int64_t q_size = heads * hd, kv_size = kv_heads * hd;
  auto qkv = layer_qkv(h, w, kinds, groups, norm1, eps1, cos, sin, heads, kv_heads);
  auto q = qkv.narrow(1, 0, q_size).view({t, heads, hd}).transpose(0, 1).contiguous();
  auto k = qkv.narrow(1, q_size, kv_size).view({t, kv_heads, hd}).transpose(0, 1);
  auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({t, kv_heads, hd}).transpose(0, 1);
  auto rest_k = torch::cat({res_k, k}, 1).contiguous();
  auto rest_v = torch::cat({res_v, v}, 1).contiguous();
  auto attn = kv_attend(q, chunks, bits, rest_k, rest_v, scale).transpose(0, 1).reshape({t, q_size}).contiguous();
  return {layer_out(h, attn, w, kinds, groups, norm2, eps2), rest_k, rest_v};
}

TORCH_LIBRARY(ryzen_native, m) {
  m.def("built_isa() -> str", &built_isa);
  m.def("kv_attend(Tensor q, Tensor[] chunks, int bits, Tensor rk, Tensor rv, float scale) -> Tensor");
  m.def(
      "layer_qkv(Tensor h, Tensor[] w, int[] kinds, int[] groups, Tensor norm1, float eps1, Tensor cos, Tensor sin, "
      "int heads, int kv_heads) -> Tensor");
  m.def(
      "layer_out(Tensor h, Tensor attn, Tensor[] w, int[] kinds, int[] groups, Tensor norm2, float eps2) -> Tensor");
  m.def(
      "decode_layer_kv(Tensor h, Tensor[] w, int[] kinds, int[] groups, Tensor norm1, Tensor norm2, float eps1, "
      "float eps2, Tensor[] chunks, int bits, Tensor res_k, Tensor res_v, Tensor cos, Tensor sin, int heads, "
      "int kv_heads, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("w8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("w4_linear(Tensor x, Tensor packed, Tensor scale, Tensor minimum, int group) -> Tensor");
  m.def("w4_dequantize(Tensor packed, Tensor scale, Tensor minimum, int group) -> Tensor");
  m.def("quantize_q8(Tensor x) -> (Tensor, Tensor)");
  m.def("w8a8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def(
      "decode_layer(Tensor h, Tensor[] w, int[] kinds, int[] groups, Tensor norm1, Tensor norm2, float eps1, "
      "float eps2, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, Tensor cos, Tensor sin, int heads, "
      "int kv_heads, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(ryzen_native, CPU, m) {
  m.impl("w8_linear", &w8_linear);
  m.impl("w4_linear", &w4_linear);
  m.impl("w4_dequantize", &w4_dequantize);
  m.impl("decode_layer", &decode_layer);
  m.impl("quantize_q8", &quantize_q8);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("kv_attend", &kv_attend);
  m.impl("layer_qkv", &layer_qkv);
  m.impl("layer_out", &layer_out);
  m.impl("decode_layer_kv", &decode_layer_kv);
}
"""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


# The paths this source implements, best first: (name, CPU flags it needs, compiler flags on x86-64).
ISAS: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("avx2", frozenset({"avx2", "fma"}), ("-march=x86-64-v3", "-mtune=native")),
    ("scalar", frozenset(), ("-march=x86-64", "-mtune=generic")),
)
ISA_NAMES = tuple(name for name, _, _ in ISAS)


def select_isa(flags: set[str], forced: str | None = None) -> str:
    """The path to build for a CPU with ``flags`` (``/proc/cpuinfo``'s words): ``forced`` when the CPU supports it,
    else the best one it supports.

    Raises:
        ConfigError: ``forced`` is not a path this source has, or needs flags the CPU lacks (it would crash with an
            illegal instruction).
    """
    if forced in (None, "", "auto"):
        return next(name for name, needs, _ in ISAS if needs <= flags)
    table = {name: needs for name, needs, _ in ISAS}
    if forced not in table:
        raise ConfigError(
            f"RYZEN_OPT_NATIVE_ISA={forced!r}: the native kernels have the paths {', '.join(ISA_NAMES)} (or 'auto')"
            + ("; AVX-512 CPUs run the avx2 one" if str(forced).startswith("avx512") else "")
        )
    missing = table[forced] - flags
    if missing:
        raise ConfigError(
            f"RYZEN_OPT_NATIVE_ISA={forced!r} needs CPU flags {sorted(missing)} this CPU lacks; "
            f"unset it, or choose one of {[n for n, needs, _ in ISAS if needs <= flags]}"
        )
    return str(forced)


def _compile_flags(isa: str) -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []  # the intrinsics are x86's: elsewhere only the plain loops exist, built for the host's defaults
    return list(next(flags for name, _, flags in ISAS if name == isa))


def _source() -> str:
    return _SOURCE.replace("SMALL_M_VALUE", str(SMALL_M))


def isa() -> str | None:
    """The instruction-set path the native kernels run (``"avx2"``, ``"scalar"``), or ``None`` when ATen's kernels
    run instead (no extension: see :func:`ops`)."""
    return _loaded()[1]


def preferred() -> bool:
    """Whether callers should choose the native kernels over ATen's by default: a vectorized path is built, or the
    user forced a path (``RYZEN_OPT_NATIVE_ISA``). The plain-loop path alone runs SmolLM2's int8 and int4 decode about
    2x slower than ATen's kernels (2 threads): it serves correctness tests and explicit requests, not the default."""
    if ops() is None:
        return False
    return isa() != "scalar" or os.environ.get("RYZEN_OPT_NATIVE_ISA", "auto") not in ("", "auto")


def ops() -> Any | None:
    """``torch.ops.ryzen_native`` once the extension is built and loaded; ``None`` (and a logged reason) if this
    machine cannot build it (no compiler, no ninja, ``RYZEN_OPT_NATIVE=0``)."""
    return _loaded()[0]


@functools.cache
def _loaded() -> tuple[Any | None, str | None]:
    if os.environ.get("RYZEN_OPT_NATIVE", "1") == "0":
        logger.info("native kernels disabled (RYZEN_OPT_NATIVE=0)")
        return None, None
    # A path the CPU cannot run is the user's error, raised: falling back silently would hide it.
    chosen = select_isa(set(_cpu_flags().split()), os.environ.get("RYZEN_OPT_NATIVE_ISA"))
    from torch.utils import cpp_extension

    from ryzen_opt.locking import file_lock

    source = _source()
    flags = _compile_flags(chosen)
    key = hashlib.sha256((source + " ".join(flags) + torch.__version__ + "openmp").encode()).hexdigest()[:12]
    name = f"ryzen_native_{chosen}_{key}"
    build_dir = os.path.join(cpp_extension._get_build_directory(name, verbose=False))
    start = time.perf_counter()
    try:
        with file_lock(os.path.join(os.path.dirname(build_dir), f"{name}.lock")):
            cpp_extension.load_inline(
                name=name,
                cpp_sources=[source],
                # -fopenmp: at::parallel_for is inline, and runs serially unless this file is built with OpenMP.
                extra_cflags=["-O3", *flags, "-fno-math-errno", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                build_directory=build_dir,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use ATen's kernels, and say why
        logger.warning("native kernels unavailable, using ATen's (%s: %s)", type(exc).__name__, exc)
        return None, None
    built = torch.ops.ryzen_native.built_isa()
    if built != chosen and _compile_flags(chosen):
        logger.warning("native kernels: asked for the %s path, the compiler built %s; using ATen's", chosen, built)
        return None, None
    _register_fakes()
    logger.info("native kernels %s (%s path) ready in %.1f s", name, chosen, time.perf_counter() - start)
    return torch.ops.ryzen_native, chosen


def _register_fakes() -> None:
    """Output shapes for ``torch.compile``: to the compiler each kernel is one opaque op."""

    def linear_fake(x: torch.Tensor, weight: torch.Tensor, *args: Any) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    def dequantize_fake(packed: torch.Tensor, *args: Any) -> torch.Tensor:
        return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)

    torch.library.register_fake("ryzen_native::w8_linear", linear_fake)
    torch.library.register_fake("ryzen_native::w8a8_linear", linear_fake)
    torch.library.register_fake("ryzen_native::w4_linear", linear_fake)
    torch.library.register_fake("ryzen_native::w4_dequantize", dequantize_fake)
