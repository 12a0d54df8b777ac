// The optimizer ops' shared description of one update (optim.cpp checks and runs it on the CPU;
// optim_cuda.cpp launches it on a GPU).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "cuda_launch.h"
#include "fastnorm.h"

namespace fastnorm {

using at::Tensor;
using at::TensorList;

struct Update {
  Entry family;
  const char* name;
  bool on_cuda = false;                       // the op's CUDA kernel (optim_cuda.cpp launches)
  std::array<double, 3> host{0.0, 0.0, 0.0};  // float64 group values the step scalars need
  std::vector<double> constants;             // in the compute dtype, rounded once
  std::array<bool, 2> flags{false, false};
  std::array<bool, 3> uses{false, false, false};  // which buffer rows exist
};

// The update of a checked group on its GPU: addrs, the (5, T) address table (row-major: param,
// grad, three buffer rows); numels, each tensor's size; step_addrs, the host step counters
// (advanced here; none for SGD, whose fresh flags mark new momentum buffers); storage, the
// kernels' storage code (fastnorm.h, Storage); like, a parameter (its device and stream).
void step_cuda(const Update& u, int storage, const Tensor& like, const std::vector<int64_t>& addrs,
               const std::vector<int64_t>& numels, const std::vector<int64_t>& step_addrs, bool step_f64,
               const std::vector<bool>& fresh, int64_t seed);

}  // namespace fastnorm
