// Group Normalization as ops of torch's dispatcher.
//
// The input (N, C, *) is seen as (N, C, S), or (N, S, C) when it is channels-last in memory (the
// kernels read that layout directly and the output keeps it, as torch's CPU GroupNorm does). The
// math is the numba kernels' (kernels/fastnorm_kernels/numba_cpu/groupnorm.py, through their C entry points).
//
//   fastnorm::group_norm            CompositeImplicitAutograd: F.group_norm's arguments and
//                                   semantics; what the kernels do not take (another device or
//                                   dtype, mixed dtypes, an empty input, a shape torch refuses)
//                                   runs torch's own op: its values, its errors
//   fastnorm::group_norm_forward    CPU, Meta, Autograd (GroupNormBackward): (y, mean, rstd),
//                                   mean and rstd (N*G,) in the compute dtype
//   fastnorm::group_norm_backward   CPU, Meta: (dx, dweight, dbias), those of output_mask
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

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

using Forward = void (*)(int64_t x, int64_t weight, int64_t bias, int64_t y, int64_t mean, int64_t rstd, int64_t n,
                         int64_t c, int64_t s, int64_t groups, double eps, int64_t channels_last, int64_t parallel);
using Backward = void (*)(int64_t dy, int64_t x, int64_t mean, int64_t rstd, int64_t weight, int64_t dx,
                          int64_t dweight, int64_t dbias, int64_t n, int64_t c, int64_t s, int64_t groups,
                          int64_t channels_last, int64_t parallel);

bool parallel_for(int64_t numel) {
  const auto& t = tunables();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), t.max_threads));
  return numel >= t.parallel_min_elements && threads > 1;
}

