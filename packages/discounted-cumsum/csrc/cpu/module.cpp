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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CPU kernels of altgrad.discounted_cumsum (raw-pointer interface, no torch headers).";
  m.def("scan", &scan, py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("outer"), py::arg("n"), py::arg("inner"),
        py::arg("gate"), py::arg("gate_value"), py::arg("gate_per_elem"), py::arg("done"), py::arg("init"),
        py::arg("reverse"), py::arg("num_threads"),
        "y[t] = x[t] + a[t] * y[t -/+ 1] along n of a contiguous [outer, n, inner] buffer (see problem.h).");
  m.def("isa", &altgrad_dc::cpu_isa,
        "The instruction set of the kernels in use (ALTGRAD_CPU_ISA, else the best one this CPU supports).");
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
