// The AVX2 path on SIMDe's portable intrinsics (baseline x86-64: SSE2): tests the AVX2 code on any machine.
#define RYZEN_SIMDE 1
#define RYZEN_ENTRY avx2_simde_kernels
#define RYZEN_NAME "avx2-simde"
#include "avx2_impl.h"
