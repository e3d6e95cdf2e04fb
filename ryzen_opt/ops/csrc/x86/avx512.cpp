// The AVX-512 path (F, BW, VL, DQ) without VNNI: Skylake-SP, Cascade Lake without it in use.
#define RYZEN_ENTRY avx512_kernels
#define RYZEN_NAME "avx512"
#include "avx512_impl.h"
