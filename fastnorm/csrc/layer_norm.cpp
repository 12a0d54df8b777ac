// Layer Normalization and RMS Normalization as ops of torch's dispatcher.
//
// Both normalise each row of the input over its last dims (normalized_shape): the input is seen
// as (M, D), D the product of normalized_shape. The math is the numba kernels'
// (kernels/fastnorm_kernels/numba_cpu/layernorm.py, called through their C entry points; `center` = LayerNorm);
// this file checks arguments, moves tensors and records autograd.
//
//   fastnorm::layer_norm        CompositeImplicitAutograd: torch.nn.functional.layer_norm's
//   fastnorm::rms_norm          and rms_norm's arguments and semantics, on the two ops below;
//                               what the kernels do not take (another device or dtype, mixed
//                               dtypes torch refuses or promotes, empty inputs, a shape torch
//                               refuses) runs torch's own op: its values, its errors
//   fastnorm::row_norm_forward  CPU (the kernels), Meta, Autograd (RowNormBackward):
//                               (y, mean, rstd) with mean and rstd (M,) in the compute dtype
//                               (mean empty for RMSNorm)
//   fastnorm::row_norm_backward CPU, Meta: (dx, dweight, dbias), those of output_mask
//
// A backward with create_graph=True computes the gradients with differentiable ATen ops, so that
// second derivatives are torch's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include <c10/core/DeviceGuard.h>

#include "cuda_launch.h"
#include "fastnorm.h"
#include "row_norm_cuda.h"

namespace fastnorm {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<Tensor>;
using Outputs = std::tuple<Tensor, Tensor, Tensor>;

// The C entry points (argument lists: kernels/fastnorm_kernels/numba_cpu/layernorm.py).
using Forward = void (*)(int64_t x, int64_t weight, int64_t bias, int64_t y, int64_t mean, int64_t rstd, int64_t m,
                         int64_t d, double eps, int64_t center, int64_t parallel, int64_t rows);
using Backward = void (*)(int64_t dy, int64_t x, int64_t mean, int64_t rstd, int64_t weight, int64_t center,
                          int64_t dx, int64_t dweight, int64_t dbias, int64_t m, int64_t d, int64_t parallel,
                          int64_t rows);

// fastnorm_kernels.numba_cpu.layernorm.rows_per_chunk and the parallel threshold of its launchers
struct Plan {
  bool parallel;
  int64_t rows;
};
Plan plan_of(int64_t m, int64_t d) {
  const auto& t = tunables();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), t.max_threads));
  const int64_t chunks = std::max<int64_t>(1, std::min({t.max_chunks, (m * d) / t.chunk_elements, m}));
  return {m * d >= t.parallel_min_elements && threads > 1, (m + chunks - 1) / chunks};
}

// D: the product of the last `dims` sizes of x (the normalized shape)
int64_t row_length(const Tensor& x, int64_t dims) {
  int64_t d = 1;
  for (int64_t i = x.dim() - dims; i < x.dim(); ++i) d *= x.size(i);
  return d;
}
c10::SymInt sym_rows(const Tensor& x, int64_t dims) {
  c10::SymInt m = 1;
  for (int64_t i = 0; i < x.dim() - dims; ++i) m = m * x.sym_size(i);
  return m;
}

void check_forward(const Tensor& input, int64_t dims, const OptionalTensor& weight, const OptionalTensor& bias) {
  TORCH_CHECK(dims >= 1 && dims <= input.dim(), "fastnorm::row_norm_forward: normalized_dims must be in [1, ",
              input.dim(), "], got ", dims);
  TORCH_CHECK_NOT_IMPLEMENTED(storage_of(input.scalar_type()) >= 0, "fastnorm::row_norm_forward: ",
                              dtype_name(input.scalar_type()), " is not float32, float64, bfloat16 or float16");
  const auto compute = compute_dtype(input.scalar_type());
  const auto trailing = input.sym_sizes().slice(input.dim() - dims);
  for (const auto* t : {&weight, &bias}) {
    if (!defined(*t)) continue;
    TORCH_CHECK((*t)->sym_sizes() == trailing && (*t)->scalar_type() == compute && (*t)->device() == input.device(),
                "fastnorm::row_norm_forward takes weight and bias of the normalized shape ", size_repr(trailing), " in ",
                dtype_name(compute), " on the input's device, got ", size_repr((*t)->sym_sizes()), " ",
                dtype_name((*t)->scalar_type()), " (fastnorm::layer_norm and rms_norm convert them)");
  }
}

