// The CPU kernels compiled for the baseline instruction set (see kernel_impl.h).
#define ALTGRAD_ISA_NAME "baseline"
#define ALTGRAD_ISA_ENTRY kernels_baseline
#define ALTGRAD_VEC_BYTES 16
#include "cpu/kernel_impl.h"
