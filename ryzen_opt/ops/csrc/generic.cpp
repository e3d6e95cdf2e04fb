// The portable path: plain loops, built for the compiler's baseline target. It is the reference the vector paths are
// tested against, the fallback for shapes they have no form for, and the only path off x86.
#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace ryzen {
namespace {

void w8_rows(const float* x, int64_t m, int64_t k, const int8_t* q, const float* scale, float* y, int64_t ldy,
             int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qr = q + n * k;
    for (int64_t r = 0; r < m; ++r) {
      float a = 0.f;
      for (int64_t t = 0; t < k; ++t) a += x[r * k + t] * static_cast<float>(qr[t]);
      y[r * ldy + n] = a * scale[n];
    }
  }
}

void w8a8_panels(const A8& a, const uint8_t* panels, const float* scale, float* y, int64_t ldy, int64_t n_total,
                 int64_t p0, int64_t p1) {
  const int64_t k = a.k, blocks = k / 32, steps = k / 4;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = panels + p * steps * 64;
    for (int64_t j = 0; j < kPanel && p * kPanel + j < n_total; ++j) {
      const int64_t n = p * kPanel + j;
      for (int64_t r = 0; r < a.m; ++r) {
        const int8_t* xr = a.q + r * k;
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          int32_t d = 0;
          for (int64_t s = b * 8; s < b * 8 + 8; ++s)
            for (int i = 0; i < 4; ++i) d += (static_cast<int32_t>(panel[s * 64 + 4 * j + i]) - 128) * xr[4 * s + i];
          acc += static_cast<float>(d) * a.s[r * blocks + b];
        }
        y[r * ldy + n] = acc * scale[n];
      }
    }
  }
}

void w4a8_panels(const A8& a, const uint8_t* panels, const float* scale, const float* minimum, int64_t group, float* y,
                 int64_t ldy, int64_t n_total, int64_t p0, int64_t p1) {
  const int64_t k = a.k, groups = k / group, blocks = k / 32, per = group / 32, steps = k / 8;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = panels + p * steps * 64;
    const float* sp = scale + p * groups * kPanel;
    const float* mp = minimum + p * groups * kPanel;
    for (int64_t j = 0; j < kPanel && p * kPanel + j < n_total; ++j) {
      const int64_t n = p * kPanel + j;
      for (int64_t r = 0; r < a.m; ++r) {
        const int8_t* xr = a.q + r * k;
        float acc = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          int32_t d = 0;
          for (int64_t s = b * 4; s < b * 4 + 4; ++s)
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = panel[s * 64 + 4 * j + i];
              d += static_cast<int32_t>(byte & 15) * xr[8 * s + i] + static_cast<int32_t>(byte >> 4) * xr[8 * s + 4 + i];
            }
          acc += static_cast<float>(d) * (sp[(b / per) * kPanel + j] * a.s[r * blocks + b]);
        }
        for (int64_t g = 0; g < groups; ++g) acc += mp[g * kPanel + j] * a.gsum[r * groups + g];
        y[r * ldy + n] = acc;
      }
    }
  }
}

void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* xq, float* xs) {
  const int64_t blocks = k / 32;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + r * k + b * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(v[j]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int8_t* out = xq + r * k + b * 32;
      for (int j = 0; j < 32; ++j) out[j] = static_cast<int8_t>(nearbyintf(v[j] * id));
      xs[r * blocks + b] = d;
    }
  }
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

float exp_sum(float* p, int64_t n, float mx) {
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = expf(p[j] - mx);
    total += p[j];
  }
  return total;
}

void unpack_codes(const uint8_t* row, int64_t d, bool four, float* out) {
  for (int64_t e = 0; e < d; ++e)
    out[e] = four ? static_cast<float>((row[e >> 1] >> ((e & 1) << 2)) & 15) : static_cast<float>(row[e]);
}

bool group_scores(const uint8_t* codes, const float* keys, int64_t d, bool four, const float* qs, int64_t group,
                  float* out) {
  for (int64_t u = 0; u < group; ++u) {
    float s = 0.f;
    for (int64_t e = 0; e < d; ++e) {
      const float x = keys != nullptr ? keys[e]
                      : four          ? static_cast<float>((codes[e >> 1] >> ((e & 1) << 2)) & 15)
                                      : static_cast<float>(codes[e]);
      s += qs[u * d + e] * x;
    }
    out[u] = s;
  }
  return true;
}

bool slice_values(const uint8_t* const*, const float* const*, int64_t, int64_t, bool, const float*, int64_t, int64_t,
                  float*) {
  return false;  // the glue's row-by-row loop over axpy is the plain form
}

const Kernels kTable = {"scalar", w8_rows, w8a8_panels, w4a8_panels, quantize_rows, silu_mul, dot, axpy, exp_sum, unpack_codes, group_scores,
                        slice_values};

}  // namespace

const Kernels* scalar_kernels() { return &kTable; }

}  // namespace ryzen
