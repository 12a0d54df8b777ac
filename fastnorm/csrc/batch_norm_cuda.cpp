// Batch Normalization's ops on CUDA tensors: fastnorm::batch_norm_forward, batch_norm_backward and
// batch_norm_stats for the CUDA dispatch key (their CPU, Meta and Autograd kernels, and the
// composite fastnorm::batch_norm, are batch_norm.cpp's: the same checks, outputs and autograd).
//
// The kernels are kernels/fastnorm_kernels/numba_cuda/batchnorm.py's, launched from here (cuda_launch.h) with the
// grids its Python launchers use (that file's header describes the algorithm):
//   training forward  partial sums (planes or rows) -> finalize_train -> normalize
//   eval forward      finalize_eval -> normalize
//   backward          partial sums of dy, dy*(x - mean) -> finalize_backward -> input_grad
//   stats             partial sums -> finalize_stats
// Scratch (float64 (2, C, G) partial sums, (4, C) coefficients) comes from torch's caching
// allocator on the input's device; everything runs on torch's current stream with no host
// synchronisation.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "batch_norm.h"
#include "cuda_launch.h"
#include "fastnorm.h"

namespace fastnorm {
namespace {

using cuda::Arg;
using cuda::Dim3;
using cuda::Kernel;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A (C,) tensor's address, or `fallback`'s where it is absent (a valid address the kernels never read).
Arg address_or(const Tensor& t, const Tensor& fallback) { return Arg(address(t.defined() ? t : fallback)); }

// Launches the partial sums: of x (dy undefined), or the backward's sums of dy and dy*(x - mean).
// Returns the float64 (2, C, G) scratch and G.
std::pair<Tensor, int64_t> partials(const Tensor& x, const Tensor& dy, const Tensor& mean, const Geometry& g,
                                    int storage) {
  const auto& k = cuda::geometry();
  const auto f64 = x.options().dtype(at::kDouble);
  if (g.s == 1) {  // (N, C) rows: a (ROW_TILE, ROW_LANES) block per channel tile and row split
    const int64_t tiles = ceil_div(g.c, k.row_tile);
    const int64_t splits = std::max<int64_t>(1, std::min(ceil_div(g.n, k.row_lanes * 16), ceil_div(k.target_blocks, tiles)));
    Tensor p = at::empty({2 * g.c * splits}, f64);
    const Dim3 grid{tiles, splits}, block{k.row_tile, k.row_lanes};
    if (!dy.defined()) {
      cuda::launch(Kernel::kStatsRows, storage, x, grid, block, {address(x), Arg::zero(), g.n, g.c, address(p)});
    } else {
      cuda::launch(Kernel::kGradRows, storage, x, grid, block,
                   {address(dy), address(x), address(mean), Arg::zero(), Arg::zero(), g.n, g.c, address(p)});
    }
    return {p, splits};
  }
  // (N, C, S) planes: a (C, G) grid, G splitting each channel's N*S values
  const int64_t tiles = ceil_div(g.s, k.block * k.unroll);
  const int64_t splits = std::max<int64_t>(1, std::min({g.n * tiles, ceil_div(k.target_blocks, g.c), int64_t(65535)}));
  Tensor p = at::empty({2 * g.c * splits}, f64);
  const Dim3 grid{g.c, splits}, block{k.block};
  if (!dy.defined()) {
    cuda::launch(Kernel::kStatsPlanes, storage, x, grid, block, {address(x), Arg::zero(), g.n, g.c, g.s, address(p)});
  } else {
    cuda::launch(Kernel::kGradPlanes, storage, x, grid, block,
                 {address(dy), address(x), address(mean), Arg::zero(), Arg::zero(), g.n, g.c, g.s, address(p)});
  }
  return {p, splits};
}

Dim3 per_channel(int64_t c) { return {std::max<int64_t>(1, ceil_div(c, cuda::geometry().block))}; }

Dim3 grid_stride(int64_t total) {
  const auto& k = cuda::geometry();
  return {std::max<int64_t>(1, std::min(ceil_div(total, k.block), 32 * k.target_blocks))};
}

// The plane kernels' grid: x across a plane (UNROLL * BLOCK values a block), y over planes.
Dim3 plane_grid(const Geometry& g) {
  const auto& k = cuda::geometry();
  const int64_t x = std::min<int64_t>(ceil_div(g.s, k.block * k.unroll), 64);
  return {x, std::min({g.n * g.c, std::max<int64_t>(1, 8192 / x), int64_t(65535)})};
}

void normalize(const Tensor& x, const Tensor& y, const Tensor& coef, const Geometry& g, int storage) {
  const Dim3 block{cuda::geometry().block};
  if (g.s >= cuda::geometry().plane_min) {
    cuda::launch(Kernel::kNormalizePlanes, storage, x, plane_grid(g), block,
                 {address(x), address(y), address(coef), Arg::zero(), Arg::zero(), g.n * g.c, g.c, g.s});
  } else {
    cuda::launch(Kernel::kNormalizeFlat, storage, x, grid_stride(g.n * g.c * g.s), block,
                 {address(x), address(y), address(coef), Arg::zero(), Arg::zero(), g.n * g.c * g.s, g.c, g.s});
  }
}

void input_grad(const Tensor& dy, const Tensor& x, const Tensor& coef, const Tensor& dx, const Geometry& g,
                int storage) {
  const Dim3 block{cuda::geometry().block};
  if (g.s >= cuda::geometry().plane_min) {
    cuda::launch(Kernel::kInputGradPlanes, storage, x, plane_grid(g), block,
                 {address(dy), address(x), address(coef), Arg::zero(), Arg::zero(), g.n * g.c, g.c, g.s, address(dx)});
  } else {
    cuda::launch(Kernel::kInputGradFlat, storage, x, grid_stride(g.n * g.c * g.s), block,
                 {address(dy), address(x), address(coef), Arg::zero(), Arg::zero(), g.n * g.c * g.s, g.c, g.s,
                  address(dx)});
  }
}

}  // namespace

Outputs forward_cuda(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                     double momentum, double eps) {
  check_arguments(input, weight, bias, running_mean, running_var, training, eps);
  check_per_channel_compute(input, weight, bias, running_mean, running_var);
  c10::OptionalDeviceGuard guard(input.device());
  const int64_t c = input.size(1);
  const auto per_channel_options = input.options().dtype(compute_dtype(input.scalar_type()));
  const auto layout = layout_of(input);
  if (input.numel() == 0) {  // torch: an empty output, the running statistics left alone
    return {at::empty(input.sizes(), input.options().memory_format(layout)), at::zeros({c}, per_channel_options),
            at::zeros({c}, per_channel_options)};
  }
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();  // strided: a dense copy
  const Geometry g = geometry_of(x, layout);
  const int storage = storage_of(x.scalar_type());
  Tensor y = at::empty_strided(x.sizes(), canonical_strides(x, layout), x.options());
  const Tensor w = dense_vector(value(weight)), b = dense_vector(value(bias));
  const Tensor& rm = value(running_mean);
  const Tensor& rv = value(running_var);
  const Tensor mean_in = dense_vector(rm), var_in = dense_vector(rv);
  Tensor save_mean = at::empty({c}, per_channel_options), save_invstd = at::empty({c}, per_channel_options);
  Tensor coef = at::empty({4 * c}, per_channel_options);
  if (training) {
    auto [p, splits] = partials(x, Tensor(), Tensor(), g, storage);
    cuda::launch(Kernel::kFinalizeTrain, storage, x, per_channel(c), {cuda::geometry().block},
                 {address(x), Arg::zero(), Arg::zero(), g.n, g.c, g.s, address(p), splits, eps, momentum,
                  address_or(mean_in, coef), address_or(var_in, coef), mean_in.defined(), address_or(w, coef),
                  w.defined(), address_or(b, coef), b.defined(), address(save_mean), address(save_invstd),
                  address(coef)});
    normalize(x, y, coef, g, storage);
    // strided running statistics: updated through a dense copy, written back without a version
    // bump (batch_norm.cpp's forward_cpu explains)
    at::AutoDispatchBelowADInplaceOrView no_version_bump;
    if (mean_in.defined() && !mean_in.is_same(rm)) rm.copy_(mean_in);
    if (var_in.defined() && !var_in.is_same(rv)) rv.copy_(var_in);
  } else {
    cuda::launch(Kernel::kFinalizeEval, storage, x, per_channel(c), {cuda::geometry().block},
                 {address(mean_in), address(var_in), Arg::zero(), c, eps, address_or(w, coef), w.defined(),
                  address_or(b, coef), b.defined(), address(coef)});
    normalize(x, y, coef, g, storage);
    save_mean.copy_(rm);  // the eval forward's constants, frozen now
    save_invstd.copy_(at::rsqrt(rv.to(at::kDouble) + eps));
  }
  return {y, save_mean, save_invstd};
}

Outputs backward_cuda(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
                      const Tensor& invstd, bool training, std::array<bool, 3> mask) {
  check_backward(grad_out, input, weight, mean, invstd);
  c10::OptionalDeviceGuard guard(input.device());
  const int64_t c = input.size(1);
  const auto per_channel_options = input.options().dtype(compute_dtype(input.scalar_type()));
  const auto layout = layout_of(input);
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();
  if (x.numel() == 0) {
    return {mask[0] ? at::empty_like(x) : Tensor(), mask[1] ? at::zeros({c}, per_channel_options) : Tensor(),
            mask[2] ? at::zeros({c}, per_channel_options) : Tensor()};
  }
  const Tensor dy = grad_out.is_contiguous(layout) ? grad_out : grad_out.contiguous(layout);
  const Geometry g = geometry_of(x, layout);
  const int storage = storage_of(x.scalar_type());
  Tensor dx = mask[0] ? at::empty_strided(x.sizes(), x.strides(), x.options()) : Tensor();  // torch's: x's strides
  Tensor dweight = mask[1] ? at::empty({c}, per_channel_options) : Tensor();
  Tensor dbias = mask[2] ? at::empty({c}, per_channel_options) : Tensor();
  const Tensor w = dense_vector(value(weight)), m = dense_vector(mean), inv = dense_vector(invstd);
  Tensor coef = at::empty({4 * c}, per_channel_options);
  const bool need_sums = (mask[0] && training) || mask[1] || mask[2];
  Tensor p = coef;
  int64_t splits = 0;  // no sums needed: the finalize reads none
  if (need_sums) std::tie(p, splits) = partials(x, dy, m, g, storage);
  cuda::launch(Kernel::kFinalizeBackward, storage, x, per_channel(c), {cuda::geometry().block},
               {address(p), splits, Arg::zero(), c, static_cast<double>(g.n * g.s), address(m), address(inv),
                address_or(w, coef), w.defined(), training, address_or(dweight, coef), dweight.defined(),
                address_or(dbias, coef), dbias.defined(), address(coef)});
  if (mask[0]) input_grad(dy, x, coef, dx, g, storage);
  return {dx, dweight, dbias};
}

std::tuple<Tensor, Tensor> stats_cuda(const Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "fastnorm::batch_norm_stats takes an (N, C, *) input, got a ", input.dim(), "-D one");
  TORCH_CHECK_NOT_IMPLEMENTED(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                              "fastnorm::batch_norm_stats takes a float32 or float64 input, got ",
                              dtype_name(input.scalar_type()));
  c10::OptionalDeviceGuard guard(input.device());
  const int64_t c = input.size(1);
  const auto f64 = input.options().dtype(at::kDouble);
  if (input.numel() == 0) return {at::full({c}, NAN, f64), at::full({c}, NAN, f64)};
  const auto layout = layout_of(input);
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();
  const Geometry g = geometry_of(x, layout);
  const int storage = storage_of(x.scalar_type());
  Tensor mean = at::empty({c}, f64), var = at::empty({c}, f64);
  auto [p, splits] = partials(x, Tensor(), Tensor(), g, storage);
  cuda::launch(Kernel::kFinalizeStats, storage, x, per_channel(c), {cuda::geometry().block},
               {address(x), Arg::zero(), g.n, g.c, g.s, address(p), splits, address(mean), address(var)});
  return {mean, var};
}

}  // namespace fastnorm

TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("batch_norm_forward", &fastnorm::forward_cuda);
  m.impl("batch_norm_backward", &fastnorm::backward_cuda);
  m.impl("batch_norm_stats", &fastnorm::stats_cuda);
}
