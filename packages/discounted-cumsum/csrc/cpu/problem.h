// Plain-data description of one discounted-cumsum call, shared by the CPU kernels and the dispatcher.
// No torch headers: the Python side passes raw pointers, sizes and flags.
#pragma once
#include <cstdint>

namespace altgrad_dc {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The input is a contiguous tensor viewed as [outer, n, inner]; the scan runs along n:
//   forward (reverse == false): y[t] = x[t] + a[t] * y[t-1],   y[-1] = init (0 when absent)
//   reverse (reverse == true):  y[t] = x[t] + a[t] * y[t+1],   y[n]  = init (0 when absent)
// where a[t] = 0 when done[t] is set, else gate[t]. A zero gate (a reset, or a discount of exactly 0) cuts the
// recurrence: y[t] = x[t], and nothing from before it, not even a NaN or an infinity, reaches y[t] or later. Per-element gates are in the compute type (double for
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

// What a segment of a row contributes to the chain of chunk carries (see dispatch.cpp, chunked_row).
struct SegmentSummary {
  double last;  // the segment's last value in scan order when scanned from zero (whatever carry it was given)
  double prod;  // product of the gates over the segment (may underflow to 0 without a zero gate)
  int cut;      // 1 if some gate in the segment is zero (a reset): the carry before it never reaches its end
};

// One fused RL estimator call (GAE, TD(lambda), V-trace) over a contiguous [outer, n, inner] layout, time along n,
// scanned from the end. Per step t (scan order n-1 .. 0), with d = done[t] | terminated[t] | (t == n-1) and
// b = terminated[t] ? 0 : gamma[t] * next_value[t] (selected, so a NaN next value of a terminal state never leaks):
//   GAE       y = r - v + b + (d ? 0 : gamma*lam * y[t+1]);                out1 = y (advantage), out2 = y + v
//   TD(lam)   y = r + (d ? b : (1-lam) b + gamma*lam * y[t+1]);            out1 = y (return),    out2 = y - v
//   V-trace   rho = exp(log_pi - log_mu) (formed here), p = min(rho, rho_bar), c = min(rho, c_bar), a NaN kept:
//             y = p (r + b - v) + (d ? 0 : gamma*c * y[t+1]);              out1 = y + v (v_s)
//             out2 = p (r + (terminated ? 0 : gamma * (d ? next_value : out1[t+1])) - v)  (advantage)
// next_value == nullptr: next_value[t] = value[t+1], and boot (0 when null) at t = n-1. "(d ? 0 : ...)" selects, so
// nothing from across an episode end is ever multiplied by 0. Accumulates in IO<dtype>::A (double for float32).
enum RlMode : int { kRlGae = 0, kRlTdLambda = 1, kRlVtrace = 2 };
struct RlProblem {
  const void* reward;
  const void* value;       // nullable only for kRlTdLambda with next_value given (then out2 is null too)
  const void* next_value;  // nullable: shifted value + boot
  const void* log_pi;      // kRlVtrace only, in the data type: the kernel forms rho = exp(log_pi - log_mu)
  const void* log_mu;      // kRlVtrace only, in the data type
  void* out1;
  void* out2;              // nullable
  int64_t outer;
  int64_t n;
  int64_t inner;
  const void* gamma;       // double [outer * inner] when !gamma_per_elem, else G [outer * n * inner]
  int gamma_per_elem;
  const void* lam;         // as gamma (unused by kRlVtrace)
  int lam_per_elem;
  const uint8_t* done;        // nullable; [outer * n * inner]
  const uint8_t* terminated;  // nullable; [outer * n * inner]
  const double* boot;         // nullable; [outer * inner]
  double rho_bar;
  double c_bar;
  int mode;
  int dtype;
};

// Building blocks implemented once per instruction set (kernel_impl.h). They hold no state and use no
// C++ standard-library templates, so that the per-ISA translation units cannot leak instructions into each other.
struct Kernels {
  const char* name;
  // Rows [r0, r1) of an inner == 1 problem, each scanned completely.
  void (*rows)(const ScanProblem* p, int64_t r0, int64_t r1);
  // Work items [i0, i1) of an inner > 1 problem; item = (outer index, block of kColumnBlock columns).
  void (*columns)(const ScanProblem* p, int64_t i0, int64_t i1);
  // Scan-order positions [s0, s1) of row `row` (inner == 1): y = the segment scanned from zero + carry * (product
  // of the gates so far) (no carry unless has_carry; a zero gate ends it), written only if `store`. `out` gets
  // the segment's summary, which depends on neither the carry nor `store` (the same operations compute it).
  void (*segment)(const ScanProblem* p, int64_t row, int64_t s0, int64_t s1, double carry, int has_carry,
                  int store, SegmentSummary* out);
  // Fused RL estimators (RlProblem): rows [r0, r1) when inner == 1, else work items [i0, i1) of kRlColumns columns.
  void (*rl_rows)(const RlProblem* p, int64_t r0, int64_t r1);
  void (*rl_columns)(const RlProblem* p, int64_t i0, int64_t i1);
};

constexpr int64_t kRlColumns = 256;

constexpr int64_t kColumnBlock = 256;

const Kernels* kernels_baseline();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

// Chooses the best kernels for this CPU (or the ones named by the environment variable ALTGRAD_CPU_ISA) and runs
// the whole problem on up to `num_threads` threads. Throws std::runtime_error if ALTGRAD_CPU_ISA names an
// instruction set that is unknown, not compiled in, or not supported by this CPU.
void run_scan(const ScanProblem& p, int num_threads);
// Runs a fused RL estimator on up to `num_threads` threads (independent rows or column groups).
void run_rl(const RlProblem& p, int num_threads);
const char* cpu_isa();
// Where a call's parts run: "openmp" (torch's GNU OpenMP workers, see dispatch.cpp) or "std".
const char* thread_pool_name();
// Comma-separated names of the instruction sets that are compiled in and that this CPU supports.
const char* supported_isas();
// Test hook: the thresholds of the chunked long-row path; returns the previous values through the pointers.
void set_tuning(int64_t* min_chunked_row, int64_t* min_elements_per_thread);

}  // namespace altgrad_dc
