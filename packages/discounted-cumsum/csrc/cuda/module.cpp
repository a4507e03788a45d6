// pybind11 bindings of the CUDA kernels: raw device addresses and the stream handle in, no torch headers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/rl.h"
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

// The CPU binding's arguments (csrc/cpu/module.cpp; both kernels form rho = exp(log_pi - log_mu) themselves), with
// the stream in place of the thread count. gamma / lam == 0: one value for every
// sequence, given by value (gamma_value / lam_value).
void rl(int mode, std::uintptr_t reward, std::uintptr_t value, std::uintptr_t next_value, std::uintptr_t log_pi,
        std::uintptr_t log_mu, std::uintptr_t out1, std::uintptr_t out2, int dtype, int64_t outer, int64_t n,
        int64_t inner, std::uintptr_t gamma, double gamma_value, bool gamma_per_elem, std::uintptr_t lam,
        double lam_value, bool lam_per_elem, std::uintptr_t done, std::uintptr_t terminated, std::uintptr_t boot,
        double rho_bar, double c_bar, std::uintptr_t stream, bool on_host) {
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("rl: unknown dtype code");
  if (mode < altgrad_dc_cuda::kRlGae || mode > altgrad_dc_cuda::kRlVtrace) throw std::invalid_argument("rl: unknown mode");
  if (outer < 0 || n < 0 || inner < 0) throw std::invalid_argument("rl: negative size");
  const bool vtrace = mode == altgrad_dc_cuda::kRlVtrace;
  if (outer * n * inner > 0 &&
      (reward == 0 || out1 == 0 ||
       (value == 0 && (mode != altgrad_dc_cuda::kRlTdLambda || next_value == 0 || out2 != 0)) ||
       (vtrace && (log_pi == 0 || log_mu == 0)) || (gamma == 0 && gamma_per_elem) ||
       (!vtrace && lam == 0 && lam_per_elem))) {
    throw std::invalid_argument("rl: null pointer");
  }
  altgrad_dc_cuda::RlProblem p;
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
  p.gamma_value = gamma_value;
  p.gamma_per_elem = gamma_per_elem ? 1 : 0;
  p.lam = reinterpret_cast<const void*>(lam);
  p.lam_value = lam_value;
  p.lam_per_elem = lam_per_elem ? 1 : 0;
  p.done = reinterpret_cast<const std::uint8_t*>(done);
  p.terminated = reinterpret_cast<const std::uint8_t*>(terminated);
  p.boot = reinterpret_cast<const double*>(boot);
  p.rho_bar = rho_bar;
  p.c_bar = c_bar;
  p.mode = mode;
  p.dtype = dtype;
  p.stream = reinterpret_cast<void*>(stream);
  std::string err;
  {
    py::gil_scoped_release release;
    err = on_host ? altgrad_dc_cuda::run_rl_on_host(p) : altgrad_dc_cuda::launch_rl(p);
  }
  if (!err.empty()) throw std::runtime_error("altgrad.discounted_cumsum CUDA RL kernel failed: " + err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "CUDA kernels of altgrad.discounted_cumsum (raw-pointer interface, no torch headers).";
  m.def("scan", &scan, py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("outer"), py::arg("n"), py::arg("inner"),
        py::arg("gate"), py::arg("gate_value"), py::arg("gate_per_elem"), py::arg("done"), py::arg("init"), py::arg("reverse"),
        py::arg("stream"), py::arg("workspace"), py::arg("workspace_tiles"),
        "One launch of the discounted-cumsum kernel on `stream` (see csrc/cuda/scan.cu).");
  m.def("rl", [](int mode, std::uintptr_t reward, std::uintptr_t value, std::uintptr_t next_value, std::uintptr_t log_pi,
                 std::uintptr_t log_mu, std::uintptr_t out1, std::uintptr_t out2, int dtype, int64_t outer, int64_t n,
                 int64_t inner, std::uintptr_t gamma, double gamma_value, bool gamma_per_elem, std::uintptr_t lam,
                 double lam_value, bool lam_per_elem, std::uintptr_t done, std::uintptr_t terminated,
                 std::uintptr_t boot, double rho_bar, double c_bar, std::uintptr_t stream) {
          rl(mode, reward, value, next_value, log_pi, log_mu, out1, out2, dtype, outer, n, inner, gamma, gamma_value,
             gamma_per_elem, lam, lam_value, lam_per_elem, done, terminated, boot, rho_bar, c_bar, stream, false);
        },
        py::arg("mode"), py::arg("reward"), py::arg("value"), py::arg("next_value"), py::arg("log_pi"),
        py::arg("log_mu"), py::arg("out1"), py::arg("out2"), py::arg("dtype"), py::arg("outer"), py::arg("n"),
        py::arg("inner"), py::arg("gamma"), py::arg("gamma_value"), py::arg("gamma_per_elem"), py::arg("lam"),
        py::arg("lam_value"), py::arg("lam_per_elem"), py::arg("done"), py::arg("terminated"), py::arg("boot"),
        py::arg("rho_bar"), py::arg("c_bar"), py::arg("stream"),
        "One launch of the fused GAE / TD(lambda) / V-trace kernel on `stream` (see csrc/cuda/rl.h).");
  m.def("_rl_host", [](int mode, std::uintptr_t reward, std::uintptr_t value, std::uintptr_t next_value,
                       std::uintptr_t log_pi, std::uintptr_t log_mu, std::uintptr_t out1, std::uintptr_t out2, int dtype,
                       int64_t outer, int64_t n, int64_t inner, std::uintptr_t gamma, double gamma_value,
                       bool gamma_per_elem, std::uintptr_t lam, double lam_value, bool lam_per_elem,
                       std::uintptr_t done, std::uintptr_t terminated, std::uintptr_t boot, double rho_bar,
                       double c_bar, std::uintptr_t stream) {
          rl(mode, reward, value, next_value, log_pi, log_mu, out1, out2, dtype, outer, n, inner, gamma, gamma_value,
             gamma_per_elem, lam, lam_value, lam_per_elem, done, terminated, boot, rho_bar, c_bar, stream, true);
        },
        "Test hook: `rl`'s arguments, the kernel's per-sequence code run on the host over HOST buffers (no GPU "
        "needed; the stream is ignored).");
  m.def("tiles_needed", &altgrad_dc_cuda::tiles_needed, py::arg("outer"), py::arg("n"), py::arg("inner"));
  m.def("workspace_bytes", &altgrad_dc_cuda::workspace_bytes, py::arg("tiles"));
}
