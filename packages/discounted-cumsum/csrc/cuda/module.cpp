// pybind11 bindings of the CUDA kernels: raw device addresses and the stream handle in, no torch headers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/scan.h"

namespace py = pybind11;

namespace {

void scan(std::uintptr_t x, std::uintptr_t y, int dtype, int64_t outer, int64_t n, int64_t inner, std::uintptr_t gate,
          double gate_value, bool gate_per_elem, std::uintptr_t done, std::uintptr_t init, bool reverse, std::uintptr_t stream,
          std::uintptr_t workspace, int64_t workspace_tiles) {
  if (outer < 0 || n < 0 || inner < 0) throw std::invalid_argument("scan: negative size");
  altgrad_dc_cuda::Problem p;
  p.x = reinterpret_cast<const void*>(x);
  p.y = reinterpret_cast<void*>(y);
  p.outer = outer;
  p.n = n;
  p.inner = inner;
  p.gate = reinterpret_cast<const void*>(gate);
  p.gate_value = gate_value;
  p.gate_per_elem = gate_per_elem ? 1 : 0;
  p.done = reinterpret_cast<const std::uint8_t*>(done);
  p.init = reinterpret_cast<const double*>(init);
  p.reverse = reverse ? 1 : 0;
  p.dtype = dtype;
  p.workspace = reinterpret_cast<void*>(workspace);
  p.workspace_tiles = workspace_tiles;
  p.stream = reinterpret_cast<void*>(stream);
  std::string err;
  {
    py::gil_scoped_release release;
    err = altgrad_dc_cuda::launch(p);
  }
  if (!err.empty()) throw std::runtime_error("altgrad.discounted_cumsum CUDA kernel failed: " + err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "CUDA kernels of altgrad.discounted_cumsum (raw-pointer interface, no torch headers).";
  m.def("scan", &scan, py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("outer"), py::arg("n"), py::arg("inner"),
        py::arg("gate"), py::arg("gate_value"), py::arg("gate_per_elem"), py::arg("done"), py::arg("init"), py::arg("reverse"),
        py::arg("stream"), py::arg("workspace"), py::arg("workspace_tiles"),
        "One launch of the discounted-cumsum kernel on `stream` (see csrc/cuda/scan.cu).");
  m.def("tiles_needed", &altgrad_dc_cuda::tiles_needed, py::arg("outer"), py::arg("n"), py::arg("inner"));
  m.def("workspace_bytes", &altgrad_dc_cuda::workspace_bytes, py::arg("tiles"));
}
