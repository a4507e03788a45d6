// Picks the kernels for this CPU and spreads one call over threads (compiled with baseline flags only).
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "cpu/problem.h"

namespace altgrad_dc {
namespace {

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t(1) << 16;
// Rows at least this long are split into chunks when there are fewer rows than threads.
constexpr int64_t kMinChunkedRow = int64_t(1) << 18;

const Kernels* select_kernels() {
#if defined(ALTGRAD_X86_DISPATCH) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma")) {
    return kernels_avx512();
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return kernels_avx2();
  }
#endif
  return kernels_baseline();
}

const Kernels* kernels() {
  static const Kernels* k = select_kernels();
  return k;
}

// Runs fn(k) for k in [0, parts) with parts - 1 extra threads; part 0 runs on the calling thread.
template <typename Fn>
void parallel_parts(int parts, const Fn& fn) {
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

// One long row on `parts` threads: chunk 0 is scanned with the true initial value while chunks 1.. are scanned
// from zero; the carries are then chained serially and chunks 1.. get carry * (product of gates) added.
// Chunk 0 is twice as long as the others because it needs no second pass.
void chunked_row(const Kernels* K, const ScanProblem& p, int64_t row, int parts, double init, bool has_init) {
  const int64_t n = p.n;
  const int64_t unit = n / (parts + 1);
  std::vector<int64_t> bounds(static_cast<std::size_t>(parts) + 1);
  bounds[0] = 0;
  bounds[1] = n - unit * (parts - 1);
  for (int k = 2; k <= parts; ++k) bounds[k] = bounds[k - 1] + unit;
  std::vector<double> last(static_cast<std::size_t>(parts)), prod(static_cast<std::size_t>(parts));
  parallel_parts(parts, [&](int k) {
    K->segment(&p, row, bounds[k], bounds[k + 1], k == 0 ? init : 0.0, k == 0 ? has_init : 0, &last[k], &prod[k]);
  });
  std::vector<double> carry_in(static_cast<std::size_t>(parts));
  double c = last[0];
  for (int k = 1; k < parts; ++k) {
    carry_in[k] = c;
    c = last[k] + prod[k] * c;
  }
  parallel_parts(parts - 1, [&](int k) { K->fixup(&p, row, bounds[k + 1], bounds[k + 2], carry_in[k + 1]); });
}

}  // namespace

const char* cpu_isa() { return kernels()->name; }

void run_scan(const ScanProblem& p, int num_threads) {
  const Kernels* K = kernels();
  const int64_t numel = p.outer * p.n * p.inner;
  if (numel == 0) return;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, 256));
  threads = std::min<int64_t>(threads, std::max<int64_t>(1, numel / kMinElementsPerThread));

  if (p.inner == 1) {
    const int64_t rows = p.outer;
    if (rows < threads && p.n >= kMinChunkedRow) {
      const int parts = static_cast<int>(std::min<int64_t>(threads, p.n / (kMinChunkedRow / 2)));
      for (int64_t r = 0; r < rows; ++r) {
        const double init = p.init ? p.init[r] : 0.0;
        chunked_row(K, p, r, std::max(parts, 1), init, p.init != nullptr);
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

}  // namespace altgrad_dc
