// Host interface of the CUDA discounted-cumsum kernels (implemented in scan.cu). No torch headers.
#pragma once
#include <cstdint>
#include <string>

namespace altgrad_dc_cuda {

struct Problem {
  const void* x;
  void* y;
  int64_t outer, n, inner;
  const void* gate;        // double [outer*inner] (constant along the scan) or compute type [outer*n*inner];
                           // nullptr: every row uses gate_value
  double gate_value;
  int gate_per_elem;
  const uint8_t* done;     // nullable, [outer*n*inner]
  const double* init;      // nullable, [outer*inner]
  int reverse;
  int dtype;               // 0 float32, 1 float64, 2 float16, 3 bfloat16
  void* workspace;         // zero-initialised on first use, reused across calls on the same stream
  int64_t workspace_tiles; // capacity of the workspace in tiles
  void* stream;            // cudaStream_t
};

// Number of tiles of the single-pass row kernel for this shape (0 when the column kernel is used).
int64_t tiles_needed(int64_t outer, int64_t n, int64_t inner);
// Bytes of workspace for `tiles` tiles.
int64_t workspace_bytes(int64_t tiles);
// Launches exactly one kernel on `stream`. Returns an empty string on success, else the CUDA error.
std::string launch(const Problem& p);

}  // namespace altgrad_dc_cuda
