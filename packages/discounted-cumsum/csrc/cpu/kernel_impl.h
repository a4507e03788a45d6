// CPU discounted-cumsum kernels. This file is compiled once per instruction set: kernel_<isa>.cpp defines
//   ALTGRAD_ISA_NAME   a string naming the instruction set
//   ALTGRAD_ISA_ENTRY  the name of the exported accessor (kernels_baseline, kernels_avx2, ...)
//   ALTGRAD_VEC_BYTES  the SIMD register width in bytes
// and then includes it. Everything except the accessor has internal linkage and no standard-library template is
// instantiated here, so code compiled for AVX-512 can never be picked by the linker for a baseline caller.
//
// Two layouts (see problem.h):
//  * inner == 1 (the scan dim is the last, contiguous one): each row is scanned with an in-register
//    log-step scan of W consecutive elements (gamma, gamma^2, gamma^4, ...) followed by one FMA with the
//    broadcast carry, so the dependency chain is one FMA + one permute per W elements instead of one FMA per
//    element. Rows with per-element gates or resets use a sequential loop. Both keep the carry into a segment
//    apart from the segment's own scan (Chain), so the dispatcher can cut long rows into chunks of a fixed length
//    and chain them in the same arithmetic whatever the thread count.
//  * inner > 1 (scan along a middle dim, e.g. time-major [T, B] with dim=0): independent columns sit in SIMD
//    lanes and the loop over time carries a vector of states; the compiler vectorises the column loop.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/problem.h"

namespace altgrad_dc {
namespace {

// ------------------------------------------------------------------------------------------------------------
// Scalar conversions for the 16-bit formats.
// ------------------------------------------------------------------------------------------------------------
inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                        // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// C++ _Float16: clang, GCC >= 12 on x86-64, GCC >= 13 on aarch64 (GCC 12 defines __FLT16_MANT_DIG__ there but
// rejects _Float16 in C++). Elsewhere (MSVC too) the bit-exact portable conversions below are used.
#if defined(__FLT16_MANT_DIG__) && (defined(__x86_64__) || defined(__aarch64__)) && \
    (defined(__clang__) || defined(__x86_64__) || __GNUC__ >= 13)
inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
inline uint16_t float_to_half(float f) {
  _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
#else
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
  if (exp == 0) {
    float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (ax < 0x38800000u) {  // subnormal result: let the FPU round at ulp 2^-24
    float a;
    std::memcpy(&a, &ax, 4);
    a += 0.5f;
    uint32_t r;
    std::memcpy(&r, &a, 4);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (ax >> 13));
}
#endif

// IO<D>: storage type S, SIMD compute type C, sequential accumulator A, gate/init type G.
template <int D> struct IO;
template <> struct IO<kFloat32> {
  using S = float; using C = float; using A = double; using G = float;
  static inline float load(const S* p, int64_t i) { return p[i]; }
  static inline void store(S* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
};
template <> struct IO<kFloat64> {
  using S = double; using C = double; using A = double; using G = double;
  static inline double load(const S* p, int64_t i) { return p[i]; }
  static inline void store(S* p, int64_t i, double v) { p[i] = v; }
};
template <> struct IO<kFloat16> {
  using S = uint16_t; using C = float; using A = float; using G = float;
  static inline float load(const S* p, int64_t i) { return half_to_float(p[i]); }
  static inline void store(S* p, int64_t i, float v) { p[i] = float_to_half(v); }
};
template <> struct IO<kBFloat16> {
  using S = uint16_t; using C = float; using A = float; using G = float;
  static inline float load(const S* p, int64_t i) { return bf16_to_float(p[i]); }
  static inline void store(S* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};

template <typename C> inline C ipow(C g, int64_t k) {
  C r = C(1);
  while (k > 0) {
    if (k & 1) r *= g;
    g *= g;
    k >>= 1;
  }
  return r;
}

// ------------------------------------------------------------------------------------------------------------
// In-register scan of W consecutive elements with a gate that is constant along the row.
// ------------------------------------------------------------------------------------------------------------
#if defined(__GNUC__) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define ALTGRAD_SIMD 1
#endif
#endif

#ifdef ALTGRAD_SIMD
template <typename C> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(ALTGRAD_VEC_BYTES), aligned(4)));
  static constexpr int W = ALTGRAD_VEC_BYTES / 4;
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(ALTGRAD_VEC_BYTES), aligned(8)));
  static constexpr int W = ALTGRAD_VEC_BYTES / 8;
};

