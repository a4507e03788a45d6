// Picks the kernels for this CPU and spreads one call over threads (compiled with baseline flags only).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <dlfcn.h>
#endif

#include "cpu/problem.h"

namespace altgrad_dc {
namespace {

// Below this many elements per thread, starting a thread costs more than it saves.
int64_t g_min_elements_per_thread = int64_t(1) << 16;
// Rows at least this long are split into chunks of a fixed length (chunk_length()), whatever the thread count.
int64_t g_min_chunked_row = int64_t(1) << 18;

struct IsaEntry {
  const char* name;
  const Kernels* (*get)();
  bool (*supported)();
};

bool always() { return true; }
#if defined(ALTGRAD_X86_DISPATCH) && (defined(__GNUC__) || defined(__clang__))
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && has_avx2();
}
// Best first.
const IsaEntry kIsas[] = {{"avx512", kernels_avx512, has_avx512},
                          {"avx2", kernels_avx2, has_avx2},
                          {"baseline", kernels_baseline, always}};
#else
const IsaEntry kIsas[] = {{"baseline", kernels_baseline, always}};
#endif
const char* const kKnownIsas = "baseline, avx2, avx512";

std::string supported_list() {
  std::string s;
  for (const IsaEntry& e : kIsas) {
    if (!e.supported()) continue;
    if (!s.empty()) s += ", ";
    s += e.name;
  }
  return s;
}

// ALTGRAD_CPU_ISA=baseline|avx2|avx512 forces the kernels (used to test every compiled instruction set on one
// machine); unset or empty picks the best one this CPU supports.
const Kernels* select_kernels() {
  const char* env = std::getenv("ALTGRAD_CPU_ISA");
  if (env == nullptr || *env == '\0') {
    for (const IsaEntry& e : kIsas) {
      if (e.supported()) return e.get();
    }
  }
  const std::string want(env);
  for (const IsaEntry& e : kIsas) {
    if (want != e.name) continue;
    if (!e.supported()) {
      throw std::runtime_error("ALTGRAD_CPU_ISA=" + want + ": this CPU does not support " + want +
                               " (supported here: " + supported_list() + "); unset it or choose one of those");
    }
    return e.get();
  }
  if (want == "avx2" || want == "avx512") {
    throw std::runtime_error("ALTGRAD_CPU_ISA=" + want + ": this build has no " + want +
                             " kernels (compiled here: " + supported_list() + ")");
  }
  throw std::runtime_error("ALTGRAD_CPU_ISA=" + want + " is not one of " + kKnownIsas +
                           " (supported here: " + supported_list() + ")");
}

const Kernels* kernels() {
  static const Kernels* k = select_kernels();  // a throw leaves it unset, so every later call reports it again
  return k;
}

// Runs fn(k) for k in [0, parts) with parts - 1 extra threads of our own; part 0 runs on the calling thread. The
// parts run at the same time (chunked_row's barrier relies on it).
template <typename Fn>
void thread_parts(int parts, const Fn& fn) {
  if (parts <= 1) {
    fn(0);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<std::size_t>(parts - 1));
  for (int k = 1; k < parts; ++k) workers.emplace_back([&fn, k] { fn(k); });
  fn(0);
  for (auto& w : workers) w.join();
}

// torch's own OpenMP runtime (the GNU one its CPU wheels load, found by its soname among the libraries already
// loaded), used for independent parts. After a parallel op torch's OpenMP workers spin-wait on their cores for a
// while: threads of our own shared those cores with them, while the spinning workers take our parts at once and
// no thread is started. Measured, GAE at (4096, 128) on 2 threads, 2-core Xeon: our own threads 0.70 ms alone and
// 1.14-1.44 ms right after a matmul; torch's workers 0.52 and 0.56-0.61 ms. Not found (another OpenMP, not Linux)
// or ALTGRAD_CPU_THREADS=std (see select_gomp): our own threads. Only for parts that never wait for each other: a smaller team
// than asked for (a call from inside a parallel region) runs several parts one after another.
struct Gomp {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
};

Gomp loaded_gomp() {
  Gomp g;
#if defined(__linux__)
  void* h = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return g;
  Gomp f;
  f.parallel = reinterpret_cast<decltype(f.parallel)>(dlsym(h, "GOMP_parallel"));
  f.thread_num = reinterpret_cast<decltype(f.thread_num)>(dlsym(h, "omp_get_thread_num"));
  f.num_threads = reinterpret_cast<decltype(f.num_threads)>(dlsym(h, "omp_get_num_threads"));
  if (f.parallel != nullptr && f.thread_num != nullptr && f.num_threads != nullptr) g = f;
#endif
  return g;
}

// ALTGRAD_CPU_THREADS=std|openmp forces the pool (std: our own threads; openmp: torch's, an error where it is not
// found); unset or empty picks torch's when found. Anything else is an error, as for ALTGRAD_CPU_ISA.
Gomp select_gomp() {
  const char* env = std::getenv("ALTGRAD_CPU_THREADS");
  const std::string want = env == nullptr ? "" : env;
  if (want == "std") return Gomp{};
  if (!want.empty() && want != "openmp") {
    throw std::runtime_error("ALTGRAD_CPU_THREADS=" + want +
                             " is not one of std, openmp (or unset: torch's OpenMP workers when found)");
  }
  const Gomp g = loaded_gomp();
  if (!want.empty() && g.parallel == nullptr) {
    throw std::runtime_error(
        "ALTGRAD_CPU_THREADS=openmp: torch's GNU OpenMP runtime (libgomp.so.1) is not loaded in this process; "
        "unset it or choose std");
  }
  return g;
}

const Gomp& gomp() {
  // Looked up at the first parallel call, when torch is loaded; a throw leaves it unset, so every later call
  // reports it again.
  static const Gomp g = select_gomp();
  return g;
}

template <typename Fn>
struct GompTask {
  const Fn* fn;
  int parts;
};

template <typename Fn>
void gomp_body(void* data) {
  const auto* t = static_cast<const GompTask<Fn>*>(data);
  const int team = gomp().num_threads(), me = gomp().thread_num();
  for (int k = me; k < t->parts; k += team) (*t->fn)(k);  // a smaller team than asked for takes several parts
}

// Runs fn(k) for k in [0, parts): independent parts, on torch's OpenMP workers when found (see Gomp), else on
// threads of our own.
template <typename Fn>
void parallel_parts(int parts, const Fn& fn) {
  if (parts <= 1) {
    fn(0);
    return;
  }
  const Gomp& g = gomp();
  if (g.parallel == nullptr) {
    thread_parts(parts, fn);
    return;
  }
  GompTask<Fn> task{&fn, parts};
  g.parallel(&gomp_body<Fn>, &task, static_cast<unsigned>(parts), 0);
}

// The carry c after a segment that was scanned from zero: s.last + s.prod * c, as the sequential recurrence
// computes it. A cut (zero gate) selects s.last: the carry is never multiplied by 0, so NaN/inf cannot leak
// through a reset. An underflowed product (long segments: 0.99^131072 < 1e-308) times an infinite carry is
// that infinity, as in the sequential loop, not 0 * inf = NaN.
double carry_through(const SegmentSummary& s, double c) {
  if (s.cut) return s.last;
  double through = s.prod * c;
  if (std::isnan(through) && !std::isnan(c) && !std::isnan(s.prod)) {
    through = s.prod == 0.0 ? (std::signbit(s.prod) ? -c : c) : 0.0;  // 0 * inf after underflow; inf * 0
  }
  return s.last + through;
}

// Chunk length of the long-row path: fixed (2^15 steps by default, a cache-sized piece), so the chunks of a row
// depend on its length only.
int64_t chunk_length() { return std::max<int64_t>(g_min_chunked_row / 8, 1); }

// One long row, cut into chunks of chunk_length() steps (scan order), on up to `parts` threads. Each chunk is
// scanned from the carry c_k before it, and c_{k+1} = carry_through(summary_k, c_k), where summary_k is the
// chunk's from-zero summary (the same bits whether the chunk was scanned with its carry or only summarized). So
// the arithmetic is fixed by the row alone and the result is bit-identical for every thread count; threads only
// decide where each chunk is computed. One thread scans the chunks in order. Several threads: the chunks are
// split into `parts` contiguous ranges; all ranges but the last are summarized (read-only) in parallel, then each
// thread chains the carries into its range and scans it.
void chunked_row(const Kernels* K, const ScanProblem& p, int64_t row, int parts, double init, bool has_init) {
  const int64_t n = p.n, len = chunk_length(), count = (n + len - 1) / len;
  auto lo = [&](int64_t k) { return k * len; };
  auto hi = [&](int64_t k) { return std::min(n, (k + 1) * len); };
  // Scans chunks [k0, k1) in order starting from carry c (has: whether there is one).
  auto run = [&](int64_t k0, int64_t k1, double c, bool has) {
    for (int64_t k = k0; k < k1; ++k) {
      SegmentSummary s;
      K->segment(&p, row, lo(k), hi(k), c, has ? 1 : 0, 1, &s);
      c = has ? carry_through(s, c) : s.last;
      has = true;
    }
  };
  parts = static_cast<int>(std::min<int64_t>(parts, count));
  if (parts <= 1) {
    run(0, count, init, has_init);
    return;
  }
  auto first = [&](int j) { return count * j / parts; };
  const int64_t summarized = first(parts - 1);  // the chunks before the last range
  std::vector<SegmentSummary> seg(static_cast<std::size_t>(summarized));
  std::atomic<int> arrived{0};
  // One parallel region (starting threads twice costs more than the chunks on a busy machine): every thread
  // summarizes its share of the chunks before the last range, waits for the others, chains the carries up to
  // its own range (the same operations on every thread), and scans its range.
  thread_parts(parts, [&](int j) {  // our own threads: the parts wait for each other
    for (int64_t k = summarized * j / parts; k < summarized * (j + 1) / parts; ++k) {
      K->segment(&p, row, lo(k), hi(k), 0.0, 0, 0, &seg[static_cast<std::size_t>(k)]);
    }
    arrived.fetch_add(1, std::memory_order_acq_rel);
    for (int spins = 0; arrived.load(std::memory_order_acquire) < parts; ++spins) {
      if (spins > 4096) std::this_thread::yield();  // spin briefly, then let a descheduled thread run
    }
    double c = init;
    bool h = has_init;
    for (int64_t k = 0; k < first(j); ++k) {
      c = h ? carry_through(seg[static_cast<std::size_t>(k)], c) : seg[static_cast<std::size_t>(k)].last;
      h = true;
    }
    run(first(j), first(j + 1), c, h);
  });
}

}  // namespace

