// The optimizer ops' shared description of one update (optim.cpp checks and runs it on the CPU;
// optim_cuda.cpp launches it on a GPU).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <atomic>
#include <string>
#include <vector>

#include "cuda_launch.h"
#include "fastnorm.h"

namespace fastnorm {

using at::Tensor;
using at::TensorList;

// One optimizer as kernels/fastnorm_kernels/formulas/optim.py describes it, handed over by
// fastnorm/_ops.py when the extension loads (define_optimizer). Nothing here is per optimizer:
// the op's schema, its argument packing (a compiled Optimizer.pack) and its kernels come with it.
constexpr int kMaxPacked = 64;  // options, and packed values (constants, flags, uses, host), of one optimizer
constexpr int kMaxFlags = 8;

struct Spec {
  std::string name;          // "adam": the op fastnorm::adam_, the kernels' family
  std::string op;            // "adam_"
  int buffers = 0;           // state buffer lists after params and grads
  bool counts_steps = false;  // a state_steps list follows the buffers (advanced by the kernels)
  int clone_first = -1;      // the buffer cloned on its first step (the op's first_step flags), or -1
  int options = 0, constants = 0, flags = 1;  // options in schema order; the kernels' constants and flags
  // (options, out) -> out: constants, flags, three uses, three host values (float64); resolved
  // through Python when first needed ("pack:<name>")
  std::atomic<void (*)(int64_t, int64_t)> pack{nullptr};
  // (step, host, out): the per-tensor scalars from a new step count (the CUDA launches'; "scalars:<name>")
  std::atomic<void (*)(double, int64_t, int64_t)> scalars{nullptr};
  int cuda_kernel = -1;      // cuda::add_kernel's index of its kernel
  std::array<std::atomic<void*>, 5> entries{};  // its numba C entry point per storage, once resolved
};

struct Update {
  const Spec* spec = nullptr;
  bool on_cuda = false;                       // the op's CUDA kernel (optim_cuda.cpp launches)
  std::array<double, 3> host{0.0, 0.0, 0.0};  // float64 option values the step scalars need
  std::vector<double> constants;              // in the compute dtype, rounded once
  std::array<bool, kMaxFlags> flags{};
  std::array<bool, 3> uses{false, false, false};  // which buffer rows exist
};

// The update of a checked group on its GPU: addrs, the (5, T) address table (row-major: param,
// grad, three buffer rows); numels, each tensor's size; step_addrs, the host step counters
// (advanced here; none where the optimizer counts no steps, whose fresh flags mark buffers new
// this step); storage, the kernels' storage code (fastnorm.h, Storage); like, a parameter (its
// device and stream).
void step_cuda(const Update& u, int storage, const Tensor& like, const std::vector<int64_t>& addrs,
               const std::vector<int64_t>& numels, const std::vector<int64_t>& step_addrs, bool step_f64,
               const std::vector<bool>& fresh, int64_t seed);

}  // namespace fastnorm
