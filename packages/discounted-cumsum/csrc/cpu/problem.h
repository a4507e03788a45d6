// Plain-data description of one discounted-cumsum call, shared by the CPU kernels and the dispatcher.
// No torch headers: the Python side passes raw pointers, sizes and flags.
#pragma once
#include <cstdint>

namespace altgrad_dc {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The input is a contiguous tensor viewed as [outer, n, inner]; the scan runs along n:
//   forward (reverse == false): y[t] = x[t] + a[t] * y[t-1],   y[-1] = init (0 when absent)
//   reverse (reverse == true):  y[t] = x[t] + a[t] * y[t+1],   y[n]  = init (0 when absent)
// where a[t] = 0 when done[t] is set, else gate[t]. Per-element gates are in the compute type (double for
// float64 inputs, float otherwise); gates that are constant along the scan and init values are always double,
// so that a Python-float discount such as 0.99 is not rounded to float32 (that alone costs 1e-4 on 10 000 ones).
struct ScanProblem {
  const void* x;
  void* y;
  int64_t outer;
  int64_t n;
  int64_t inner;
  const void* gate;      // double [outer * inner] when !gate_per_elem (constant along the scan), else G [outer * n * inner]
  int gate_per_elem;
  const uint8_t* done;   // nullable; [outer * n * inner]
  const double* init;    // nullable; [outer * inner]
  int reverse;
  int dtype;             // DType of x and y
};

// Building blocks implemented once per instruction set (kernel_impl.h). They hold no state and use no
// C++ standard-library templates, so that the per-ISA translation units cannot leak instructions into each other.
struct Kernels {
  const char* name;
  // Rows [r0, r1) of an inner == 1 problem, each scanned completely.
  void (*rows)(const ScanProblem* p, int64_t r0, int64_t r1);
  // Work items [i0, i1) of an inner > 1 problem; item = (outer index, block of kColumnBlock columns).
  void (*columns)(const ScanProblem* p, int64_t i0, int64_t i1);
  // Scan-order positions [s0, s1) of row `row` (inner == 1) starting from `carry` (ignored unless has_carry).
  // Writes the local result and returns the last value and the product of the gates over the segment.
  void (*segment)(const ScanProblem* p, int64_t row, int64_t s0, int64_t s1, double carry, int has_carry,
                  double* last, double* gate_product);
  // Adds carry * (product of gates from s0 up to and including s) to every y[s], s in [s0, s1).
  void (*fixup)(const ScanProblem* p, int64_t row, int64_t s0, int64_t s1, double carry);
};

constexpr int64_t kColumnBlock = 256;

const Kernels* kernels_baseline();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

// Chooses the best kernels for this CPU and runs the whole problem on up to `num_threads` threads.
void run_scan(const ScanProblem& p, int num_threads);
const char* cpu_isa();

}  // namespace altgrad_dc
