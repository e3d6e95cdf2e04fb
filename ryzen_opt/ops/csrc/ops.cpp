// ryzen_native: the torch operators. This file owns shapes, checks, allocation and threading; the arithmetic of each
// instruction-set path is a table of plain functions (kernels.h) chosen at run time with use_isa, which
// ryzen_opt.native calls once from the CPU's flags (or from RYZEN_OPT_NATIVE_ISA) and the tests call for each path.
//
// Operators (schemas in TORCH_LIBRARY below; fake kernels for torch.compile in ryzen_opt/native.py):
//   w8_linear      int8 weights [N, K], fp32 activations: the exact dequantized product, up to kTileM rows
//   w8a8_linear    int8 weights in panels of 16 rows, activations rounded to int8 per block of 32 (Q8_0 x Q8_0)
//   w4_linear      int4 weights in panels, groups of a multiple of 32, activations as w8a8_linear's (Q4_1 x Q8_1)
//   decode_layer   one Llama-family layer over a static fp32 cache, for up to kSmallM new rows
//   layer_qkv / layer_out / decode_layer_kv   the same layer around a KIVI-quantized cache's own attention
//   kv_attend      attention over quantized KV codes (never dequantized) plus an fp32 rest
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace ryzen {
#ifndef RYZEN_WITH_SIMDE
// Built without SIMDe (no libsimde-dev): the emulated paths do not exist in this build.
const Kernels* avx2_simde_kernels() { return nullptr; }
const Kernels* avx512_simde_kernels() { return nullptr; }
const Kernels* avx512vnni_simde_kernels() { return nullptr; }
#endif
}  // namespace ryzen

namespace {

using ryzen::kSmallM;
constexpr int64_t kTileM = 512;

const ryzen::Kernels* all_tables[] = {
    ryzen::avx512vnni_kernels(),       ryzen::avx512_kernels(),       ryzen::avx2_kernels(),
    ryzen::scalar_kernels(),           ryzen::avx512vnni_simde_kernels(), ryzen::avx512_simde_kernels(),
    ryzen::avx2_simde_kernels(),
};
const ryzen::Kernels* current = ryzen::scalar_kernels();

// The paths this build holds, comma-separated (the CPU may lack some: ryzen_opt.native decides which may run).
std::string isas() {
  std::string out;
  for (const auto* t : all_tables)
    if (t != nullptr) out += (out.empty() ? "" : ",") + std::string(t->name);
  return out;
}

std::string use_isa(const std::string& name) {
  for (const auto* t : all_tables)
    if (t != nullptr && name == t->name) {
      current = t;
      return name;
    }
  TORCH_CHECK(false, "ryzen_native: this build has no path '", name, "' (it has: ", isas(), ")");
}

std::string isa() { return current->name; }
int64_t small_m() { return kSmallM; }

// ------------------------------------------------------------------ activations rounded to int8 per block of 32
// Each run of 32 inputs of a row becomes int8 with one fp32 scale (max|x| / 127, rounded to nearest even), by the
// path's quantize_rows: bit-exact on every path, so that a path changes how products are summed, never what is
// rounded.

struct A8Buffers {
  std::vector<int8_t> q;
  std::vector<float> s, gsum, total;
  ryzen::A8 view;
};

// The rounded activations and the per-row sums the paths need. group 0: no weight groups (int8 weights).
void prepare_a8(const float* x, int64_t m, int64_t k, int64_t group, A8Buffers& a) {
  const int64_t blocks = k / 32;
  a.q.resize(m * k);
  a.s.resize(m * blocks);
  a.total.assign(m, 0.f);
  current->quantize_rows(x, m, k, a.q.data(), a.s.data());
  const int64_t groups = group ? k / group : 0;
  a.gsum.assign(m * groups, 0.f);
  for (int64_t r = 0; r < m; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t codes = 0;
      for (int j = 0; j < 32; ++j) codes += a.q[r * k + b * 32 + j];
      // The minimum of int4 multiplies the sum of the *rounded* inputs (as llama.cpp's Q4_1 x Q8_1): the result is
      // then exactly the dequantized weight times the rounded activations.
      const float bsum = a.s[r * blocks + b] * static_cast<float>(codes);
      total += bsum;
      if (group) a.gsum[r * groups + b * 32 / group] += bsum;
    }
    a.total[r] = 128.f * total;
  }
  a.view = ryzen::A8{a.q.data(), a.s.data(), a.gsum.data(), a.total.data(), m, k};
}

