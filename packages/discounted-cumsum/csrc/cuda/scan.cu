// CUDA discounted cumsum: one kernel launch per call, on the caller's stream, any number of rows, any length.
//
// Row kernel (inner == 1, the scan dim is contiguous). The whole [rows, n] buffer is treated as ONE sequence in
// scan order with a reset at every row start, i.e. a scan of the affine maps y -> a*y + b with
// (a, b) = (gate, x) inside a row and (0, x + gate*init) at a row start. Tiles of kThreads*kItems consecutive
// elements are scanned by one block (thread-sequential, warp shuffles, block), and tiles are chained with a
// single-pass decoupled look-back (Merrill & Garland): each tile publishes its aggregate, then its inclusive
// prefix; a tile's carry comes from a warp-wide look-back window that stops at the first published prefix or at a
// row start (a == 0). Tile ids are taken from an atomic ticket so every predecessor is already running (no
// deadlock). The workspace (ticket, finish count, epoch, per-tile flags and values) is reset by the last block, and
// flags carry the launch's epoch, so no memset/extra launch is needed and the kernel is CUDA-graph friendly.
// Many short rows, a few long rows, or one huge row all use the same load-balanced grid.
//
// Column kernel (inner > 1, e.g. time-major [T, B] with dim=0): one thread per column walks the scan dim; loads
// are coalesced across columns.
//
// Zero gates (resets, row starts, discounts of exactly 0) cut the recurrence by selection, never by multiplying
// the carry by 0: a NaN or inf in one episode never reaches another one.
//
// Accumulation is in double (inputs and gates are converted on load), which makes float32 results accurate to
// well below the float32 rounding of a long sum.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/scan.h"

namespace altgrad_dc_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int64_t kTile = int64_t(kThreads) * kItems;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr uint32_t kFlagAggregate = 1, kFlagPrefix = 2;

template <typename T> __device__ __forceinline__ double load(const T* p, int64_t i);
template <> __device__ __forceinline__ double load<float>(const float* p, int64_t i) { return static_cast<double>(__ldg(p + i)); }
template <> __device__ __forceinline__ double load<double>(const double* p, int64_t i) { return __ldg(p + i); }
template <> __device__ __forceinline__ double load<__half>(const __half* p, int64_t i) {
  return static_cast<double>(__half2float(p[i]));
}
template <> __device__ __forceinline__ double load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return static_cast<double>(__bfloat162float(p[i]));
}

template <typename T> __device__ __forceinline__ void store(T* p, int64_t i, double v);
template <> __device__ __forceinline__ void store<float>(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
template <> __device__ __forceinline__ void store<double>(double* p, int64_t i, double v) { p[i] = v; }
template <> __device__ __forceinline__ void store<__half>(__half* p, int64_t i, double v) {
  p[i] = __float2half_rn(static_cast<float>(v));
}
template <> __device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, double v) {
  p[i] = __float2bfloat16_rn(static_cast<float>(v));
}

// The affine map y -> a*y + b. combine(first, second) applies `first`, then `second`.
// A map with a == 0 (a reset, a row start or a zero discount) is constant: it SELECTS its b and ignores what came
// before, so a NaN or inf from an earlier episode never reaches it (0 * NaN would be NaN). This matches the CPU
// kernels and the pure-torch reference.
struct Affine {
  double a, b;
};
__device__ __forceinline__ Affine identity() { return {1.0, 0.0}; }
__device__ __forceinline__ Affine combine(Affine first, Affine second) {
  if (second.a == 0.0) return second;
  return {first.a * second.a, fma(second.a, first.b, second.b)};
}
// The map applied to a value.
__device__ __forceinline__ double apply(Affine m, double y) { return m.a == 0.0 ? m.b : fma(m.a, y, m.b); }
__device__ __forceinline__ Affine shfl_up(Affine v, int d) {
  return {__shfl_up_sync(kFull, v.a, d), __shfl_up_sync(kFull, v.b, d)};
}
__device__ __forceinline__ Affine shfl_down(Affine v, int d) {
  return {__shfl_down_sync(kFull, v.a, d), __shfl_down_sync(kFull, v.b, d)};
}
__device__ __forceinline__ Affine shfl_idx(Affine v, int lane) {
  return {__shfl_sync(kFull, v.a, lane), __shfl_sync(kFull, v.b, lane)};
}

// Workspace layout: 4 x uint64 counters, then per tile: uint32 flag word, double aggregate a, b, prefix.
struct Workspace {
  unsigned long long* counters;  // [0] ticket, [1] finished blocks, [2] epoch
  uint32_t* status;
  double* agg_a;
  double* agg_b;
  double* prefix;
};

