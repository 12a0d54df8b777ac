// Batch Normalization's argument checks and geometry, shared by its CPU ops (batch_norm.cpp) and
// its CUDA ops (batch_norm_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastnorm {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Outputs = std::tuple<Tensor, Tensor, Tensor>;

// (N, C, S) as the kernels see x: (N*H*W, C, 1) for channels-last memory.
struct Geometry {
  int64_t n, c, s;
};
Geometry geometry_of(const Tensor& x, at::MemoryFormat layout);

// A per-channel tensor the kernels can read (a dense copy of a strided one); undefined stays so.
Tensor dense_vector(const Tensor& t);

// torch's checks of F.batch_norm's arguments, in torch's order and words, plus the kernels' dtypes.
void check_arguments(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training, double eps);
// The forward op's own requirement: a 16-bit input takes float32 per-channel tensors.
void check_per_channel_compute(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& running_mean, const OptionalTensor& running_var);
// fastnorm::batch_norm_backward's checks.
void check_backward(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
                    const Tensor& invstd);

}  // namespace fastnorm