// ---- fastnorm::row_norm_forward -----------------------------------------------------------------

Outputs forward_cpu(const Tensor& input, int64_t dims, const OptionalTensor& weight, const OptionalTensor& bias,
                    double eps, bool center) {
  check_forward(input, dims, weight, bias);
  const Tensor x = input.contiguous();
  const int64_t d = row_length(x, dims), m = d == 0 ? 0 : x.numel() / d;
  const auto stats = x.options().dtype(compute_dtype(x.scalar_type()));
  Tensor y = pooled_empty(x, c10::contiguous_strides(x.sizes()));
  Tensor mean = at::empty({center ? m : 0}, stats), rstd = at::empty({m}, stats);
  if (x.numel() == 0) return {y, mean.zero_(), rstd.zero_()};
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor b = defined(bias) ? bias->contiguous() : Tensor();
  const Plan p = plan_of(m, d);
  auto kernel = reinterpret_cast<Forward>(entry(Entry::kRowNormForward, storage_of(x.scalar_type())));
  without_gil([&] {
    follow_torch_threads();
    kernel(address(x), address(w), address(b), address(y), address(mean), address(rstd), m, d, eps, center, p.parallel,
           p.rows);
  });
  return {y, mean, rstd};
}

Outputs forward_meta(const Tensor& input, int64_t dims, const OptionalTensor& weight, const OptionalTensor& bias,
                     double eps, bool center) {
  check_forward(input, dims, weight, bias);
  const auto stats = input.options().dtype(compute_dtype(input.scalar_type()));
  const c10::SymInt m = sym_rows(input, dims);
  return {at::empty_symint(input.sym_sizes(), input.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty_symint({center ? m : c10::SymInt(0)}, stats), at::empty_symint({m}, stats)};
}

// ---- fastnorm::row_norm_backward ----------------------------------------------------------------

void check_backward(const Tensor& grad_out, const Tensor& input, int64_t dims, const Tensor& mean, const Tensor& rstd,
                    const OptionalTensor& weight, bool center) {
  TORCH_CHECK(dims >= 1 && dims <= input.dim(), "fastnorm::row_norm_backward: normalized_dims must be in [1, ",
              input.dim(), "], got ", dims);
  TORCH_CHECK(grad_out.sym_sizes() == input.sym_sizes() && grad_out.scalar_type() == input.scalar_type(),
              "fastnorm::row_norm_backward: grad_output ", dtype_name(grad_out.scalar_type()), " ",
              size_repr(grad_out.sym_sizes()), " for an input ", dtype_name(input.scalar_type()), " ",
              size_repr(input.sym_sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(storage_of(input.scalar_type()) >= 0, "fastnorm::row_norm_backward: ",
                              dtype_name(input.scalar_type()), " is not float32, float64, bfloat16 or float16");
  const auto compute = compute_dtype(input.scalar_type());
  const c10::SymInt m = sym_rows(input, dims);
  TORCH_CHECK(rstd.sym_numel() == m && rstd.scalar_type() == compute &&
                  (!center || (mean.sym_numel() == m && mean.scalar_type() == compute)),
              "fastnorm::row_norm_backward: mean and rstd must hold ", m, " ", dtype_name(compute), " values");
  if (defined(weight)) {
    TORCH_CHECK(weight->sym_sizes() == input.sym_sizes().slice(input.dim() - dims) && weight->scalar_type() == compute,
                "fastnorm::row_norm_backward: weight must have the normalized shape, in ", dtype_name(compute));
  }
}

Outputs backward_cpu(const Tensor& grad_out, const Tensor& input, int64_t dims, const Tensor& mean, const Tensor& rstd,
                     const OptionalTensor& weight, bool center, std::array<bool, 3> mask) {
  check_backward(grad_out, input, dims, mean, rstd, weight, center);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const int64_t d = row_length(x, dims), m = d == 0 ? 0 : x.numel() / d;
  const auto params = x.options().dtype(compute_dtype(x.scalar_type()));
  const auto normalized = x.sizes().slice(x.dim() - dims);
  Tensor dx = mask[0] ? pooled_empty(x, c10::contiguous_strides(x.sizes())) : Tensor();
  Tensor dweight = mask[1] ? at::empty(normalized, params) : Tensor();
  Tensor dbias = mask[2] ? at::empty(normalized, params) : Tensor();
  if (x.numel() == 0) {
    if (dweight.defined()) dweight.zero_();
    if (dbias.defined()) dbias.zero_();
    return {dx, dweight, dbias};
  }
  if (!dx.defined() && !dweight.defined() && !dbias.defined()) return {dx, dweight, dbias};
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor mu = center ? mean.contiguous() : Tensor(), inv = rstd.contiguous();
  const Plan p = plan_of(m, d);
  auto kernel = reinterpret_cast<Backward>(entry(Entry::kRowNormBackward, storage_of(x.scalar_type())));
  without_gil([&] {
    follow_torch_threads();
    kernel(address(dy), address(x), address(mu), address(inv), address(w), center, address(dx), address(dweight),
           address(dbias), m, d, p.parallel, p.rows);
  });
  return {dx, dweight, dbias};
}

Outputs backward_meta(const Tensor& grad_out, const Tensor& input, int64_t dims, const Tensor& mean, const Tensor& rstd,
                      const OptionalTensor& weight, bool center, std::array<bool, 3> mask) {
  check_backward(grad_out, input, dims, mean, rstd, weight, center);
  const auto params = input.options().dtype(compute_dtype(input.scalar_type()));
  const auto normalized = input.sym_sizes().slice(input.dim() - dims);
  return {mask[0] ? at::empty_symint(input.sym_sizes(), input.options().memory_format(at::MemoryFormat::Contiguous))
                  : Tensor(),
          mask[1] ? at::empty_symint(normalized, params) : Tensor(),
          mask[2] ? at::empty_symint(normalized, params) : Tensor()};
}

// ---- CUDA: kernels/fastnorm_kernels/numba_cuda/layernorm.py's grouped-row kernels, launched from C++ ----------------

Outputs forward_cuda(const Tensor& input, int64_t dims, const OptionalTensor& weight, const OptionalTensor& bias,
                     double eps, bool center) {
  check_forward(input, dims, weight, bias);
  c10::OptionalDeviceGuard guard(input.device());
  const Tensor x = input.contiguous();
  const int64_t d = row_length(x, dims), m = d == 0 ? 0 : x.numel() / d;
  const auto stats = x.options().dtype(compute_dtype(x.scalar_type()));
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor mean = at::empty({center ? m : 0}, stats), rstd = at::empty({m}, stats);
  if (x.numel() == 0) return {y, mean.zero_(), rstd.zero_()};
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor b = defined(bias) ? bias->contiguous() : Tensor();
  cuda::forward_rows(x, w, b, eps, y, center ? mean : Tensor(), rstd, m, d, 1, d, 1, center);
  return {y, mean, rstd};
}

Outputs backward_cuda(const Tensor& grad_out, const Tensor& input, int64_t dims, const Tensor& mean,
                      const Tensor& rstd, const OptionalTensor& weight, bool center, std::array<bool, 3> mask) {
  check_backward(grad_out, input, dims, mean, rstd, weight, center);
  c10::OptionalDeviceGuard guard(input.device());
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const int64_t d = row_length(x, dims), m = d == 0 ? 0 : x.numel() / d;
  const auto params = x.options().dtype(compute_dtype(x.scalar_type()));
  const auto normalized = x.sizes().slice(x.dim() - dims);
  Tensor dx = mask[0] ? at::empty(x.sizes(), x.options()) : Tensor();
  Tensor dweight = mask[1] ? at::empty(normalized, params) : Tensor();
  Tensor dbias = mask[2] ? at::empty(normalized, params) : Tensor();
  if (x.numel() == 0) {
    if (dweight.defined()) dweight.zero_();
    if (dbias.defined()) dbias.zero_();
    return {dx, dweight, dbias};
  }
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor mu = center ? mean.contiguous() : Tensor(), inv = rstd.contiguous();
  // dweight / dbias: the normalized shape's, written as flat (d,) arrays
  cuda::backward_rows(dy, x, mu, inv, w, dx, dweight, dbias, m, d, 1, 1, center);
  return {dx, dweight, dbias};
}

// ---- autograd -----------------------------------------------------------------------------------

// (dx, dweight, dbias) as differentiable functions of x, weight and dy (double backward): the
// statistics recomputed from x, in the compute dtype.
Outputs differentiable_backward(int64_t dims, bool center, double eps, const Tensor& dy_in, const Tensor& x_in,
                                const Tensor& weight) {
  std::vector<int64_t> inner, outer;
  for (int64_t i = 0; i < x_in.dim(); ++i) (i < x_in.dim() - dims ? outer : inner).push_back(i);
  const auto storage = x_in.scalar_type();
  const Tensor x = is_half(storage) ? x_in.to(at::kFloat) : x_in;
  const Tensor dy = is_half(storage) ? dy_in.to(at::kFloat) : dy_in;
  Tensor xc = x, rstd;
  if (center) xc = x - x.mean(inner, /*keepdim=*/true);
  rstd = at::rsqrt((xc * xc).mean(inner, /*keepdim=*/true) + eps);
  const Tensor xhat = xc * rstd;
  const Tensor g = weight.defined() ? dy * weight : dy;
  Tensor dx = g - xhat * (g * xhat).mean(inner, true);
  if (center) dx = dx - g.mean(inner, true);
  dx = rstd * dx;
  const Tensor dweight = outer.empty() ? dy * xhat : (dy * xhat).sum(outer);
  const Tensor dbias = outer.empty() ? dy : dy.sum(outer);
  return {dx.to(storage), dweight, dbias};
}

using ForwardSignature = Outputs(const Tensor&, int64_t, const OptionalTensor&, const OptionalTensor&, double, bool);
using BackwardSignature = Outputs(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&,
                                  const OptionalTensor&, bool, std::array<bool, 3>);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::row_norm_forward", "").typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::row_norm_backward", "").typed<BackwardSignature>();
  return op;
}

// The node of fastnorm::row_norm_forward in autograd graphs: saves what torch's LayerNorm saves
// (input, weight: torch's error on an in-place change before the backward) and mean, rstd.
// RMSNorm of an input that does not require grad: torch's RMSNorm (a composite) then saves only
// the normalized input, so an in-place edit of the input or the weight before the backward is no
// error there and the weight's gradient uses the forward's values. The node saves a copy of the
// input instead (the forward's values) and no weight (only the input's gradient needs it).
struct RowNormBackward : public torch::autograd::Node {
  SavedVariable input_, weight_, mean_, rstd_;
  bool has_weight_ = false, center_ = true;
  int64_t dims_ = 1;
  double eps_ = 0.0;
  at::ScalarType dtype_ = at::kFloat;
  c10::SymInt numel_ = 0;

  std::string name() const override { return center_ ? "fastnorm::LayerNormBackward" : "fastnorm::RMSNormBackward"; }

  void release_variables() override {
    for (auto* v : {&input_, &weight_, &mean_, &rstd_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    if (!grads[0].defined()) return out;
    auto self = getptr();
    const Tensor x = input_.unpack(self);
    const Tensor weight = has_weight_ ? weight_.unpack(self) : Tensor();
    const Tensor mean = mean_.unpack(self), rstd = rstd_.unpack(self);
    TORCH_CHECK(x.scalar_type() == dtype_ && x.sym_numel() == numel_ && x.dim() >= dims_,
                "fastnorm's LayerNorm/RMSNorm backward: a saved tensor came back with another dtype or size than the "
                "forward saved (a saved-tensor hook?): input ", dtype_name(x.scalar_type()), " ",
                size_repr(x.sym_sizes()));
    const bool need[3] = {should_compute_output(0), should_compute_output(1), should_compute_output(2)};
    Tensor dx, dweight, dbias;
    if (c10::GradMode::is_enabled()) {  // create_graph=True: differentiable ATen ops
      std::tie(dx, dweight, dbias) = differentiable_backward(dims_, center_, eps_, grads[0], x, weight);
    } else {
      std::tie(dx, dweight, dbias) = backward_op().call(grads[0], x, dims_, mean, rstd,
                                                        weight.defined() ? OptionalTensor(weight) : std::nullopt,
                                                        center_, {need[0], need[1], need[2]});
    }
    if (need[0]) out[0] = dx;
    if (need[1]) out[1] = dweight;
    if (need[2]) out[2] = dbias;
    return out;
  }
};

Outputs forward_autograd(const Tensor& input, int64_t dims, const OptionalTensor& weight, const OptionalTensor& bias,
                         double eps, bool center) {
  const Tensor& w = value(weight);
  const Tensor& b = value(bias);
  TORCH_CHECK(!torch::autograd::isFwGradDefined(input) && !torch::autograd::isFwGradDefined(weight) &&
                  !torch::autograd::isFwGradDefined(bias),
              "fastnorm::row_norm_forward has no forward-mode AD formula (fastnorm.nn's modules and "
              "fastnorm.functional run torch's op for dual tensors)");
  c10::intrusive_ptr<RowNormBackward> node;
  if (torch::autograd::compute_requires_grad(input, w, b)) {
    node = c10::make_intrusive<RowNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, w, b));
  }
  Outputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = forward_op().call(input, dims, weight, bias, eps, center);
  }
  if (node) {
    torch::autograd::set_history(std::get<0>(out), c10::intrusive_ptr<torch::autograd::Node>(node));
    const bool private_copy = !center && !input.requires_grad();
    node->input_ = SavedVariable(private_copy ? input.clone() : input, false);
    node->has_weight_ = w.defined() && !private_copy;
    if (node->has_weight_) node->weight_ = SavedVariable(w, false);
    node->mean_ = SavedVariable(std::get<1>(out), false);
    node->rstd_ = SavedVariable(std::get<2>(out), false);
    node->center_ = center;
    node->dims_ = dims;
    node->eps_ = eps;
    node->dtype_ = input.scalar_type();
    node->numel_ = input.sym_numel();
  }
  return out;
}

