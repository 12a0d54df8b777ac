// The grouped-row launches of kernels/fastnorm_kernels/numba_cuda/layernorm.py from C++ (row_norm_cuda.h): the
// same kernels, grids and scratch as its Python launchers forward_rows / backward_rows (that
// file's header describes the algorithm: a block per row for the forward and dx, float64 sums;
// dweight and dbias from (channel, split) partial sums added in a fixed order).
#include "row_norm_cuda.h"

#include <algorithm>

#include "cuda_launch.h"
#include "fastnorm.h"

namespace fastnorm::cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Arg address_or(const at::Tensor& t, const at::Tensor& fallback) {
  return Arg(address(t.defined() ? t : fallback));  // an absent array: a valid address never read
}

Dim3 row_blocks(int64_t r) { return {std::max<int64_t>(1, std::min(r, geometry().max_row_blocks))}; }

}  // namespace

void forward_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                  const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd, int64_t r, int64_t d,
                  int64_t groups, int64_t cg, int64_t s, bool center) {
  const int storage = storage_of(x.scalar_type());
  launch(Kernel::kForwardRows, storage, x, row_blocks(r), {geometry().row_block},
         {address(x), address(y), address_or(weight, rstd), weight.defined(), address_or(bias, rstd), bias.defined(),
          Arg::zero(), Arg::zero(), r, d, groups, cg, s, eps, center, address_or(mean, rstd), address(rstd)});
}

void backward_rows(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                   const at::Tensor& weight, const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias,
                   int64_t n, int64_t c, int64_t s, int64_t groups, bool center) {
  const int storage = storage_of(x.scalar_type());
  const auto& g = geometry();
  const int64_t cg = c / groups;
  if (dx.defined()) {
    launch(Kernel::kInputGradRows, storage, x, row_blocks(n * groups), {g.row_block},
           {address(dy), address(x), address_or(mean, rstd), address(rstd), address_or(weight, rstd),
            weight.defined(), Arg::zero(), Arg::zero(), n * groups, cg * s, groups, cg, s, center, address(dx)});
  }
  if (!dweight.defined() && !dbias.defined()) return;
  const Arg m = address_or(mean, rstd);
  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor p;
  int64_t splits = 0;
  if (s == 1) {  // columns: a (COL_TILE, COL_LANES) block per channel tile and row split
    const int64_t tiles = ceil_div(c, g.col_tile);
    splits = std::max<int64_t>(1, std::min({ceil_div(n, g.rows_per_split), ceil_div(g.target_blocks, tiles),
                                            int64_t(65535)}));
    p = at::empty({2 * c * splits}, f64);
    launch(Kernel::kParamPartialsColumns, storage, x, {tiles, splits}, {g.col_tile, g.col_lanes},
           {address(dy), address(x), m, address(rstd), Arg::zero(), Arg::zero(), n, c, groups, cg, center,
            address(p)});
  } else {  // planes: a block per (channel, split)
    splits = std::max<int64_t>(1, std::min({n, ceil_div(g.target_blocks, c), int64_t(65535)}));
    p = at::empty({2 * c * splits}, f64);
    launch(Kernel::kParamPartialsPlanes, storage, x, {c, splits}, {g.row_block},
           {address(dy), address(x), m, address(rstd), Arg::zero(), Arg::zero(), n, c, s, groups, cg, center,
            address(p)});
  }
  launch(Kernel::kParamFinalize, storage, x, {std::max<int64_t>(1, ceil_div(c, g.block))}, {g.block},
         {address(p), splits, Arg::zero(), c, address_or(dweight, p), dweight.defined(), address_or(dbias, p),
          dbias.defined()});
}

}  // namespace fastnorm::cuda
