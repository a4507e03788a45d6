// pybind11 bindings of the CPU kernels. Tensors arrive as raw addresses (tensor.data_ptr()) plus sizes, so this
// module never includes or links torch; the Python side (altgrad/discounted_cumsum/_native.py) validates,
// makes the buffers contiguous and owns their lifetime.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cpu/problem.h"

namespace py = pybind11;

namespace {

void scan(std::uintptr_t x, std::uintptr_t y, int dtype, int64_t outer, int64_t n, int64_t inner,
          std::uintptr_t gate, double gate_value, bool gate_per_elem, std::uintptr_t done, std::uintptr_t init,
          bool reverse, int num_threads) {
  if (dtype < altgrad_dc::kFloat32 || dtype > altgrad_dc::kBFloat16) throw std::invalid_argument("scan: unknown dtype code");
  if (outer < 0 || n < 0 || inner < 0) throw std::invalid_argument("scan: negative size");
  if (outer * n * inner > 0 && (x == 0 || y == 0 || (gate == 0 && gate_per_elem))) {
    throw std::invalid_argument("scan: null pointer");
  }
  // gate == 0: one discount for every row, given by value (saves allocating a tensor in Python).
  std::vector<double> gate_rows;
  if (gate == 0) {
    gate_rows.assign(static_cast<std::size_t>(outer * inner), gate_value);
    gate = reinterpret_cast<std::uintptr_t>(gate_rows.data());
  }
  altgrad_dc::ScanProblem p;
  p.x = reinterpret_cast<const void*>(x);
  p.y = reinterpret_cast<void*>(y);
  p.outer = outer;
  p.n = n;
  p.inner = inner;
  p.gate = reinterpret_cast<const void*>(gate);
  p.gate_per_elem = gate_per_elem ? 1 : 0;
  p.done = reinterpret_cast<const std::uint8_t*>(done);
  p.init = reinterpret_cast<const double*>(init);
  p.reverse = reverse ? 1 : 0;
  p.dtype = dtype;
  py::gil_scoped_release release;
  altgrad_dc::run_scan(p, num_threads);
}

// gamma / lam == 0: one value for every row, given by value (gamma_value / lam_value).
void rl(int mode, std::uintptr_t reward, std::uintptr_t value, std::uintptr_t next_value, std::uintptr_t log_pi,
        std::uintptr_t log_mu, std::uintptr_t out1, std::uintptr_t out2, int dtype, int64_t outer, int64_t n,
        int64_t inner, std::uintptr_t gamma, double gamma_value, bool gamma_per_elem, std::uintptr_t lam,
        double lam_value, bool lam_per_elem, std::uintptr_t done, std::uintptr_t terminated, std::uintptr_t boot,
        double rho_bar, double c_bar, int num_threads) {
  if (dtype < altgrad_dc::kFloat32 || dtype > altgrad_dc::kBFloat16) throw std::invalid_argument("rl: unknown dtype code");
  if (mode < altgrad_dc::kRlGae || mode > altgrad_dc::kRlVtrace) throw std::invalid_argument("rl: unknown mode");
  if (outer < 0 || n < 0 || inner < 0) throw std::invalid_argument("rl: negative size");
  const bool vtrace = mode == altgrad_dc::kRlVtrace;
  if (outer * n * inner > 0 &&
      (reward == 0 || out1 == 0 || (value == 0 && (mode != altgrad_dc::kRlTdLambda || next_value == 0 || out2 != 0)) ||
       (vtrace && (log_pi == 0 || log_mu == 0)) || (gamma == 0 && gamma_per_elem) ||
       (lam == 0 && lam_per_elem))) {
    throw std::invalid_argument("rl: null pointer");
  }
  const std::size_t rows = static_cast<std::size_t>(outer * inner);
  std::vector<double> gamma_rows, lam_rows;
  if (gamma == 0) {
    gamma_rows.assign(rows, gamma_value);
    gamma = reinterpret_cast<std::uintptr_t>(gamma_rows.data());
  }
  if (lam == 0) {
    lam_rows.assign(rows, lam_value);
    lam = reinterpret_cast<std::uintptr_t>(lam_rows.data());
  }
  altgrad_dc::RlProblem p;
  p.reward = reinterpret_cast<const void*>(reward);
  p.value = reinterpret_cast<const void*>(value);
  p.next_value = reinterpret_cast<const void*>(next_value);
  p.log_pi = reinterpret_cast<const void*>(log_pi);
  p.log_mu = reinterpret_cast<const void*>(log_mu);
  p.out1 = reinterpret_cast<void*>(out1);
  p.out2 = reinterpret_cast<void*>(out2);
  p.outer = outer;
  p.n = n;
  p.inner = inner;
  p.gamma = reinterpret_cast<const void*>(gamma);
  p.gamma_per_elem = gamma_per_elem ? 1 : 0;
  p.lam = reinterpret_cast<const void*>(lam);
  p.lam_per_elem = lam_per_elem ? 1 : 0;
  p.done = reinterpret_cast<const std::uint8_t*>(done);
  p.terminated = reinterpret_cast<const std::uint8_t*>(terminated);
  p.boot = reinterpret_cast<const double*>(boot);
  p.rho_bar = rho_bar;
  p.c_bar = c_bar;
  p.mode = mode;
  p.dtype = dtype;
  py::gil_scoped_release release;
  altgrad_dc::run_rl(p, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CPU kernels of altgrad.discounted_cumsum (raw-pointer interface, no torch headers).";
  m.def("scan", &scan, py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("outer"), py::arg("n"), py::arg("inner"),
        py::arg("gate"), py::arg("gate_value"), py::arg("gate_per_elem"), py::arg("done"), py::arg("init"),
        py::arg("reverse"), py::arg("num_threads"),
        "y[t] = x[t] + a[t] * y[t -/+ 1] along n of a contiguous [outer, n, inner] buffer (see problem.h).");
  m.def("rl", &rl, py::arg("mode"), py::arg("reward"), py::arg("value"), py::arg("next_value"), py::arg("log_pi"),
        py::arg("log_mu"), py::arg("out1"), py::arg("out2"), py::arg("dtype"), py::arg("outer"), py::arg("n"),
        py::arg("inner"), py::arg("gamma"), py::arg("gamma_value"), py::arg("gamma_per_elem"), py::arg("lam"),
        py::arg("lam_value"), py::arg("lam_per_elem"), py::arg("done"), py::arg("terminated"), py::arg("boot"),
        py::arg("rho_bar"), py::arg("c_bar"), py::arg("num_threads"),
        "Fused GAE / TD(lambda) / V-trace over a contiguous [outer, n, inner] buffer, time along n (see problem.h).");
  m.def("isa", &altgrad_dc::cpu_isa,
        "The instruction set of the kernels in use (ALTGRAD_CPU_ISA, else the best one this CPU supports).");
  m.def("thread_pool", &altgrad_dc::thread_pool_name,
        "Where a call's parts run: 'openmp' (torch's GNU OpenMP workers) or 'std' (threads of the module's own).");
  m.def("supported_isas", &altgrad_dc::supported_isas,
        "Comma-separated instruction sets that are compiled in and supported by this CPU, best first.");
  m.def(
      "_set_tuning",
      [](int64_t min_chunked_row, int64_t min_elements_per_thread) {
        altgrad_dc::set_tuning(&min_chunked_row, &min_elements_per_thread);
        return py::make_tuple(min_chunked_row, min_elements_per_thread);
      },
      py::arg("min_chunked_row"), py::arg("min_elements_per_thread"),
      "Test hook: thresholds of the chunked long-row path; returns the previous values.");
}
