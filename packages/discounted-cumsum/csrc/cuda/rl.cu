// CUDA fused RL estimators (GAE, TD(lambda), V-trace; see rl.h): one kernel launch per call, on the caller's stream.
//
// One thread per independent sequence, walking it from the last step to the first with the CPU kernel's arithmetic
// and selects (csrc/cpu/rl_kernel.h), so every input is read once and each output written once, with no
// temporaries. Sequence s = o * inner + c is (outer index o, column c): for inner > 1 (time-major [T, B] with
// dim=0, say) adjacent threads take adjacent columns, so each step's loads coalesce; for inner == 1 a thread owns a
// row, and reads it downwards through the cache lines it shares with no other thread.
//
// A thread loads kRlChunk steps of inputs into registers before it runs them through the recurrence, so that
// several loads are in flight even when there are few sequences (the loads do not depend on the carry).
//
// Every mask selects, never multiplies: an episode end (or a zero gate) takes x and drops the carry, a terminal
// step drops the bootstrap term, so a NaN or inf from another episode never gets in (0 * NaN would be NaN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/rl.h"

namespace altgrad_dc_cuda {
namespace {

constexpr int kRlThreads = 128;
constexpr int kRlChunk = 4;

// Storage type S -> carry type A (double for float32/float64, float for the 16-bit types, as on the CPU) and the
// type of per-element gamma / lam buffers G (the compute dtype of _args.compute_dtype: float64 or float32).
template <typename S> struct RlTypes;
template <> struct RlTypes<float> { using A = double; using G = float; };
template <> struct RlTypes<double> { using A = double; using G = double; };
template <> struct RlTypes<__half> { using A = float; using G = float; };
template <> struct RlTypes<__nv_bfloat16> { using A = float; using G = float; };

__host__ __device__ __forceinline__ float as_float(float v) { return v; }
__host__ __device__ __forceinline__ double as_float(double v) { return v; }
__host__ __device__ __forceinline__ float as_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename A, typename S>
__host__ __device__ __forceinline__ A rl_load(const S* __restrict__ p, int64_t i) {
  return static_cast<A>(as_float(p[i]));
}

__host__ __device__ __forceinline__ void rl_store(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
__host__ __device__ __forceinline__ void rl_store(double* p, int64_t i, double v) { p[i] = v; }
__host__ __device__ __forceinline__ void rl_store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__host__ __device__ __forceinline__ void rl_store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__host__ __device__ __forceinline__ double rl_exp(double v) { return exp(v); }
__host__ __device__ __forceinline__ float rl_exp(float v) { return expf(v); }

// Sequence s, whole. Host and device code, so that the arithmetic can be checked on a machine without a GPU.
template <typename S, int MODE>
__host__ __device__ __forceinline__ void rl_sequence(const RlProblem& p, int64_t s) {
  using A = typename RlTypes<S>::A;
  using G = typename RlTypes<S>::G;
  const int64_t inner = p.inner, n = p.n;
  const int64_t o = s / inner, c = s - o * inner;
  const int64_t base = o * n * inner + c;  // step t of this sequence sits at base + t * inner

  const S* __restrict__ r = static_cast<const S*>(p.reward);
  const S* __restrict__ v = static_cast<const S*>(p.value);
  const S* __restrict__ nv = static_cast<const S*>(p.next_value);
  const S* __restrict__ lp = static_cast<const S*>(p.log_pi);
  const S* __restrict__ lm = static_cast<const S*>(p.log_mu);
  S* __restrict__ o1 = static_cast<S*>(p.out1);
  S* __restrict__ o2 = static_cast<S*>(p.out2);
  const G* __restrict__ ge = p.gamma_per_elem ? static_cast<const G*>(p.gamma) : nullptr;
  const G* __restrict__ le = (MODE != kRlVtrace && p.lam_per_elem) ? static_cast<const G*>(p.lam) : nullptr;
  const uint8_t* __restrict__ dn = p.done;
  const uint8_t* __restrict__ tm = p.terminated;
  // The sequence's own gamma and lam when they are not per element (double buffers, or one value for all).
  const A gc = ge ? A(0) : static_cast<A>(p.gamma ? static_cast<const double*>(p.gamma)[s] : p.gamma_value);
  A lc = A(0);
  if (MODE != kRlVtrace && !le) lc = static_cast<A>(p.lam ? static_cast<const double*>(p.lam)[s] : p.lam_value);
  const A rho_bar = static_cast<A>(p.rho_bar), c_bar = static_cast<A>(p.c_bar);

  A y = A(0);                                             // y[t+1] (never used at the last step: it ends)
  A vn = p.boot ? static_cast<A>(p.boot[s]) : A(0);      // value[t+1]; boot after the last step
  for (int64_t t1 = n; t1 > 0; t1 -= kRlChunk) {
    // 1. Steps t1-1 .. t1-kRlChunk: every load, none depending on the carry.
    A rr[kRlChunk], vv[kRlChunk], nn[kRlChunk], gg[kRlChunk], ll[kRlChunk], pp[kRlChunk];
    bool tt[kRlChunk], ee[kRlChunk];
#pragma unroll
    for (int k = 0; k < kRlChunk; ++k) {
      const int64_t t = t1 - 1 - k;
      rr[k] = vv[k] = nn[k] = pp[k] = A(0);
      gg[k] = gc;
      ll[k] = lc;
      tt[k] = ee[k] = false;
      if (t >= 0) {
        const int64_t i = base + t * inner;
        rr[k] = rl_load<A>(r, i);
        if (v) vv[k] = rl_load<A>(v, i);
        if (nv) nn[k] = rl_load<A>(nv, i);
        if (ge) gg[k] = static_cast<A>(ge[i]);
        if (le) ll[k] = static_cast<A>(le[i]);
        if constexpr (MODE == kRlVtrace) pp[k] = rl_exp(rl_load<A>(lp, i) - rl_load<A>(lm, i));
        tt[k] = tm != nullptr && tm[i] != 0;
        ee[k] = t == n - 1 || tt[k] || (dn != nullptr && dn[i] != 0);
      }
    }
    // 2. The recurrence over the same steps, from the later one to the earlier one.
#pragma unroll
    for (int k = 0; k < kRlChunk; ++k) {
      const int64_t t = t1 - 1 - k;
      if (t >= 0) {
        const int64_t i = base + t * inner;
        const A g = gg[k], rt = rr[k], vt = vv[k];
        const A nvt = nv ? nn[k] : vn;
        const bool term = tt[k], end = ee[k];
        const A b = term ? A(0) : g * nvt;
        if constexpr (MODE == kRlVtrace) {
          const A rho = pp[k];
          // min(rho, bar) keeping a NaN ratio NaN, as torch.clamp (and the CPU kernel's clip_ratio) do
          const A pc = rho_bar < rho ? rho_bar : rho;
          const A cc = c_bar < rho ? c_bar : rho;
          const A vs_next = end ? nvt : y + vn;  // v_s at t+1 (y still holds y[t+1])
          const A adv = pc * (rt + (term ? A(0) : g * vs_next) - vt);
          const A x = pc * (rt + b - vt);
          const A a = end ? A(0) : g * cc;
          y = a != A(0) ? x + a * y : x;
          rl_store(o1, i, y + vt);
          if (o2) rl_store(o2, i, adv);
        } else {
          const A l = ll[k];
          A x;
          if constexpr (MODE == kRlGae) {
            x = rt - vt + b;
          } else {
            x = end ? rt + b : rt + (A(1) - l) * b;
          }
          const A a = end ? A(0) : g * l;
          y = a != A(0) ? x + a * y : x;
          rl_store(o1, i, y);
          if (o2) rl_store(o2, i, MODE == kRlGae ? y + vt : y - vt);
        }
        vn = vt;
      }
    }
  }
}

template <typename S, int MODE>
__global__ void __launch_bounds__(kRlThreads) rl_kernel(RlProblem p) {
  const int64_t s = int64_t(blockIdx.x) * kRlThreads + threadIdx.x;
  if (s < p.outer * p.inner) rl_sequence<S, MODE>(p, s);
}

template <typename S>
void launch_mode(const RlProblem& p, unsigned blocks, cudaStream_t stream) {
  switch (p.mode) {
    case kRlGae: rl_kernel<S, kRlGae><<<blocks, kRlThreads, 0, stream>>>(p); break;
    case kRlTdLambda: rl_kernel<S, kRlTdLambda><<<blocks, kRlThreads, 0, stream>>>(p); break;
    default: rl_kernel<S, kRlVtrace><<<blocks, kRlThreads, 0, stream>>>(p); break;
  }
}

template <typename S>
void host_mode(const RlProblem& p) {
  const int64_t seqs = p.outer * p.inner;
  for (int64_t s = 0; s < seqs; ++s) {
    switch (p.mode) {
      case kRlGae: rl_sequence<S, kRlGae>(p, s); break;
      case kRlTdLambda: rl_sequence<S, kRlTdLambda>(p, s); break;
      default: rl_sequence<S, kRlVtrace>(p, s); break;
    }
  }
}

const char* check(const RlProblem& p) {
  if (p.mode < kRlGae || p.mode > kRlVtrace) return "unknown estimator mode";
  if (p.dtype < 0 || p.dtype > 3) return "unknown dtype code";
  if (p.outer < 0 || p.n < 0 || p.inner < 0) return "negative size";
  return nullptr;
}

}  // namespace

std::string run_rl_on_host(const RlProblem& p) {
  if (const char* err = check(p)) return err;
  if (p.outer * p.n * p.inner == 0) return "";
  switch (p.dtype) {
    case 0: host_mode<float>(p); break;
    case 1: host_mode<double>(p); break;
    case 2: host_mode<__half>(p); break;
    default: host_mode<__nv_bfloat16>(p); break;
  }
  return "";
}

std::string launch_rl(const RlProblem& p) {
  if (const char* err = check(p)) return err;
  if (p.outer * p.n * p.inner == 0) return "";
  const int64_t blocks = (p.outer * p.inner + kRlThreads - 1) / kRlThreads;
  if (blocks > 0x7fffffffLL) return "too many sequences for one launch";
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const unsigned b = static_cast<unsigned>(blocks);
  switch (p.dtype) {
    case 0: launch_mode<float>(p, b, stream); break;
    case 1: launch_mode<double>(p, b, stream); break;
    case 2: launch_mode<__half>(p, b, stream); break;
    default: launch_mode<__nv_bfloat16>(p, b, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return "";
}

}  // namespace altgrad_dc_cuda
