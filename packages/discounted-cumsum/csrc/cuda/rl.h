// Host interface of the CUDA fused RL estimators (implemented in rl.cu). No torch headers.
//
// The same problem as the CPU kernel's RlProblem (csrc/cpu/problem.h; both take log_pi and log_mu and form
// rho = exp(log_pi - log_mu) in the kernel: no temporary, one launch), with one difference: a rate that is one
// number for every row comes by value (gamma == nullptr: gamma_value) instead of as a host buffer.
#pragma once
#include <cstdint>
#include <string>

namespace altgrad_dc_cuda {

enum RlMode : int { kRlGae = 0, kRlTdLambda = 1, kRlVtrace = 2 };

// A contiguous [outer, n, inner] layout, time along n, scanned from the end; one sequence per (outer, inner) pair.
// Per step t (n-1 .. 0), with end = done[t] | terminated[t] | (t == n-1) and
// b = terminated[t] ? 0 : gamma[t] * next_value[t] (selected: a NaN next value of a terminal state never leaks):
//   GAE       x = r - v + b,                          a = end ? 0 : gamma*lam;  out1 = y, out2 = y + v
//   TD(lam)   x = end ? r + b : r + (1-lam) b,        a = end ? 0 : gamma*lam;  out1 = y, out2 = y - v
//   V-trace   rho = exp(log_pi - log_mu), p = min(rho, rho_bar), c = min(rho, c_bar),
//             x = p (r + b - v),                      a = end ? 0 : gamma*c;    out1 = y + v (v_s),
//             out2 = p (r + (terminated ? 0 : gamma * (end ? next_value : out1[t+1])) - v)
//   y = a != 0 ? x + a * y[t+1] : x   (a zero gate selects x: nothing from across it, not even a NaN, gets in)
// next_value == nullptr: next_value[t] = value[t+1], and boot (0 when null) at t = n-1. The carry and every step are
// in double for float32 and float64 data, in float for float16 and bfloat16 (as on the CPU).
struct RlProblem {
  const void* reward;
  const void* value;       // nullable only for kRlTdLambda with next_value given (then out2 is null too)
  const void* next_value;  // nullable: shifted value + boot
  const void* log_pi;      // kRlVtrace only, in the data type
  const void* log_mu;      // kRlVtrace only, in the data type
  void* out1;
  void* out2;              // nullable
  int64_t outer, n, inner;
  const void* gamma;       // double [outer*inner] when !gamma_per_elem, else compute type [outer*n*inner];
                           // nullptr (and !gamma_per_elem): gamma_value for every sequence
  double gamma_value;
  int gamma_per_elem;
  const void* lam;         // as gamma (unused by kRlVtrace)
  double lam_value;
  int lam_per_elem;
  const uint8_t* done;        // nullable; [outer*n*inner]
  const uint8_t* terminated;  // nullable; [outer*n*inner]
  const double* boot;         // nullable; [outer*inner]
  double rho_bar;
  double c_bar;
  int mode;                // RlMode
  int dtype;               // 0 float32, 1 float64, 2 float16, 3 bfloat16
  void* stream;            // cudaStream_t
};

// Launches exactly one kernel on `stream` (none when there is no element). Returns an empty string on success,
// else what went wrong (a bad argument or the CUDA error).
std::string launch_rl(const RlProblem& p);
// Test hook: the kernel's per-sequence code (rl_sequence in rl.cu, host and device code) run on the host, over
// host buffers, one sequence after another; `stream` is ignored. Lets a machine without a GPU check the arithmetic.
std::string run_rl_on_host(const RlProblem& p);

}  // namespace altgrad_dc_cuda