void check_forward(const Tensor& input, int64_t groups, const OptionalTensor& weight, const OptionalTensor& bias) {
  TORCH_CHECK(input.dim() >= 2 && groups > 0 && input.sym_size(1) % groups == 0,
              "fastnorm::group_norm_forward: an (N, C, *) input with C divisible by groups=", groups, ", got ",
              size_repr(input.sym_sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(storage_of(input.scalar_type()) >= 0, "fastnorm::group_norm_forward: ",
                              dtype_name(input.scalar_type()), " is not float32, float64, bfloat16 or float16");
  const auto compute = compute_dtype(input.scalar_type());
  for (const auto* t : {&weight, &bias}) {
    if (!defined(*t)) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->sym_numel() == input.sym_size(1) && (*t)->scalar_type() == compute &&
                    (*t)->device() == input.device(),
                "fastnorm::group_norm_forward takes (C,) weight and bias in ", dtype_name(compute),
                " (fastnorm::group_norm converts them), got ", size_repr((*t)->sym_sizes()), " ",
                dtype_name((*t)->scalar_type()));
  }
}

// ---- fastnorm::group_norm_forward ---------------------------------------------------------------

Outputs forward_cpu(const Tensor& input, int64_t groups, const OptionalTensor& weight, const OptionalTensor& bias,
                    double eps) {
  check_forward(input, groups, weight, bias);
  const auto layout = layout_of(input);
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();
  const int64_t n = x.size(0), c = x.size(1), s = n * c == 0 ? 0 : x.numel() / (n * c);
  const auto stats = x.options().dtype(compute_dtype(x.scalar_type()));
  Tensor y = pooled_empty(x, canonical_strides(x, layout));
  Tensor mean = at::empty({n * groups}, stats), rstd = at::empty({n * groups}, stats);
  if (x.numel() == 0) return {y, mean.zero_(), rstd.zero_()};
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor b = defined(bias) ? bias->contiguous() : Tensor();
  auto kernel = reinterpret_cast<Forward>(entry(Entry::kGroupNormForward, storage_of(x.scalar_type())));
  const bool rows = layout != at::MemoryFormat::Contiguous;
  without_gil([&] {
    follow_torch_threads();
    kernel(address(x), address(w), address(b), address(y), address(mean), address(rstd), n, c, s, groups, eps, rows,
           parallel_for(x.numel()));
  });
  return {y, mean, rstd};
}

Outputs forward_meta(const Tensor& input, int64_t groups, const OptionalTensor& weight, const OptionalTensor& bias,
                     double eps) {
  check_forward(input, groups, weight, bias);
  const auto stats = input.options().dtype(compute_dtype(input.scalar_type()));
  const c10::SymInt ng = input.sym_size(0) * groups;
  return {at::empty_symint(input.sym_sizes(), input.options().memory_format(layout_of(input))),
          at::empty_symint({ng}, stats), at::empty_symint({ng}, stats)};
}

// ---- fastnorm::group_norm_backward --------------------------------------------------------------

void check_backward(const Tensor& grad_out, const Tensor& input, int64_t groups, const Tensor& mean,
                    const Tensor& rstd, const OptionalTensor& weight) {
  TORCH_CHECK(input.dim() >= 2 && groups > 0 && input.sym_size(1) % groups == 0,
              "fastnorm::group_norm_backward: an (N, C, *) input with C divisible by groups=", groups);
  TORCH_CHECK(grad_out.sym_sizes() == input.sym_sizes() && grad_out.scalar_type() == input.scalar_type(),
              "fastnorm::group_norm_backward: grad_output ", dtype_name(grad_out.scalar_type()), " ",
              size_repr(grad_out.sym_sizes()), " for an input ", dtype_name(input.scalar_type()), " ",
              size_repr(input.sym_sizes()));
  TORCH_CHECK_NOT_IMPLEMENTED(storage_of(input.scalar_type()) >= 0, "fastnorm::group_norm_backward: ",
                              dtype_name(input.scalar_type()), " is not float32, float64, bfloat16 or float16");
  const auto compute = compute_dtype(input.scalar_type());
  const c10::SymInt ng = input.sym_size(0) * groups;
  TORCH_CHECK(mean.sym_numel() == ng && rstd.sym_numel() == ng && mean.scalar_type() == compute &&
                  rstd.scalar_type() == compute,
              "fastnorm::group_norm_backward: mean and rstd must hold ", ng, " ", dtype_name(compute), " values");
  if (defined(weight)) {
    TORCH_CHECK(weight->sym_numel() == input.sym_size(1) && weight->scalar_type() == compute,
                "fastnorm::group_norm_backward: weight must hold C ", dtype_name(compute), " values");
  }
}

Outputs backward_cpu(const Tensor& grad_out, const Tensor& input, int64_t groups, const Tensor& mean,
                     const Tensor& rstd, const OptionalTensor& weight, std::array<bool, 3> mask) {
  check_backward(grad_out, input, groups, mean, rstd, weight);
  const auto layout = layout_of(input);
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();
  const Tensor dy = grad_out.is_contiguous(layout) ? grad_out : grad_out.contiguous(layout);
  const int64_t n = x.size(0), c = x.size(1), s = n * c == 0 ? 0 : x.numel() / (n * c);
  const auto params = x.options().dtype(compute_dtype(x.scalar_type()));
  Tensor dx = mask[0] ? pooled_empty(x, canonical_strides(x, layout)) : Tensor();
  Tensor dweight = mask[1] ? at::empty({c}, params) : Tensor();
  Tensor dbias = mask[2] ? at::empty({c}, params) : Tensor();
  if (x.numel() == 0) {
    if (dweight.defined()) dweight.zero_();
    if (dbias.defined()) dbias.zero_();
    return {dx, dweight, dbias};
  }
  if (!dx.defined() && !dweight.defined() && !dbias.defined()) return {dx, dweight, dbias};
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor mu = mean.contiguous(), inv = rstd.contiguous();
  auto kernel = reinterpret_cast<Backward>(entry(Entry::kGroupNormBackward, storage_of(x.scalar_type())));
  const bool rows = layout != at::MemoryFormat::Contiguous;
  without_gil([&] {
    follow_torch_threads();
    kernel(address(dy), address(x), address(mu), address(inv), address(w), address(dx), address(dweight),
           address(dbias), n, c, s, groups, rows, parallel_for(x.numel()));
  });
  return {dx, dweight, dbias};
}

Outputs backward_meta(const Tensor& grad_out, const Tensor& input, int64_t groups, const Tensor& mean,
                      const Tensor& rstd, const OptionalTensor& weight, std::array<bool, 3> mask) {
  check_backward(grad_out, input, groups, mean, rstd, weight);
  const auto params = input.options().dtype(compute_dtype(input.scalar_type()));
  const c10::SymInt c = input.sym_size(1);
  return {mask[0] ? at::empty_symint(input.sym_sizes(), input.options().memory_format(layout_of(input))) : Tensor(),
          mask[1] ? at::empty_symint({c}, params) : Tensor(), mask[2] ? at::empty_symint({c}, params) : Tensor()};
}

// ---- CUDA: kernels/fastnorm_kernels/numba_cuda/groupnorm.py's launches (a (sample, group) block as a row), from C++ ----
// The kernels read contiguous (N, C, S) memory: a channels-last input is read through a
// contiguous copy and its outputs given back in its layout, as the CPU op gives them.

Outputs forward_cuda(const Tensor& input, int64_t groups, const OptionalTensor& weight, const OptionalTensor& bias,
                     double eps) {
  check_forward(input, groups, weight, bias);
  c10::OptionalDeviceGuard guard(input.device());
  const auto layout = layout_of(input);
  const Tensor x = input.contiguous();
  const int64_t n = x.size(0), c = x.size(1), s = n * c == 0 ? 0 : x.numel() / (n * c);
  const auto stats = x.options().dtype(compute_dtype(x.scalar_type()));
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor mean = at::empty({n * groups}, stats), rstd = at::empty({n * groups}, stats);
  if (x.numel() == 0) return {y.contiguous(layout), mean.zero_(), rstd.zero_()};
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  const Tensor b = defined(bias) ? bias->contiguous() : Tensor();
  const int64_t cg = c / groups;
  cuda::forward_rows(x, w, b, eps, y, mean, rstd, n * groups, cg * s, groups, cg, s, true);
  return {layout == at::MemoryFormat::Contiguous ? y : y.contiguous(layout), mean, rstd};
}

Outputs backward_cuda(const Tensor& grad_out, const Tensor& input, int64_t groups, const Tensor& mean,
                      const Tensor& rstd, const OptionalTensor& weight, std::array<bool, 3> mask) {
  check_backward(grad_out, input, groups, mean, rstd, weight);
  c10::OptionalDeviceGuard guard(input.device());
  const auto layout = layout_of(input);
  const Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const int64_t n = x.size(0), c = x.size(1), s = n * c == 0 ? 0 : x.numel() / (n * c);
  const auto params = x.options().dtype(compute_dtype(x.scalar_type()));
  Tensor dx = mask[0] ? at::empty(x.sizes(), x.options()) : Tensor();
  Tensor dweight = mask[1] ? at::empty({c}, params) : Tensor();
  Tensor dbias = mask[2] ? at::empty({c}, params) : Tensor();
  if (x.numel() == 0) {
    if (dweight.defined()) dweight.zero_();
    if (dbias.defined()) dbias.zero_();
    return {dx.defined() ? dx.contiguous(layout) : dx, dweight, dbias};
  }
  const Tensor w = defined(weight) ? weight->contiguous() : Tensor();
  cuda::backward_rows(dy, x, mean.contiguous(), rstd.contiguous(), w, dx, dweight, dbias, n, c, s, groups, true);
  if (dx.defined() && layout != at::MemoryFormat::Contiguous) dx = dx.contiguous(layout);
  return {dx, dweight, dbias};
}

// ---- autograd -----------------------------------------------------------------------------------

// (dx, dweight, dbias) as differentiable functions of dy, x and weight (double backward), the
// statistics recomputed from x in the compute dtype.
Outputs differentiable_backward(int64_t groups, double eps, const Tensor& dy_in, const Tensor& x_in,
                                const Tensor& weight) {
  const auto storage = x_in.scalar_type();
  const Tensor x = is_half(storage) ? x_in.to(at::kFloat) : x_in;
  const Tensor dy = is_half(storage) ? dy_in.to(at::kFloat) : dy_in;
  std::vector<c10::SymInt> grouped{x.sym_size(0), groups, -1};
  const Tensor xg = x.reshape_symint(grouped), gg = dy.reshape_symint(grouped);
  const Tensor xc = xg - xg.mean({2}, true);
  const Tensor rstd = at::rsqrt((xc * xc).mean({2}, true) + eps);
  const Tensor xhat = (xc * rstd).reshape_symint(x.sym_sizes());
  std::vector<c10::SymInt> channel(x.dim(), 1);
  channel[1] = x.sym_size(1);
  const Tensor g = weight.defined() ? dy * weight.view_symint(channel) : dy;
  const Tensor gr = g.reshape_symint(grouped), xr = xhat.reshape_symint(grouped);
  const Tensor dx = (rstd * (gr - gr.mean({2}, true) - xr * (gr * xr).mean({2}, true))).reshape_symint(x.sym_sizes());
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return {dx.to(storage), (dy * xhat).sum(dims), dy.sum(dims)};
}

using ForwardSignature = Outputs(const Tensor&, int64_t, const OptionalTensor&, const OptionalTensor&, double);
using BackwardSignature = Outputs(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&,
                                  const OptionalTensor&, std::array<bool, 3>);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::group_norm_forward", "").typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::group_norm_backward", "").typed<BackwardSignature>();
  return op;
}

