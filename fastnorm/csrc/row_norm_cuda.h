// The grouped-row launches of kernels/fastnorm_kernels/numba_cuda/layernorm.py (LayerNorm and RMSNorm rows, and
// GroupNorm's (sample, group) blocks as rows), shared by layer_norm.cpp's and group_norm.cpp's
// CUDA kernels; row_norm_cuda.cpp holds them.
#pragma once

#include <ATen/ATen.h>

namespace fastnorm::cuda {

// The forward over r rows of d values (contiguous x, y), the affine index of value j of row i
// being (i % groups) * cg + j / s; mean (undefined without centring) and rstd (r,) in the
// compute dtype; weight / bias undefined when absent.
void forward_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                  const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd, int64_t r, int64_t d,
                  int64_t groups, int64_t cg, int64_t s, bool center);

// The backward of contiguous (n, c, s) data with statistics per (n, group) (LayerNorm: n = M
// rows, c = D, s = 1, one group); dx, dweight, dbias undefined when not wanted.
void backward_rows(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                   const at::Tensor& weight, const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias,
                   int64_t n, int64_t c, int64_t s, int64_t groups, bool center);

}  // namespace fastnorm::cuda
