// The AVX-512 path with VNNI (vpdpbusd): Ice Lake, Sapphire Rapids, Zen 4, Zen 5.
#define RYZEN_VNNI 1
#define RYZEN_ENTRY avx512vnni_kernels
#define RYZEN_NAME "avx512vnni"
#include "avx512_impl.h"