// The node of fastnorm::group_norm_forward: saves input and weight (torch's in-place check) and
// the statistics.
struct GroupNormBackward : public torch::autograd::Node {
  SavedVariable input_, weight_, mean_, rstd_;
  bool has_weight_ = false;
  int64_t groups_ = 1;
  double eps_ = 0.0;
  at::ScalarType dtype_ = at::kFloat;
  c10::SymInt numel_ = 0;

  std::string name() const override { return "fastnorm::GroupNormBackward"; }

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
    TORCH_CHECK(x.scalar_type() == dtype_ && x.sym_numel() == numel_ && x.dim() >= 2,
                "fastnorm's GroupNorm backward: a saved tensor came back with another dtype or size than the "
                "forward saved (a saved-tensor hook?): input ", dtype_name(x.scalar_type()), " ",
                size_repr(x.sym_sizes()));
    const bool need[3] = {should_compute_output(0), should_compute_output(1), should_compute_output(2)};
    Tensor dx, dweight, dbias;
    if (c10::GradMode::is_enabled()) {
      std::tie(dx, dweight, dbias) = differentiable_backward(groups_, eps_, grads[0], x, weight);
    } else {
      std::tie(dx, dweight, dbias) = backward_op().call(grads[0], x, groups_, mean, rstd,
                                                        weight.defined() ? OptionalTensor(weight) : std::nullopt,
                                                        {need[0], need[1], need[2]});
    }
    if (need[0]) out[0] = dx;
    if (need[1]) out[1] = dweight;
    if (need[2]) out[2] = dbias;
    return out;
  }
};

