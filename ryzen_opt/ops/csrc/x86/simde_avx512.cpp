// The AVX-512BW path on SIMDe, built for AVX2: tests the AVX-512 code on machines without it.
#define RYZEN_SIMDE 1
#define RYZEN_ENTRY avx512_simde_kernels
#define RYZEN_NAME "avx512-simde"
#include "avx512_impl.h"