int64_t grain(int64_t k) { return std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(k, 1)); }

std::tuple<torch::Tensor, torch::Tensor> quantize_q8(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) % 32 == 0,
              "quantize_q8: x float32 [M, K] with K a multiple of 32");
  auto xc = x.contiguous();
  auto xq = torch::empty(xc.sizes(), xc.options().dtype(torch::kChar));
  auto xs = torch::empty({xc.size(0), xc.size(1) / 32}, xc.options());
  current->quantize_rows(xc.data_ptr<float>(), xc.size(0), xc.size(1), xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  return {xq, xs};
}

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
  const auto* kern = current;
  at::parallel_for(0, n, m <= kSmallM ? grain(k) : 16, [&](int64_t n0, int64_t n1) {
    kern->w8_rows(xp, m, k, qp, sp, yp, n, n0, n1);
  });
  return y;
}

// Panels of 16 weight rows per task, about 64 KiB of weights (decode: enough tasks for the threads; a prompt pass
// re-reads each panel from L1/L2 for every tile of rows).
int64_t panel_grain(int64_t panel_bytes) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(panel_bytes, 1)); }

// int8 weights in panels (ryzen_opt.quant.pack_int8_panels) against activations rounded to int8 per block of 32
// (llama.cpp's Q8_0 x Q8_0), for any number of rows: each panel is read once per call and serves every row.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor panels, torch::Tensor scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2, "w8a8_linear: x float32 [M, K]");
  TORCH_CHECK(panels.scalar_type() == torch::kByte && panels.dim() == 3 && panels.size(2) == 64,
              "w8a8_linear: panels uint8 [ceil(N / 16), K / 4, 64] (ryzen_opt.quant.pack_int8_panels)");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.dim() == 1, "w8a8_linear: scale float32 [N]");
  const int64_t m = x.size(0), k = x.size(1), n = scale.numel(), p = panels.size(0);
  TORCH_CHECK(panels.size(1) * 4 == k && k % 32 == 0, "w8a8_linear: K (", k, ") a multiple of 32, panels [_, K/4, 64]");
  TORCH_CHECK(p * ryzen::kPanel >= n && (p - 1) * ryzen::kPanel < n, "w8a8_linear: ", p, " panels for ", n, " rows");
  auto xc = x.contiguous(), pc = panels.contiguous(), sc = scale.contiguous();
  auto y = torch::empty({m, n}, x.options());
  const uint8_t* pp = pc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  A8Buffers a;
  prepare_a8(xc.data_ptr<float>(), m, k, 0, a);
  const auto* kern = current;
  at::parallel_for(0, p, panel_grain(k * ryzen::kPanel), [&](int64_t p0, int64_t p1) {
    kern->w8a8_panels(a.view, pp, sp, yp, n, n, p0, p1);
  });
  return y;
}

torch::Tensor w4_dequantize(torch::Tensor panels, torch::Tensor scale, torch::Tensor minimum, int64_t group,
                            int64_t n) {
  // codes [P, K/8, 16, 4] bytes -> [P * 16, K]; scale/minimum [P, G, 16] -> [P * 16, G]
  const int64_t p = panels.size(0), k = panels.size(1) * 8;
  auto b = panels.view({p, k / 8, 16, 4}).permute({0, 2, 1, 3});
  auto q = torch::stack({torch::bitwise_and(b, 15), torch::bitwise_right_shift(b, 4)}, 3).reshape({p * 16, k});
  auto s = scale.transpose(1, 2).reshape({p * 16, k / group, 1});
  auto lo = minimum.transpose(1, 2).reshape({p * 16, k / group, 1});
  auto w = q.to(torch::kFloat).view({p * 16, k / group, group}) * s + lo;
  return w.view({p * 16, k}).narrow(0, 0, n).contiguous();
}