__host__ __device__ inline int64_t align8(int64_t v) { return (v + 7) / 8 * 8; }

__host__ __device__ inline Workspace carve(void* base, int64_t tiles) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.counters = reinterpret_cast<unsigned long long*>(p);
  p += 4 * sizeof(unsigned long long);
  w.status = reinterpret_cast<uint32_t*>(p);
  p += align8(tiles * int64_t(sizeof(uint32_t)));
  w.agg_a = reinterpret_cast<double*>(p);
  p += tiles * int64_t(sizeof(double));
  w.agg_b = reinterpret_cast<double*>(p);
  p += tiles * int64_t(sizeof(double));
  w.prefix = reinterpret_cast<double*>(p);
  return w;
}

__device__ __forceinline__ uint32_t load_volatile(const uint32_t* p) { return *reinterpret_cast<const volatile uint32_t*>(p); }
__device__ __forceinline__ double load_volatile(const double* p) { return *reinterpret_cast<const volatile double*>(p); }

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) row_kernel(Problem p, Workspace w, int64_t total) {
  __shared__ unsigned long long s_ticket;
  __shared__ uint32_t s_epoch;
  __shared__ Affine s_warp[kWarps];
  __shared__ double s_carry;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    s_epoch = static_cast<uint32_t>(*reinterpret_cast<volatile unsigned long long*>(&w.counters[2])) & 0x3fffffffu;
    s_ticket = atomicAdd(&w.counters[0], 1ull);
  }
  __syncthreads();
  const int64_t tile = static_cast<int64_t>(s_ticket);
  const uint32_t epoch = s_epoch;
  const int64_t n = p.n;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);

  // 1. Each thread composes the maps of its kItems consecutive elements (in scan order).
  double av[kItems], bv[kItems];
  Affine acc = identity();
  const int64_t s0 = tile * kTile + int64_t(tid) * kItems;
  int64_t m = p.reverse ? total - 1 - s0 : s0;  // memory index of scan position s0
  int64_t row = m / n, t = m - row * n;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (s0 + i < total) {
      const double xv = load<T>(x, m);
      const double g = p.gate_per_elem ? load<G>(static_cast<const G*>(p.gate), m)
                       : p.gate != nullptr ? static_cast<const double*>(p.gate)[row] : p.gate_value;
      const bool reset = p.done != nullptr && p.done[m] != 0;
      double a = reset ? 0.0 : g, b = xv;
      const bool start = p.reverse ? (t == n - 1) : (t == 0);
      if (start) {
        if (p.init != nullptr) b = apply(Affine{a, xv}, p.init[row]);  // a == 0 (reset): b = x, init is cut
        a = 0.0;
      }
      av[i] = a;
      bv[i] = b;
      acc = combine(acc, Affine{a, b});
      if (p.reverse) {
        --m;
        if (--t < 0) { t = n - 1; --row; }
      } else {
        ++m;
        if (++t == n) { t = 0; ++row; }
      }
    } else {
      av[i] = 1.0;
      bv[i] = 0.0;
    }
  }

  // 2. Inclusive scan of the per-thread maps across the warp, then across the warps of the block.
  Affine inc = acc;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const Affine o = shfl_up(inc, d);
    if (lane >= d) inc = combine(o, inc);
  }
  if (lane == 31) s_warp[warp] = inc;
  Affine before = shfl_up(inc, 1);
  if (lane == 0) before = identity();
  __syncthreads();
  Affine warp_prefix = identity();
  for (int k = 0; k < warp; ++k) warp_prefix = combine(warp_prefix, s_warp[k]);
  const Affine exclusive = combine(warp_prefix, before);

  // 3. Decoupled look-back for the value that enters this tile.
  if (warp == 0) {
    Affine total_map = identity();
    for (int k = 0; k < kWarps; ++k) total_map = combine(total_map, s_warp[k]);
    double carry = 0.0;
    if (tile > 0) {
      if (lane == 0) {
        w.agg_a[tile] = total_map.a;
        w.agg_b[tile] = total_map.b;
        __threadfence();
        atomicExch(&w.status[tile], (epoch << 2) | kFlagAggregate);
      }
      Affine run = identity();  // maps of the tiles between the current window and this tile
      int64_t newest = tile - 1;
      while (true) {
        const int64_t j = newest - lane;
        Affine v = identity();
        uint32_t flag = 0;
        if (j >= 0) {
          uint32_t s;
          while (true) {
            s = load_volatile(&w.status[j]);
            if ((s >> 2) == epoch && (s & 3u) != 0) break;
            __nanosleep(64);
          }
          __threadfence();
          flag = s & 3u;
          v = flag == kFlagPrefix ? Affine{0.0, load_volatile(&w.prefix[j])}
                                  : Affine{load_volatile(&w.agg_a[j]), load_volatile(&w.agg_b[j])};
        }
        const unsigned prefixes = __ballot_sync(kFull, flag == kFlagPrefix);
        const int first_prefix = prefixes ? __ffs(prefixes) - 1 : 32;
        if (lane > first_prefix) v = identity();
        // Ordered reduction: lane 0 ends with v[31] o ... o v[0] (oldest first).
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const Affine o = shfl_down(v, d);
          if (lane + d < 32) v = combine(o, v);
        }
        run = combine(shfl_idx(v, 0), run);
        if (first_prefix < 32 || run.a == 0.0 || newest < 32) break;
        newest -= 32;
      }
      carry = run.b;  // the window ended at a prefix or a row start, so run.a == 0
    }
    if (lane == 0) {
      w.prefix[tile] = apply(total_map, carry);
      __threadfence();
      atomicExch(&w.status[tile], (epoch << 2) | kFlagPrefix);
      s_carry = carry;
    }
  }
  __syncthreads();

  // 4. Apply the carry and write the outputs.
  double yv = apply(exclusive, s_carry);
  m = p.reverse ? total - 1 - s0 : s0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (s0 + i < total) {
      yv = apply(Affine{av[i], bv[i]}, yv);
      store<T>(y, m, yv);
      m += p.reverse ? -1 : 1;
    }
  }

  // 5. The last block to finish resets the ticket and bumps the epoch for the next launch.
  if (tid == 0) {
    __threadfence();
    const unsigned long long finished = atomicAdd(&w.counters[1], 1ull);
    if (finished == gridDim.x - 1ull) {
      w.counters[0] = 0ull;
      w.counters[1] = 0ull;
      w.counters[2] = (w.counters[2] + 1ull) & 0x3fffffffull;
      __threadfence();
    }
  }
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) column_kernel(Problem p) {
  const int64_t cols = p.outer * p.inner;
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= cols) return;
  const int64_t o = col / p.inner, c = col - o * p.inner, n = p.n;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const double gc = p.gate_per_elem ? 0.0 : p.gate != nullptr ? static_cast<const double*>(p.gate)[col] : p.gate_value;
  bool has = p.init != nullptr;
  double carry = has ? p.init[col] : 0.0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t t = p.reverse ? n - 1 - s : s;
    const int64_t m = (o * n + t) * p.inner + c;
    const double xv = load<T>(x, m);
    const double a = p.gate_per_elem ? load<G>(static_cast<const G*>(p.gate), m) : gc;
    if (!has || a == 0.0 || (p.done != nullptr && p.done[m] != 0)) {  // a cut selects x (never 0 * carry)
      carry = xv;
    } else {
      carry = fma(a, carry, xv);
    }
    has = true;
    store<T>(y, m, carry);
  }
}