// V has the element's alignment, so dereferencing a V* is an unaligned vector load/store.

// Lane i takes v[i-K] (Up == false) or v[i+K] (Up == true); lanes shifted in from outside are 0.
template <int K, bool Up, typename V, std::size_t... I>
inline V shift_lanes(V v, std::index_sequence<I...>) {
  constexpr int W = static_cast<int>(sizeof...(I));
  const V z = {};
  if constexpr (Up) {
    return __builtin_shufflevector(v, z, (static_cast<int>(I) + K < W ? static_cast<int>(I) + K : W + static_cast<int>(I))...);
  } else {
    return __builtin_shufflevector(v, z, (static_cast<int>(I) >= K ? static_cast<int>(I) - K : W + static_cast<int>(I))...);
  }
}
template <int L, typename V, std::size_t... I>
inline V broadcast_lane(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (static_cast<int>(I) * 0 + L)...);
}

template <typename C, bool Up>
inline typename Vec<C>::V local_scan(typename Vec<C>::V v, const typename Vec<C>::V* gpow) {
  constexpr int W = Vec<C>::W;
  using Seq = std::make_index_sequence<W>;
  if constexpr (W > 1) v += gpow[0] * shift_lanes<1, Up>(v, Seq{});
  if constexpr (W > 2) v += gpow[1] * shift_lanes<2, Up>(v, Seq{});
  if constexpr (W > 4) v += gpow[2] * shift_lanes<4, Up>(v, Seq{});
  if constexpr (W > 8) v += gpow[3] * shift_lanes<8, Up>(v, Seq{});
  return v;
}
#endif

// Per-gate constants of the in-register scan, recomputed only when the gate or the direction changes (rows that
// share a discount reuse them, which matters for many short rows).
template <typename C>
struct ConstPlan {
#ifdef ALTGRAD_SIMD
  using V = typename Vec<C>::V;
  static constexpr int W = Vec<C>::W;
  V gpow[4];  // g, g^2, g^4, g^8 in every lane
  V P;        // P[i] = g^(i+1) (forward) or g^(W-i) (reverse)
  double gW = 0.0;
  double g = 0.0;
  int reverse = -1;
  void prepare(double gate, bool rev) {
    if (reverse == static_cast<int>(rev) && g == gate) return;
    g = gate;
    reverse = rev;
    double p = gate;
    for (int k = 0; k < 4; ++k) {
      for (int i = 0; i < W; ++i) gpow[k][i] = static_cast<C>(p);
      p *= p;
    }
    double q = 1.0;
    for (int i = 0; i < W; ++i) {
      q *= gate;
      P[rev ? W - 1 - i : i] = static_cast<C>(q);
    }
    gW = ipow(gate, W);
  }
#endif
};

// State of a scan whose value before its first element (the carry) is kept apart: y = z + f, where z is the
// segment scanned from zero and f = carry * (product of the gates so far). z is what the segment passes on
// (SegmentSummary::last), computed by the same operations whether or not a carry is given or y is written, so
// the dispatcher can chain segments that were scanned in any order, on any thread (see dispatch.cpp).
struct Chain {
  double z = 0.0;        // the from-zero scan's last value
  double f = 0.0;        // carry * product of the gates so far (when `carry`)
  bool started = false;  // z holds a value (else the next element is copied)
  bool carry = false;    // a carry is being added
};

template <bool B> struct Reverse {
  static constexpr bool value = B;
};