// int4 weights in panels (ryzen_opt.quant.pack_int4_panels, scales and minimums by pack_group_panels) against
// activations rounded as w8a8_linear's (llama.cpp's Q4_1 x Q8_1), for any number of rows; n outputs.
torch::Tensor w4_linear(torch::Tensor x, torch::Tensor panels, torch::Tensor scale, torch::Tensor minimum,
                        int64_t group, int64_t n) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2, "w4_linear: x float32 [M, K]");
  TORCH_CHECK(panels.scalar_type() == torch::kByte && panels.dim() == 3 && panels.size(2) == 64,
              "w4_linear: panels uint8 [ceil(N / 16), K / 8, 64] (ryzen_opt.quant.pack_int4_panels)");
  const int64_t m = x.size(0), k = x.size(1), p = panels.size(0);
  TORCH_CHECK(panels.size(1) * 8 == k && k % 32 == 0 && group % 32 == 0 && k % group == 0,
              "w4_linear: K must be a multiple of 32 and of group (a multiple of 32)");
  TORCH_CHECK(p * ryzen::kPanel >= n && (p - 1) * ryzen::kPanel < n, "w4_linear: ", p, " panels for ", n, " rows");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && minimum.scalar_type() == torch::kFloat && scale.dim() == 3 &&
                  scale.sizes() == minimum.sizes() && scale.size(0) == p && scale.size(1) == k / group &&
                  scale.size(2) == ryzen::kPanel,
              "w4_linear: scale and minimum float32 [panels, K / group, 16] (ryzen_opt.quant.pack_group_panels)");
  auto xc = x.contiguous(), pc = panels.contiguous(), sc = scale.contiguous(), mc = minimum.contiguous();
  auto y = torch::empty({m, n}, x.options());
  const uint8_t* pp = pc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  A8Buffers a;
  prepare_a8(xc.data_ptr<float>(), m, k, group, a);
  const auto* kern = current;
  at::parallel_for(0, p, panel_grain(k / 2 * ryzen::kPanel), [&](int64_t p0, int64_t p1) {
    kern->w4a8_panels(a.view, pp, sp, mp, group, yp, n, n, p0, p1);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------- one decoder layer
// A Llama-family layer (RMSNorm, fused q|k|v, RoPE, GQA attention over a static cache, o, RMSNorm, fused gate|up,
// SiLU-gated MLP, down) for T <= kSmallM new rows at positions pos .. pos+T-1, in one call: the ~40 small ATen ops
// and Python lines a layer costs per token in eager mode become one dispatch. Every row is computed in the same order
// whatever T is (row-wise norms, the row-independent GEMV kernels, one query row per attention task), so the logits
// of a token do not depend on the rows verified with it.

torch::Tensor run_linear(int64_t kind, const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c,
                         int64_t group, const torch::Tensor& x) {
  if (kind == 1) return w8_linear(x, a, b);
  if (kind == 2) return w4_linear(x, a, b, c, group, a.size(0) * ryzen::kPanel);  // the fused layer's N % 16 == 0
  if (kind == 3) return w8a8_linear(x, a, b);
  return torch::mm(x, a);  // kind 0: fp32 weight stored transposed [K, N]
}

void rms_norm_rows(const float* x, const float* w, float eps, int64_t t, int64_t d, float* out) {
  for (int64_t r = 0; r < t; ++r) {
    const float* xr = x + r * d;
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = w[i] * (xr[i] * inv);
  }
}

// x[hd] <- x * cos + rotate_half(x) * sin (HF's convention: cos/sin are [hd], the two halves repeated)
void rope_inplace(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

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
  auto cc = cos.contiguous(), sc = sin.contiguous();
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const int64_t width = qkv.size(1);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t hh = 0; hh < heads + kv_heads; ++hh) rope_inplace(qp + r * width + hh * hd, cp + r * hd, sp + r * hd, hd);
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
  for (int64_t r = 0; r < t; ++r) current->silu_mul(gp + r * 2 * inter, gp + r * 2 * inter + inter, actp + r * inter, inter);
  h1 += run_linear(kinds[3], w[9], w[10], w[11], groups[3], act);
  return h1;
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
  const auto* kern = current;
  const auto* plain = ryzen::scalar_kernels();
  at::parallel_for(0, tasks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qs(group * d), base(group), p(group * kSlice), lsum(group * ng), qall(group * d),
        wv(kSlice * ng * group), row(d);
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
              base[u] = kern->dot(qrow[u], kl[c] + at, d);
            }
          }
          const uint8_t* codes = kq[c] + kv * kq_hs[c] + at_j * row_bytes;
          if (!kern->group_scores(codes, nullptr, d, four, qs.data(), group, su))
            plain->group_scores(codes, nullptr, d, four, qs.data(), group, su);
          for (int64_t u = 0; u < group; ++u) ps[u * n + j - lo] = (base[u] + su[u]) * sc;
        } else {
          const float* keys = rkp + kv * rs + (j - stored) * d;
          if (!kern->group_scores(nullptr, keys, d, four, qall.data(), group, su))
            plain->group_scores(nullptr, keys, d, four, qall.data(), group, su);
          for (int64_t u = 0; u < group; ++u) ps[u * n + j - lo] = su[u] * sc;
        }
      }
      // softmax pieces
      for (int64_t u = 0; u < group; ++u) {
        float* pu = ps + u * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, pu[j]);
        part_m[task * group + u] = mx;
        part_l[task * group + u] = n ? kern->exp_sum(pu, n, mx) : 0.f;
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
      if (!kern->slice_values(vcodes.data(), vrows.data(), n, d, four, wv.data(), gv, group, acc)) {
        // Row by row: acc[u] += p[u] * value scale of each channel group * row.
        std::fill(acc, acc + group * d, 0.f);
        for (int64_t jj = 0; jj < n; ++jj) {
          const int64_t j = lo + jj;
          const int64_t c = j < stored ? entry_of[j / gk] : 0;
          const float* s_ = vcodes[jj] != nullptr ? vs[c] + kv * vs_hs[c] + (j - off[c]) * ng : nullptr;
          if (vcodes[jj] != nullptr) kern->unpack_codes(vcodes[jj], d, four, row.data());
          const float* x = vcodes[jj] != nullptr ? row.data() : vrows[jj];
          for (int64_t u = 0; u < group; ++u)
            for (int64_t v_ = 0; v_ < ng; ++v_)
              kern->axpy(ps[u * n + jj] * (s_ != nullptr ? s_[v_] : 1.f), x + v_ * gv, acc + u * d + v_ * gv, gv);
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
        float sum = 0.f;
        float* o = op + ((kv * group + u) * t + i) * d;
        std::fill(o, o + d, 0.f);
        for (int64_t s_ = 0; s_ < slices; ++s_) {
          const float l = part_l[(first + s_) * group + u];
          if (l == 0.f) continue;
          const float w = std::exp(part_m[(first + s_) * group + u] - mx);
          sum += w * l;
          kern->axpy(w, part_acc.data() + ((first + s_) * group + u) * d, o, d);
        }
        for (int64_t e = 0; e < d; ++e) o[e] /= sum;
      }
  return out;
}

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

}  // namespace

TORCH_LIBRARY(ryzen_native, m) {
  m.def("isas() -> str", &isas);
  m.def("use_isa(str name) -> str", &use_isa);
  m.def("isa() -> str", &isa);
  m.def("small_m() -> int", &small_m);
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
  m.def("w4_linear(Tensor x, Tensor panels, Tensor scale, Tensor minimum, int group, int n) -> Tensor");
  m.def("w4_dequantize(Tensor panels, Tensor scale, Tensor minimum, int group, int n) -> Tensor");
  m.def("quantize_q8(Tensor x) -> (Tensor, Tensor)");
  m.def("w8a8_linear(Tensor x, Tensor panels, Tensor scale) -> Tensor");
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
