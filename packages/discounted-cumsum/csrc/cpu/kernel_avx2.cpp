// The CPU kernels compiled for the avx2 instruction set (see kernel_impl.h).
#define ALTGRAD_ISA_NAME "avx2"
#define ALTGRAD_ISA_ENTRY kernels_avx2
#define ALTGRAD_VEC_BYTES 32
#include "cpu/kernel_impl.h"