// Scans x[0, len) with constant gate g, continuing `st`; forward scans upwards, reverse downwards. Writes y (may
// alias x) only if `store`.
template <typename C>
void scan_const(const C* x, C* y, int64_t len, double g, Chain& st, bool reverse, bool store,
                ConstPlan<C>* plan = nullptr) {
  if (len <= 0) return;
  if (g == 0.0) {  // every step is a cut: y = x, and a NaN/inf carry must not turn into 0 * inf
    if (store) {
      for (int64_t t = 0; t < len; ++t) y[t] = x[t];
    }
    st = Chain{static_cast<double>(x[reverse ? 0 : len - 1]), 0.0, true, false};
    return;
  }
  // Locals, not st's fields: stores to y (double* for float64) could alias them and force reloads.
  double z = st.z, f = st.f;
  bool started = st.started;
  const bool carry = st.carry;
  auto step = [&](int64_t t) {
    z = started ? static_cast<double>(x[t]) + g * z : static_cast<double>(x[t]);
    started = true;
    double out = z;
    if (carry) {
      f *= g;
      out += f;
    }
    if (store) y[t] = static_cast<C>(out);
  };
#ifdef ALTGRAD_SIMD
  using VT = Vec<C>;
  using V = typename VT::V;
  constexpr int W = VT::W;
  if (len >= 2 * W) {
    ConstPlan<C> local;
    if (plan == nullptr) plan = &local;
    plan->prepare(g, reverse);
    const V* gpow = plan->gpow;
    const V P = plan->P;
    // The chains between blocks run in double: z_last = v_last + g^W * z and f *= g^W depend on the previous
    // block through one scalar operation each (independent of each other), and double keeps the float32 result
    // as accurate as a tree sum.
    const double gW = plan->gW;
    const int64_t nb = len / W;
    auto block = [&](int64_t b, auto dir) {
      constexpr bool rev = decltype(dir)::value;
      V v = *reinterpret_cast<const V*>(x + b * W);
      v = local_scan<C, rev>(v, gpow);
      const double edge = static_cast<double>(v[rev ? 0 : W - 1]);
      if (started || carry) v += P * static_cast<C>(carry ? z + f : z);
      z = started ? edge + gW * z : edge;
      started = true;
      if (carry) f *= gW;
      if (store) *reinterpret_cast<V*>(y + b * W) = v;
    };
    if (!reverse) {
      for (int64_t b = 0; b < nb; ++b) block(b, Reverse<false>{});
      for (int64_t t = nb * W; t < len; ++t) step(t);
    } else {
      for (int64_t t = len - 1; t >= nb * W; --t) step(t);
      for (int64_t b = nb - 1; b >= 0; --b) block(b, Reverse<true>{});
    }
  } else
#endif
  {
    for (int64_t s = 0; s < len; ++s) step(reverse ? len - 1 - s : s);
  }
  st = Chain{z, f, started, carry};
}

// ------------------------------------------------------------------------------------------------------------
// Row helpers (inner == 1). Array range [a, b) of row `row`; scan order is ascending (forward) or descending.
// ------------------------------------------------------------------------------------------------------------
constexpr int64_t kBuf = 1024;

template <int D>
void const_range(const ScanProblem* p, int64_t row, int64_t a, int64_t b, Chain& st, bool store,
                 ConstPlan<typename IO<D>::C>* plan = nullptr) {
  using T = IO<D>;
  using C = typename T::C;
  const int64_t n = p->n;
  const auto* x = static_cast<const typename T::S*>(p->x) + row * n;
  auto* y = static_cast<typename T::S*>(p->y) + row * n;
  const double g = static_cast<const double*>(p->gate)[row];
  const bool rev = p->reverse != 0;
  if constexpr (D == kFloat32 || D == kFloat64) {
    scan_const<C>(x + a, y + a, b - a, g, st, rev, store, plan);
  } else {
    C buf[kBuf];
    const int64_t len = b - a;
    for (int64_t done = 0; done < len; done += kBuf) {
      const int64_t m = len - done < kBuf ? len - done : kBuf;
      const int64_t start = rev ? b - done - m : a + done;
      for (int64_t i = 0; i < m; ++i) buf[i] = T::load(x, start + i);
      scan_const<C>(buf, buf, m, g, st, rev, true, plan);  // the buffer is always written: same operations
      if (store) {
        for (int64_t i = 0; i < m; ++i) T::store(y, start + i, buf[i]);
      }
    }
  }
}

