// The AVX2 + FMA path, native.
#define RYZEN_ENTRY avx2_kernels
#define RYZEN_NAME "avx2"
#include "avx2_impl.h"