template <typename T, typename G>
void launch_typed(const Problem& p, cudaStream_t stream) {
  const int64_t total = p.outer * p.n * p.inner;
  if (p.inner == 1) {
    const int64_t tiles = (total + kTile - 1) / kTile;
    row_kernel<T, G><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p, carve(p.workspace, p.workspace_tiles), total);
  } else {
    const int64_t blocks = (p.outer * p.inner + kThreads - 1) / kThreads;
    column_kernel<T, G><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
}

}  // namespace

int64_t tiles_needed(int64_t outer, int64_t n, int64_t inner) {
  if (inner != 1) return 0;
  return (outer * n + kTile - 1) / kTile;
}

int64_t workspace_bytes(int64_t tiles) {
  return 4 * int64_t(sizeof(unsigned long long)) + align8(tiles * int64_t(sizeof(uint32_t))) + 3 * tiles * int64_t(sizeof(double));
}

std::string launch(const Problem& p) {
  const int64_t total = p.outer * p.n * p.inner;
  if (total == 0) return "";
  if (p.inner == 1) {
    const int64_t tiles = tiles_needed(p.outer, p.n, p.inner);
    if (p.workspace == nullptr || p.workspace_tiles < tiles) return "workspace too small";
    if (tiles > 0x7fffffffLL) return "input too large for one launch (more than 2^31 tiles)";
  } else if ((p.outer * p.inner + kThreads - 1) / kThreads > 0x7fffffffLL) {
    return "too many columns for one launch";
  }
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  switch (p.dtype) {
    case 0: launch_typed<float, float>(p, stream); break;
    case 1: launch_typed<double, double>(p, stream); break;
    case 2: launch_typed<__half, float>(p, stream); break;
    case 3: launch_typed<__nv_bfloat16, float>(p, stream); break;
    default: return "unknown dtype code";
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return "";
}

}  // namespace altgrad_dc_cuda