// Sequential scan over scan-order positions [s0, s1) of a row with per-element gates and/or resets, the carry
// kept apart as in Chain (y = z + f, f in double). A zero gate (reset) selects z = x and ends the carry: nothing is ever
// multiplied by 0, so a NaN or inf cannot cross it.
template <int D>
void seq_segment(const ScanProblem* p, int64_t row, int64_t s0, int64_t s1, double carry_in, bool has_carry,
                 bool store, SegmentSummary* out) {
  using T = IO<D>;
  using A = typename T::A;
  using G = typename T::G;
  const int64_t n = p->n;
  const auto* x = static_cast<const typename T::S*>(p->x) + row * n;
  auto* y = static_cast<typename T::S*>(p->y) + row * n;
  const G* gate = static_cast<const G*>(p->gate);
  const G* ge = p->gate_per_elem ? gate + row * n : nullptr;
  const A gc = p->gate_per_elem ? A(0) : static_cast<A>(static_cast<const double*>(p->gate)[row]);
  const uint8_t* dn = p->done ? p->done + row * n : nullptr;
  const bool rev = p->reverse != 0;
  A z = A(0);
  double f = carry_in;  // in double whatever the storage type: a long chunk multiplies it once per step
  bool carry = has_carry;
  double pr = 1.0;
  bool cut = false;
  auto gate_at = [&](int64_t t) {
    const A a = static_cast<A>(ge ? ge[t] : gc);
    return (dn && dn[t]) ? A(0) : a;
  };
  // Three loops with the same operations: the first element (z = x), elements while the carry is added, and
  // elements after a reset ended it, so that no loop tests flags that change inside it.
  int64_t s = s0;
  if (s < s1) {
    const int64_t t = rev ? n - 1 - s : s;
    const A a = gate_at(t);
    z = static_cast<A>(T::load(x, t));
    A y_t = z;
    if (carry && a == A(0)) carry = false;
    if (carry) {
      f *= static_cast<double>(a);
      y_t = static_cast<A>(static_cast<double>(z) + f);
    }
    cut |= a == A(0);
    pr *= static_cast<double>(a);
    if (store) T::store(y, t, y_t);
    ++s;
  }
  for (; carry && s < s1; ++s) {
    const int64_t t = rev ? n - 1 - s : s;
    const A a = gate_at(t);
    const A v = static_cast<A>(T::load(x, t));
    if (a == A(0)) {
      z = v;
      carry = false;
      cut = true;
      pr *= static_cast<double>(a);
      if (store) T::store(y, t, z);
      continue;
    }
    z = v + a * z;
    f *= static_cast<double>(a);
    pr *= static_cast<double>(a);
    if (store) T::store(y, t, static_cast<A>(static_cast<double>(z) + f));
  }
  for (; s < s1; ++s) {
    const int64_t t = rev ? n - 1 - s : s;
    const A a = gate_at(t);
    const A v = static_cast<A>(T::load(x, t));
    z = a != A(0) ? v + a * z : v;
    cut |= a == A(0);
    pr *= static_cast<double>(a);
    if (store) T::store(y, t, z);
  }
  if (out) *out = SegmentSummary{static_cast<double>(z), pr, cut ? 1 : 0};
}

inline bool fast_rows(const ScanProblem* p) { return !p->gate_per_elem && p->done == nullptr; }

template <int D>
void rows_impl(const ScanProblem* p, int64_t r0, int64_t r1) {
  const double* init = p->init;
  ConstPlan<typename IO<D>::C> plan;
  // Reverse scans walk each row downwards; visiting the rows downwards too keeps the whole access pattern one
  // descending stream, which the hardware prefetchers follow (2x faster for many short rows).
  for (int64_t k = r0; k < r1; ++k) {
    const int64_t r = p->reverse ? r1 - 1 - (k - r0) : k;
    const double carry = init ? init[r] : 0.0;
    if (fast_rows(p)) {
      Chain st;
      st.f = carry;
      st.carry = init != nullptr;
      const_range<D>(p, r, 0, p->n, st, true, &plan);
    } else {
      seq_segment<D>(p, r, 0, p->n, carry, init != nullptr, true, nullptr);
    }
  }
}

