// The AVX-512 VNNI path on SIMDe, built for AVX2: tests the VNNI code on machines without it.
#define RYZEN_SIMDE 1
#define RYZEN_VNNI 1
#define RYZEN_ENTRY avx512vnni_simde_kernels
#define RYZEN_NAME "avx512vnni-simde"
#include "avx512_impl.h"