// ---- fastnorm::layer_norm and fastnorm::rms_norm: torch's semantics -----------------------------

// Whether the kernels take this call as it is; torch's own op runs otherwise (its values and
// errors: a shape it refuses, a device or dtype the kernels lack, dtypes torch mixes or refuses).
bool kernels_take(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptionalTensor& weight,
                  const OptionalTensor& bias) {
  const int64_t dims = static_cast<int64_t>(normalized_shape.size());
  if (dims == 0 || input.dim() < dims || input.sym_sizes().slice(input.dim() - dims) != normalized_shape) return false;
  // CPU, or CUDA where the C++ ops launch the cuda kernels (a driver here)
  if (!(input.device().is_cpu() || (input.device().is_cuda() && cuda::usable()))) return false;
  if (storage_of(input.scalar_type()) < 0 || input.sym_numel() == 0) return false;
  for (const auto* t : {&weight, &bias}) {
    if (!defined(*t)) continue;
    const auto dtype = (*t)->scalar_type();
    if ((*t)->sym_sizes() != normalized_shape || (*t)->device() != input.device()) return false;
    if (dtype != input.scalar_type() && !(is_half(input.scalar_type()) && dtype == at::kFloat)) return false;
  }
  return true;
}

Tensor layer_norm(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptionalTensor& weight,
                  const OptionalTensor& bias, double eps) {
  if (!kernels_take(input, normalized_shape, weight, bias)) {
    return at::layer_norm_symint(input, normalized_shape, weight, bias, eps);
  }
  return std::get<0>(forward_op().call(input, static_cast<int64_t>(normalized_shape.size()), wide(weight), wide(bias),
                                       eps, /*center=*/true));
}