template <int D>
void segment_impl(const ScanProblem* p, int64_t row, int64_t s0, int64_t s1, double carry, int has_carry,
                  int store, SegmentSummary* out) {
  if (fast_rows(p)) {
    const int64_t n = p->n;
    const int64_t a = p->reverse ? n - s1 : s0, b = p->reverse ? n - s0 : s1;
    const double g = static_cast<const double*>(p->gate)[row];
    Chain st;
    st.f = carry;
    st.carry = has_carry != 0;
    ConstPlan<typename IO<D>::C> plan;  // prepared once per segment, not once per 16-bit buffer
    const_range<D>(p, row, a, b, st, store != 0, &plan);
    *out = SegmentSummary{st.z, ipow(g, s1 - s0), (g == 0.0 && s1 > s0) ? 1 : 0};
  } else {
    seq_segment<D>(p, row, s0, s1, carry, has_carry != 0, store != 0, out);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Columns (inner > 1): the loop over columns is contiguous and vectorised by the compiler.
// ------------------------------------------------------------------------------------------------------------
template <int D, typename G>
void columns_typed(const ScanProblem* p, int64_t i0, int64_t i1) {
  using T = IO<D>;
  using A = typename T::A;
  using S = typename T::S;
  const int64_t n = p->n, inner = p->inner;
  const int64_t nblocks = (inner + kColumnBlock - 1) / kColumnBlock;
  const S* x = static_cast<const S*>(p->x);
  S* y = static_cast<S*>(p->y);
  const G* gate = static_cast<const G*>(p->gate);
  const double* init = p->init;
  A carry[kColumnBlock];
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t o = item / nblocks, c0 = (item % nblocks) * kColumnBlock;
    const int64_t m = inner - c0 < kColumnBlock ? inner - c0 : kColumnBlock;
    bool has_carry = init != nullptr;
    if (has_carry) {
      for (int64_t j = 0; j < m; ++j) carry[j] = static_cast<A>(init[o * inner + c0 + j]);
    }
    for (int64_t s = 0; s < n; ++s) {
      const int64_t t = p->reverse ? n - 1 - s : s;
      const int64_t base = (o * n + t) * inner + c0;
      const S* __restrict xr = x + base;
      S* __restrict yr = y + base;
      const G* __restrict gr = p->gate_per_elem ? gate + base : gate + o * inner + c0;
      if (!has_carry) {
        for (int64_t j = 0; j < m; ++j) {
          const A v = static_cast<A>(T::load(xr, j));
          carry[j] = v;
          T::store(yr, j, v);
        }
        has_carry = true;
      } else if (p->done) {
        // A reset or a zero gate selects x (never 0 * carry, which is NaN for a NaN/inf carry).
        const uint8_t* __restrict dr = p->done + base;
        for (int64_t j = 0; j < m; ++j) {
          const A xv = static_cast<A>(T::load(xr, j));
          const A a = static_cast<A>(gr[j]);
          const A v = (dr[j] || a == A(0)) ? xv : xv + a * carry[j];
          carry[j] = v;
          T::store(yr, j, v);
        }
      } else {
        for (int64_t j = 0; j < m; ++j) {
          const A xv = static_cast<A>(T::load(xr, j));
          const A a = static_cast<A>(gr[j]);
          const A v = a == A(0) ? xv : xv + a * carry[j];
          carry[j] = v;
          T::store(yr, j, v);
        }
      }
    }
  }
}

template <int D>
void columns_impl(const ScanProblem* p, int64_t i0, int64_t i1) {
  if (p->gate_per_elem) {
    columns_typed<D, typename IO<D>::G>(p, i0, i1);
  } else {
    columns_typed<D, double>(p, i0, i1);
  }
}

#include "cpu/rl_kernel.h"

// ------------------------------------------------------------------------------------------------------------
// dtype dispatch
// ------------------------------------------------------------------------------------------------------------
#define ALTGRAD_DISPATCH(dtype, FN, ...)                      \
  switch (dtype) {                                            \
    case kFloat32: FN<kFloat32>(__VA_ARGS__); break;          \
    case kFloat64: FN<kFloat64>(__VA_ARGS__); break;          \
    case kFloat16: FN<kFloat16>(__VA_ARGS__); break;          \
    case kBFloat16: FN<kBFloat16>(__VA_ARGS__); break;        \
    default: break;                                           \
  }

void rows_entry(const ScanProblem* p, int64_t r0, int64_t r1) { ALTGRAD_DISPATCH(p->dtype, rows_impl, p, r0, r1) }
void columns_entry(const ScanProblem* p, int64_t i0, int64_t i1) {
  ALTGRAD_DISPATCH(p->dtype, columns_impl, p, i0, i1)
}
void segment_entry(const ScanProblem* p, int64_t row, int64_t s0, int64_t s1, double carry, int has_carry,
                   int store, SegmentSummary* out) {
  ALTGRAD_DISPATCH(p->dtype, segment_impl, p, row, s0, s1, carry, has_carry, store, out)
}
void rl_rows_entry(const RlProblem* p, int64_t r0, int64_t r1) { ALTGRAD_DISPATCH(p->dtype, rl_rows_impl, p, r0, r1) }
void rl_columns_entry(const RlProblem* p, int64_t i0, int64_t i1) {
  ALTGRAD_DISPATCH(p->dtype, rl_columns_impl, p, i0, i1)
}
#undef ALTGRAD_DISPATCH

const Kernels kTable = {ALTGRAD_ISA_NAME, rows_entry, columns_entry, segment_entry, rl_rows_entry, rl_columns_entry};

}  // namespace

const Kernels* ALTGRAD_ISA_ENTRY() { return &kTable; }

}  // namespace altgrad_dc