const char* cpu_isa() { return kernels()->name; }

const char* thread_pool_name() { return gomp().parallel != nullptr ? "openmp" : "std"; }

const char* supported_isas() {
  static const std::string s = supported_list();
  return s.c_str();
}

void set_tuning(int64_t* min_chunked_row, int64_t* min_elements_per_thread) {
  std::swap(g_min_chunked_row, *min_chunked_row);
  std::swap(g_min_elements_per_thread, *min_elements_per_thread);
  g_min_chunked_row = std::max<int64_t>(g_min_chunked_row, 2);
  g_min_elements_per_thread = std::max<int64_t>(g_min_elements_per_thread, 1);
}

void run_scan(const ScanProblem& p, int num_threads) {
  const Kernels* K = kernels();
  const int64_t numel = p.outer * p.n * p.inner;
  if (numel == 0) return;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, 256));
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, numel / g_min_elements_per_thread));

  if (p.inner == 1) {
    const int64_t rows = p.outer;
    if (p.n >= g_min_chunked_row) {
      // Long rows are always chunked the same way (see chunked_row); threads take whole rows when there are
      // enough of them, else the chunks of one row.
      auto row = [&](int64_t r, int parts) {
        chunked_row(K, p, r, parts, p.init ? p.init[r] : 0.0, p.init != nullptr);
      };
      if (rows < threads) {
        for (int64_t r = 0; r < rows; ++r) row(r, static_cast<int>(threads));
      } else {
        const int parts = static_cast<int>(threads);
        parallel_parts(parts, [&](int k) {
          for (int64_t r = rows * k / parts; r < rows * (k + 1) / parts; ++r) row(r, 1);
        });
      }
      return;
    }
    const int parts = static_cast<int>(std::min<int64_t>(threads, rows));
    parallel_parts(parts, [&](int k) { K->rows(&p, rows * k / parts, rows * (k + 1) / parts); });
    return;
  }
  const int64_t items = p.outer * ((p.inner + kColumnBlock - 1) / kColumnBlock);
  const int parts = static_cast<int>(std::min<int64_t>(threads, items));
  parallel_parts(parts, [&](int k) { K->columns(&p, items * k / parts, items * (k + 1) / parts); });
}

void run_rl(const RlProblem& p, int num_threads) {
  const Kernels* K = kernels();
  const int64_t numel = p.outer * p.n * p.inner;
  if (numel == 0) return;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, 256));
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, numel / g_min_elements_per_thread));
  // Independent rows (inner == 1) or groups of kRlColumns adjacent columns, split evenly among the threads.
  const bool rows = p.inner == 1;
  const int64_t items = rows ? p.outer : p.outer * ((p.inner + kRlColumns - 1) / kRlColumns);
  const int parts = static_cast<int>(std::min<int64_t>(threads, items));
  parallel_parts(parts, [&](int k) {
    const int64_t i0 = items * k / parts, i1 = items * (k + 1) / parts;
    if (rows) {
      K->rl_rows(&p, i0, i1);
    } else {
      K->rl_columns(&p, i0, i1);
    }
  });
}

}  // namespace altgrad_dc