Outputs forward_autograd(const Tensor& input, int64_t groups, const OptionalTensor& weight, const OptionalTensor& bias,
                         double eps) {
  const Tensor& w = value(weight);
  const Tensor& b = value(bias);
  TORCH_CHECK(!torch::autograd::isFwGradDefined(input) && !torch::autograd::isFwGradDefined(weight) &&
                  !torch::autograd::isFwGradDefined(bias),
              "fastnorm::group_norm_forward has no forward-mode AD formula (fastnorm.nn.GroupNorm and "
              "fastnorm.functional.group_norm run torch's op for dual tensors)");
  c10::intrusive_ptr<GroupNormBackward> node;
  if (torch::autograd::compute_requires_grad(input, w, b)) {
    node = c10::make_intrusive<GroupNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, w, b));
  }
  Outputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = forward_op().call(input, groups, weight, bias, eps);
  }
  if (node) {
    torch::autograd::set_history(std::get<0>(out), c10::intrusive_ptr<torch::autograd::Node>(node));
    node->input_ = SavedVariable(input, false);
    node->has_weight_ = w.defined();
    if (w.defined()) node->weight_ = SavedVariable(w, false);
    node->mean_ = SavedVariable(std::get<1>(out), false);
    node->rstd_ = SavedVariable(std::get<2>(out), false);
    node->groups_ = groups;
    node->eps_ = eps;
    node->dtype_ = input.scalar_type();
    node->numel_ = input.sym_numel();
  }
  return out;
}

// ---- fastnorm::group_norm: torch's semantics ------------------------------------------------------

bool kernels_take(const Tensor& input, int64_t groups, const OptionalTensor& weight, const OptionalTensor& bias) {
  if (input.dim() < 2 || groups <= 0 || input.sym_size(1) % groups != 0) return false;
  // CPU, or CUDA where the C++ ops launch the cuda kernels (a driver here)
  if (!(input.device().is_cpu() || (input.device().is_cuda() && cuda::usable()))) return false;
  if (storage_of(input.scalar_type()) < 0 || input.sym_numel() == 0) return false;
  for (const auto* t : {&weight, &bias}) {
    if (!defined(*t)) continue;
    const auto dtype = (*t)->scalar_type();
    if ((*t)->dim() != 1 || (*t)->sym_numel() != input.sym_size(1) || (*t)->device() != input.device()) return false;
    if (dtype != input.scalar_type() && !(is_half(input.scalar_type()) && dtype == at::kFloat)) return false;
  }
  return true;
}

Tensor group_norm(const Tensor& input, int64_t num_groups, const OptionalTensor& weight, const OptionalTensor& bias,
                  double eps) {
  if (!kernels_take(input, num_groups, weight, bias)) {
    return at::group_norm(input, num_groups, weight, bias, eps);
  }
  return std::get<0>(forward_op().call(input, num_groups, wide(weight), wide(bias), eps));
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_FRAGMENT(fastnorm, m) {
  m.def("group_norm(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def(
      "group_norm_forward(Tensor input, int groups, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor grad_output, Tensor input, int groups, Tensor mean, Tensor rstd, Tensor? weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnorm, CompositeImplicitAutograd, m) { m.impl("group_norm", &fastnorm::group_norm); }

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("group_norm_forward", &fastnorm::forward_cpu);
  m.impl("group_norm_backward", &fastnorm::backward_cpu);
}

TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("group_norm_forward", &fastnorm::forward_cuda);
  m.impl("group_norm_backward", &fastnorm::backward_cuda);
}

TORCH_LIBRARY_IMPL(fastnorm, Meta, m) {
  m.impl("group_norm_forward", &fastnorm::forward_meta);
  m.impl("group_norm_backward", &fastnorm::backward_meta);
}

TORCH_LIBRARY_IMPL(fastnorm, Autograd, m) {
  m.impl("group_norm_forward", &fastnorm::forward_autograd);
  m.impl("group_norm_backward", torch::CppFunction::makeFallthrough());
}
