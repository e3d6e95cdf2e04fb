// What SIMDe 0.7.4 (Debian 12's libsimde-dev) lacks of the AVX-512 intrinsics the avx512 paths use, written lane by
// lane on SIMDe's own vector types, and one of its native aliases that takes the wrong arguments. Included only by
// the SIMDe builds, after <simde/x86/avx512.h>; a newer SIMDe that has them is shadowed by these equivalents.
#pragma once

#include <cmath>
#include <cstdint>

namespace ryzen_simde {

inline simde__m512 cvtepi32_ps(simde__m512i a) {
  simde__m512i_private v = simde__m512i_to_private(a);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = static_cast<float>(v.i32[i]);
  return simde__m512_from_private(r);
}
inline simde__m512i cvttps_epi32(simde__m512 a) {
  simde__m512_private v = simde__m512_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = static_cast<int32_t>(v.f32[i]);
  return simde__m512i_from_private(r);
}
inline simde__m512i cvtps_epi32(simde__m512 a) {  // rounded as the default MXCSR mode: half to even
  simde__m512_private v = simde__m512_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = static_cast<int32_t>(nearbyintf(v.f32[i]));
  return simde__m512i_from_private(r);
}
inline simde__m512i cvtepi8_epi32(simde__m128i a) {
  simde__m128i_private v = simde__m128i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = v.i8[i];
  return simde__m512i_from_private(r);
}
inline simde__m512i cvtepu8_epi32(simde__m128i a) {
  simde__m128i_private v = simde__m128i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = v.u8[i];
  return simde__m512i_from_private(r);
}
// Masked loads read only the lanes their mask selects, as the hardware does (a row's end may be a page's end).
inline simde__m512i maskz_loadu_epi8(uint64_t k, const void* p) {
  const int8_t* s = static_cast<const int8_t*>(p);
  simde__m512i_private r;
  for (int i = 0; i < 64; ++i) r.i8[i] = ((k >> i) & 1) ? s[i] : 0;
  return simde__m512i_from_private(r);
}
inline simde__m128i maskz_loadu_epi8_128(uint16_t k, const void* p) {
  const int8_t* s = static_cast<const int8_t*>(p);
  simde__m128i_private r;
  for (int i = 0; i < 16; ++i) r.i8[i] = ((k >> i) & 1) ? s[i] : 0;
  return simde__m128i_from_private(r);
}
inline simde__m512 maskz_loadu_ps(uint16_t k, const float* p) {
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = ((k >> i) & 1) ? p[i] : 0.f;
  return simde__m512_from_private(r);
}
inline void mask_storeu_ps(float* p, uint16_t k, simde__m512 a) {
  simde__m512_private v = simde__m512_to_private(a);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) p[i] = v.f32[i];
}

}  // namespace ryzen_simde

#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
#define _mm512_cvtepi32_ps ryzen_simde::cvtepi32_ps
#define _mm512_cvttps_epi32 ryzen_simde::cvttps_epi32
#define _mm512_cvtps_epi32 ryzen_simde::cvtps_epi32
#define _mm512_cvtepi8_epi32 ryzen_simde::cvtepi8_epi32
#define _mm512_cvtepu8_epi32 ryzen_simde::cvtepu8_epi32
#define _mm512_maskz_loadu_epi8 ryzen_simde::maskz_loadu_epi8
#define _mm_maskz_loadu_epi8 ryzen_simde::maskz_loadu_epi8_128
#define _mm512_maskz_loadu_ps ryzen_simde::maskz_loadu_ps
#define _mm512_mask_storeu_ps ryzen_simde::mask_storeu_ps
typedef simde__mmask16 __mmask16;
typedef simde__mmask64 __mmask64;
