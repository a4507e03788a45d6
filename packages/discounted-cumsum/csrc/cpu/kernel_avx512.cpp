// The CPU kernels compiled for the avx512 instruction set (see kernel_impl.h).
#define ALTGRAD_ISA_NAME "avx512"
#define ALTGRAD_ISA_ENTRY kernels_avx512
#define ALTGRAD_VEC_BYTES 64
#include "cpu/kernel_impl.h"