Tensor rms_norm(const Tensor& input, c10::SymIntArrayRef normalized_shape, const OptionalTensor& weight,
                std::optional<double> eps) {
  if (!kernels_take(input, normalized_shape, weight, std::nullopt)) {
    return at::rms_norm_symint(input, normalized_shape, weight, eps);
  }
  // torch's default: the machine epsilon of the compute dtype (float32 for 16-bit inputs)
  const double e = eps.has_value() ? *eps
                   : input.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                         : static_cast<double>(std::numeric_limits<float>::epsilon());
  return std::get<0>(forward_op().call(input, static_cast<int64_t>(normalized_shape.size()), wide(weight),
                                       std::nullopt, e, /*center=*/false));
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_FRAGMENT(fastnorm, m) {
  m.def("layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, float? eps) -> Tensor");
  m.def(
      "row_norm_forward(Tensor input, int normalized_dims, Tensor? weight, Tensor? bias, float eps, bool center) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "row_norm_backward(Tensor grad_output, Tensor input, int normalized_dims, Tensor mean, Tensor rstd, "
      "Tensor? weight, bool center, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnorm, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &fastnorm::layer_norm);
  m.impl("rms_norm", &fastnorm::rms_norm);
}

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("row_norm_forward", &fastnorm::forward_cpu);
  m.impl("row_norm_backward", &fastnorm::backward_cpu);
}

TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("row_norm_forward", &fastnorm::forward_cuda);
  m.impl("row_norm_backward", &fastnorm::backward_cuda);
}

TORCH_LIBRARY_IMPL(fastnorm, Meta, m) {
  m.impl("row_norm_forward", &fastnorm::forward_meta);
  m.impl("row_norm_backward", &fastnorm::backward_meta);
}

TORCH_LIBRARY_IMPL(fastnorm, Autograd, m) {
  m.impl("row_norm_forward", &fastnorm::forward_autograd);
  m.impl("row_norm_backward", torch::CppFunction::makeFallthrough());
}
