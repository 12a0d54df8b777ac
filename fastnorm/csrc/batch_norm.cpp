// Batch Normalization as ops of torch's dispatcher: torch.ops.fastnorm.batch_norm and the ops
// it is made of.
//
// Book: "Deep Learning from Scratch", section 6.3. The math is the numba kernels'
// (kernels/fastnorm_kernels/numba_cpu/batchnorm.py, called through their C entry points); this file checks
// arguments in torch's words, moves tensors and records autograd.
//
//   fastnorm::batch_norm            CompositeImplicitAutograd: torch.nn.functional.batch_norm's
//                                   arguments and semantics (an empty batch, 16-bit parameters),
//                                   built on the two ops below
//   fastnorm::batch_norm_forward    CPU (the kernels), Meta (shapes), Autograd (BatchNormBackward):
//                                   (y, save_mean, save_invstd); the running statistics are
//                                   updated in place in training (annotated as mutated)
//   fastnorm::batch_norm_backward   CPU, Meta: (dx, dweight, dbias), those of output_mask
//   fastnorm::batch_norm_stats      CPU, Meta: per-channel mean and biased variance in float64
//                                   (what fastnorm.nn.SyncBatchNorm merges across processes)
//
// Every layer of torch calls these same ops: eager code, torch.compile (Meta gives shapes;
// running statistics are functionalised), TorchScript, jit.trace, torch.export and fx. A backward
// with create_graph=True computes the gradients with differentiable ATen ops, so that second
// derivatives are torch's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <sstream>
#include <tuple>
#include <vector>

#include "batch_norm.h"
#include "fastnorm.h"

namespace fastnorm {

namespace {
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The C entry points (argument lists: kernels/fastnorm_kernels/numba_cpu/batchnorm.py).
using ForwardTrain = void (*)(int64_t x, int64_t weight, int64_t bias, int64_t running_mean, int64_t running_var,
                              int64_t y, int64_t save_mean, int64_t save_invstd, int64_t n, int64_t c, int64_t s,
                              double momentum, double eps, int64_t parallel, int64_t rows_per_chunk, int64_t block);
using ForwardEval = void (*)(int64_t x, int64_t weight, int64_t bias, int64_t running_mean, int64_t running_var,
                             int64_t y, int64_t n, int64_t c, int64_t s, double eps, int64_t parallel,
                             int64_t rows_per_chunk);
using Backward = void (*)(int64_t dy, int64_t x, int64_t mean, int64_t invstd, int64_t weight, int64_t training,
                          int64_t dx, int64_t dweight, int64_t dbias, int64_t n, int64_t c, int64_t s,
                          int64_t parallel, int64_t rows_per_chunk, int64_t block);
using Stats = void (*)(int64_t x, int64_t mean, int64_t var, int64_t n, int64_t c, int64_t s, int64_t parallel,
                       int64_t rows_per_chunk, int64_t block);

const char* const kPerChannel[] = {"weight", "bias", "running_mean", "running_var"};
}  // namespace

Geometry geometry_of(const Tensor& x, at::MemoryFormat layout) {
  const int64_t c = x.size(1);
  if (layout != at::MemoryFormat::Contiguous) return {x.numel() / c, c, 1};
  return {x.size(0), c, x.numel() / std::max<int64_t>(1, x.size(0) * c)};
}

namespace {

// fastnorm_kernels.numba_cpu.batchnorm.plan: (parallel, rows_per_chunk, forward block, backward block)
struct Plan {
  bool parallel;
  int64_t rows_per_chunk, forward_block, backward_block;
};
Plan plan_of(const Geometry& g, int64_t itemsize) {
  const auto& t = tunables();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), t.max_threads));
  const int64_t chunks = std::max<int64_t>(1, std::min({t.max_chunks, (g.n * g.c) / t.chunk_elements, g.n}));
  auto block = [&](int64_t arrays) {
    if (g.s == 1) return g.c;
    const int64_t per_channel = std::max<int64_t>(1, g.n * g.s * itemsize * arrays);
    return std::min(g.c, std::max<int64_t>(1, t.block_bytes / per_channel));
  };
  return {g.n * g.c * g.s >= t.parallel_min_elements && threads > 1, (g.n + chunks - 1) / chunks, block(1), block(2)};
}

}  // namespace

Tensor dense_vector(const Tensor& t) { return t.defined() && !t.is_contiguous() ? t.contiguous() : t; }

// torch's checks of F.batch_norm's arguments, in torch's order and words, plus the kernels' dtypes.
// symbolic: sizes may be symbolic (Meta under torch.compile): only checks that need no values.
void check_arguments(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                     double eps) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "batch_norm expects an input of shape (N, C) or (N, C, *spatial), got a ",
                    input.dim(), "-D input of shape ", size_repr(input.sym_sizes()));
  if (training) {
    c10::SymInt values = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) values = values * input.sym_size(d);
    TORCH_CHECK_VALUE(values != 1, "Expected more than 1 value per channel when training, got input size ",
                      size_repr(input.sym_sizes()));
    TORCH_CHECK_VALUE(eps > 0.0, "batch_norm eps must be positive during training, but got ", eps);
  }
  TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", eps);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  if (!training) {
    TORCH_CHECK(has_mean, "running_mean must be defined in evaluation mode");
    TORCH_CHECK(has_var, "running_var must be defined in evaluation mode");
  } else {
    TORCH_CHECK_VALUE(has_mean == has_var, "running_mean and running_var must either both be None or neither be None");
  }
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(storage_of(dtype) >= 0,
                              "fastnorm's '", input.is_cuda() ? "cuda" : "numba", "' backend computes batch_norm in "
                              "float32, float64, bfloat16 or float16, but the input is ", dtype_name(dtype),
                              "; convert it, or use backend='torch' for other dtypes");
  const OptionalTensor* per_channel[] = {&weight, &bias, &running_mean, &running_var};
  bool mixed = false;  // torch's mixed case: a 16-bit input with float32 per-channel tensors
  for (const auto* t : per_channel) {
    if (t->has_value() && (*t)->defined() && (*t)->scalar_type() != dtype) mixed = is_half(dtype);
  }
  const auto channels = input.sym_size(1);
  for (int i = 0; i < 4; ++i) {
    const auto& t = *per_channel[i];
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->sym_numel() == channels, kPerChannel[i], " should contain ", channels, " elements not ",
                t->sym_numel());
    if (mixed) {
      TORCH_CHECK(t->scalar_type() == at::kFloat, "mixed dtype (CPU): expect parameter to have scalar type of Float");
    } else {
      TORCH_CHECK(t->scalar_type() == dtype, "mixed dtype: all inputs must share same datatype, but input is ",
                  dtype_name(dtype), " and ", kPerChannel[i], " is ", dtype_name(t->scalar_type()));
    }
    TORCH_CHECK(t->device() == input.device(),
                "Expected all tensors to be on the same device, but found at least two devices, ", input.device(),
                " (input) and ", t->device(), " (", kPerChannel[i], ")!");
  }
}

// The forward op's own requirement beyond torch's: a 16-bit input takes float32 per-channel
// tensors (fastnorm::batch_norm converts 16-bit ones).
void check_per_channel_compute(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& running_mean, const OptionalTensor& running_var) {
  const auto compute = compute_dtype(input.scalar_type());
  for (const auto* t : {&weight, &bias, &running_mean, &running_var}) {
    TORCH_CHECK(!t->has_value() || !(*t)->defined() || (*t)->scalar_type() == compute,
                "fastnorm::batch_norm_forward takes ", dtype_name(compute), " weight, bias and running statistics "
                "for a ", dtype_name(input.scalar_type()), " input (fastnorm::batch_norm converts 16-bit ones)");
  }
}

void check_backward(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
                    const Tensor& invstd) {
  TORCH_CHECK(input.dim() >= 2, "fastnorm::batch_norm_backward: input must be (N, C, *), got ", input.dim(), "-D");
  TORCH_CHECK(grad_out.sym_sizes() == input.sym_sizes(), "fastnorm::batch_norm_backward: grad_output of shape ",
              size_repr(grad_out.sym_sizes()), " for an input of shape ", size_repr(input.sym_sizes()));
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "fastnorm::batch_norm_backward: grad_output is ",
              dtype_name(grad_out.scalar_type()), ", input ", dtype_name(input.scalar_type()));
  TORCH_CHECK_NOT_IMPLEMENTED(storage_of(input.scalar_type()) >= 0, "fastnorm::batch_norm_backward: ",
                              dtype_name(input.scalar_type()), " is not float32, float64, bfloat16 or float16");
  const auto compute = compute_dtype(input.scalar_type());
  const Tensor* vectors[] = {&mean, &invstd, weight.has_value() ? &*weight : nullptr};
  const char* names[] = {"save_mean", "save_invstd", "weight"};
  for (int i = 0; i < 3; ++i) {
    if (vectors[i] == nullptr || !vectors[i]->defined()) continue;
    TORCH_CHECK(vectors[i]->sym_numel() == input.sym_size(1) && vectors[i]->scalar_type() == compute,
                "fastnorm::batch_norm_backward: ", names[i], " must hold ", input.sym_size(1), " ",
                dtype_name(compute), " values, got ", vectors[i]->sym_numel(), " ",
                dtype_name(vectors[i]->scalar_type()));
  }
}

namespace {

// ---- fastnorm::batch_norm_forward -----------------------------------------------------------

Outputs forward_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                    const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                    double momentum, double eps) {
  check_arguments(input, weight, bias, running_mean, running_var, training, eps);
  check_per_channel_compute(input, weight, bias, running_mean, running_var);
  const int64_t c = input.size(1);
  const auto per_channel = input.options().dtype(compute_dtype(input.scalar_type()));
  const auto layout = layout_of(input);
  if (input.numel() == 0) {  // torch: an empty output, the running statistics left alone
    return {at::empty(input.sizes(), input.options().memory_format(layout)), at::zeros({c}, per_channel),
            at::zeros({c}, per_channel)};
  }
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();  // strided: a dense copy
  const Geometry g = geometry_of(x, layout);
  const Plan p = plan_of(g, x.element_size());
  Tensor y = pooled_empty(x, canonical_strides(x, layout));
  const Tensor w = dense_vector(value(weight)), b = dense_vector(value(bias));
  const Tensor& rm = value(running_mean);
  const Tensor& rv = value(running_var);
  const Tensor mean_in = dense_vector(rm), var_in = dense_vector(rv);
  Tensor save_mean = at::empty({c}, per_channel), save_invstd = at::empty({c}, per_channel);
  const int storage = storage_of(x.scalar_type());
  if (training) {
    auto kernel = reinterpret_cast<ForwardTrain>(entry(Entry::kForwardTrain, storage));
    without_gil([&] {
      follow_torch_threads();
      kernel(address(x), address(w), address(b), address(mean_in), address(var_in), address(y), address(save_mean),
             address(save_invstd), g.n, g.c, g.s, momentum, eps, p.parallel, p.rows_per_chunk, p.forward_block);
    });
    // strided running statistics: updated through a dense copy, written back without a version
    // bump, as the kernels' own writes (torch's BatchNorm bumps neither: a second forward
    // before the backward must not raise the in-place error for the first one's saved tensors)
    at::AutoDispatchBelowADInplaceOrView no_version_bump;
    if (mean_in.defined() && !mean_in.is_same(rm)) rm.copy_(mean_in);
    if (var_in.defined() && !var_in.is_same(rv)) rv.copy_(var_in);
  } else {
    auto kernel = reinterpret_cast<ForwardEval>(entry(Entry::kForwardEval, storage));
    without_gil([&] {
      follow_torch_threads();
      kernel(address(x), address(w), address(b), address(mean_in), address(var_in), address(y), g.n, g.c, g.s, eps,
             p.parallel, p.rows_per_chunk);
    });
    // the eval forward's constants, frozen now (the buffers may change before the backward)
    save_mean.copy_(rm);
    save_invstd.copy_(at::rsqrt(rv.to(at::kDouble) + eps));
  }
  return {y, save_mean, save_invstd};
}

Outputs forward_meta(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                     double momentum, double eps) {
  check_arguments(input, weight, bias, running_mean, running_var, training, eps);
  check_per_channel_compute(input, weight, bias, running_mean, running_var);
  const auto per_channel = input.options().dtype(compute_dtype(input.scalar_type()));
  const c10::SymInt c = input.sym_size(1);
  return {at::empty_symint(input.sym_sizes(), input.options().memory_format(layout_of(input))),
          at::empty_symint({c}, per_channel), at::empty_symint({c}, per_channel)};
}

// ---- fastnorm::batch_norm_backward ------------------------------------------------------------

Outputs backward_cpu(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
                     const Tensor& invstd, bool training, std::array<bool, 3> mask) {
  check_backward(grad_out, input, weight, mean, invstd);
  const int64_t c = input.size(1);
  const auto per_channel = input.options().dtype(compute_dtype(input.scalar_type()));
  const auto layout = layout_of(input);
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();
  if (x.numel() == 0) {
    return {mask[0] ? at::empty_like(x) : Tensor(), mask[1] ? at::zeros({c}, per_channel) : Tensor(),
            mask[2] ? at::zeros({c}, per_channel) : Tensor()};
  }
  const Tensor dy = grad_out.is_contiguous(layout) ? grad_out : grad_out.contiguous(layout);
  const Geometry g = geometry_of(x, layout);
  const Plan p = plan_of(g, x.element_size());
  Tensor dx = mask[0] ? pooled_empty(x, x.strides()) : Tensor();  // torch's dx has x's strides
  Tensor dweight = mask[1] ? at::empty({c}, per_channel) : Tensor();
  Tensor dbias = mask[2] ? at::empty({c}, per_channel) : Tensor();
  const Tensor w = dense_vector(value(weight)), m = dense_vector(mean), inv = dense_vector(invstd);
  auto kernel = reinterpret_cast<Backward>(entry(Entry::kBackward, storage_of(x.scalar_type())));
  without_gil([&] {
    follow_torch_threads();
    kernel(address(dy), address(x), address(m), address(inv), address(w), training, address(dx), address(dweight),
           address(dbias), g.n, g.c, g.s, p.parallel, p.rows_per_chunk, p.backward_block);
  });
  return {dx, dweight, dbias};
}

Outputs backward_meta(const Tensor& grad_out, const Tensor& input, const OptionalTensor& weight, const Tensor& mean,
                      const Tensor& invstd, bool training, std::array<bool, 3> mask) {
  check_backward(grad_out, input, weight, mean, invstd);
  const auto per_channel = input.options().dtype(compute_dtype(input.scalar_type()));
  const auto layout = layout_of(input);
  Tensor dx;
  if (mask[0]) {
    dx = input.is_contiguous(layout) ? at::empty_strided_symint(input.sym_sizes(), input.sym_strides(), input.options())
                                     : at::empty_symint(input.sym_sizes(), input.options());
  }
  const c10::SymInt c = input.sym_size(1);
  return {dx, mask[1] ? at::empty_symint({c}, per_channel) : Tensor(),
          mask[2] ? at::empty_symint({c}, per_channel) : Tensor()};
}

// ---- fastnorm::batch_norm_stats -----------------------------------------------------------------

std::tuple<Tensor, Tensor> stats_cpu(const Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "fastnorm::batch_norm_stats takes an (N, C, *) input, got a ", input.dim(), "-D one");
  TORCH_CHECK_NOT_IMPLEMENTED(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                              "fastnorm::batch_norm_stats takes a float32 or float64 input, got ",
                              dtype_name(input.scalar_type()));
  const int64_t c = input.size(1);
  const auto f64 = input.options().dtype(at::kDouble);
  if (input.numel() == 0) return {at::full({c}, NAN, f64), at::full({c}, NAN, f64)};
  const auto layout = layout_of(input);
  const Tensor x = input.is_contiguous(layout) ? input : input.contiguous();
  const Geometry g = geometry_of(x, layout);
  const Plan p = plan_of(g, x.element_size());
  Tensor mean = at::empty({c}, f64), var = at::empty({c}, f64);
  auto kernel = reinterpret_cast<Stats>(entry(Entry::kStats, storage_of(x.scalar_type())));
  without_gil([&] {
    follow_torch_threads();
    kernel(address(x), address(mean), address(var), g.n, g.c, g.s, p.parallel, p.rows_per_chunk, p.forward_block);
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> stats_meta(const Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, "fastnorm::batch_norm_stats takes an (N, C, *) input, got a ", input.dim(), "-D one");
  const auto f64 = input.options().dtype(at::kDouble);
  return {at::empty_symint({input.sym_size(1)}, f64), at::empty_symint({input.sym_size(1)}, f64)};
}

// ---- autograd -----------------------------------------------------------------------------------

// (dx, dweight, dbias) as differentiable functions of x, weight and dy (double backward); in eval
// mode mean and invstd are the forward's constants.
Outputs differentiable_backward(bool training, double eps, const Tensor& dy_in, const Tensor& x_in,
                                const Tensor& weight, const Tensor& save_mean, const Tensor& save_invstd) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x_in.dim(); ++d) dims.push_back(d);
  std::vector<c10::SymInt> shape(x_in.dim(), 1);
  shape[1] = x_in.sym_size(1);
  const auto storage = x_in.scalar_type();
  const Tensor x = is_half(storage) ? x_in.to(at::kFloat) : x_in;  // computed in float32, as the kernels do
  const Tensor dy = is_half(storage) ? dy_in.to(at::kFloat) : dy_in;
  Tensor mean, invstd;
  if (training) {  // the statistics are functions of x
    mean = x.mean(dims, /*keepdim=*/true);
    invstd = at::rsqrt(x.var(dims, /*unbiased=*/false, /*keepdim=*/true) + eps);
  } else {
    mean = save_mean.view_symint(shape);
    invstd = save_invstd.view_symint(shape);
  }
  const Tensor xhat = (x - mean) * invstd;
  const Tensor scale = weight.defined() ? invstd * weight.view_symint(shape) : invstd;
  const Tensor dbias = dy.sum(dims);
  const Tensor dweight = (dy * xhat).sum(dims);
  Tensor dx = training ? scale * (dy - dy.mean(dims, true) - xhat * (dy * xhat).mean(dims, true)) : scale * dy;
  return {dx.to(storage), dweight, dbias};
}

const c10::TypedOperatorHandle<Outputs(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&, bool, double, double)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnorm::batch_norm_forward", "")
                             .typed<Outputs(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                            const OptionalTensor&, const OptionalTensor&, bool, double, double)>();
  return op;
}

const c10::TypedOperatorHandle<Outputs(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                       const Tensor&, bool, std::array<bool, 3>)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnorm::batch_norm_backward", "")
                             .typed<Outputs(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                            const Tensor&, bool, std::array<bool, 3>)>();
  return op;
}

// The node of fastnorm::batch_norm_forward in autograd graphs. It saves what torch's own
// BatchNorm saves (input, weight, running statistics: torch's error on an in-place change of any
// of them before the backward) and the normalising mean and invstd.
struct BatchNormBackward : public torch::autograd::Node {
  SavedVariable input_, weight_, running_mean_, running_var_, save_mean_, save_invstd_;
  bool training_ = true, has_weight_ = false, has_running_ = false;
  double eps_ = 0.0;
  at::MemoryFormat layout_ = at::MemoryFormat::Contiguous;
  at::ScalarType dtype_ = at::kFloat;
  c10::SymInt numel_ = 0;

  std::string name() const override { return "fastnorm::BatchNormBackward"; }

  void release_variables() override {
    for (auto* v : {&input_, &weight_, &running_mean_, &running_var_, &save_mean_, &save_invstd_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    if (!grads[0].defined()) return out;
    auto self = getptr();
    Tensor x = input_.unpack(self);  // torch's error if any of these changed in place
    Tensor weight = has_weight_ ? weight_.unpack(self) : Tensor();
    if (has_running_) {
      running_mean_.unpack(self);
      running_var_.unpack(self);
    }
    const Tensor mean = save_mean_.unpack(self), invstd = save_invstd_.unpack(self);
    // a saved-tensor hook (saved_tensors_hooks, save_on_cpu) may give x back in another layout
    // (read in the forward's), or with another dtype or size (refused: not what the forward saved)
    TORCH_CHECK(x.scalar_type() == dtype_ && x.sym_numel() == numel_ && x.dim() >= 2 &&
                    x.sym_size(1) == mean.sym_numel() &&
                    (!weight.defined() ||
                     (weight.scalar_type() == mean.scalar_type() && weight.sym_numel() == mean.sym_numel())),
                "fastnorm's BatchNorm backward: a saved tensor came back with another dtype or size than the forward "
                "saved (a saved-tensor hook?): input ", dtype_name(x.scalar_type()), " ", size_repr(x.sym_sizes()), ", weight ",
                weight.defined() ? dtype_name(weight.scalar_type()) : "None");
    if (!x.is_contiguous(layout_)) x = x.contiguous(layout_);
    const bool need[3] = {should_compute_output(0), should_compute_output(1), should_compute_output(2)};
    const Tensor& dy = grads[0];
    Tensor dx, dweight, dbias;
    if (c10::GradMode::is_enabled()) {  // create_graph=True: differentiable ATen ops
      std::tie(dx, dweight, dbias) = differentiable_backward(training_, eps_, dy, x, weight, mean, invstd);
    } else {
      std::tie(dx, dweight, dbias) = backward_op().call(dy, x, weight.defined() ? OptionalTensor(weight) : std::nullopt,
                                                        mean, invstd, training_, {need[0], need[1], need[2]});
    }
    if (need[0]) out[0] = dx;
    if (need[1]) out[1] = dweight;
    if (need[2]) out[2] = dbias;
    return out;
  }
};

Outputs forward_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                         double momentum, double eps) {
  const Tensor& w = value(weight);
  const Tensor& b = value(bias);
  TORCH_CHECK(!torch::autograd::isFwGradDefined(input) && !torch::autograd::isFwGradDefined(weight) &&
                  !torch::autograd::isFwGradDefined(bias),
              "fastnorm::batch_norm_forward has no forward-mode AD formula (fastnorm.nn's modules and "
              "fastnorm.functional.batch_norm run torch's batch_norm for dual tensors)");
  c10::intrusive_ptr<BatchNormBackward> node;
  if (torch::autograd::compute_requires_grad(input, w, b)) {
    node = c10::make_intrusive<BatchNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, w, b));
  }
  Outputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = forward_op().call(input, weight, bias, running_mean, running_var, training, momentum, eps);
  }
  if (node) {
    torch::autograd::set_history(std::get<0>(out), c10::intrusive_ptr<torch::autograd::Node>(node));
    node->input_ = SavedVariable(input, false);
    node->has_weight_ = w.defined();
    if (w.defined()) node->weight_ = SavedVariable(w, false);
    const Tensor& rm = value(running_mean);
    node->has_running_ = rm.defined();
    if (rm.defined()) {
      node->running_mean_ = SavedVariable(rm, false);
      node->running_var_ = SavedVariable(value(running_var), false);
    }
    node->save_mean_ = SavedVariable(std::get<1>(out), false);
    node->save_invstd_ = SavedVariable(std::get<2>(out), false);
    node->training_ = training;
    node->eps_ = eps;
    node->layout_ = layout_of(input);
    node->dtype_ = input.scalar_type();
    node->numel_ = input.sym_numel();
  }
  return out;
}

// ---- fastnorm::batch_norm: torch.nn.functional.batch_norm's semantics ---------------------------

Tensor batch_norm(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                  const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training, double momentum,
                  double eps) {
  if (training) {  // F.batch_norm's own check, before anything else
    TORCH_CHECK_VALUE(input.dim() >= 2, "batch_norm expects an input of shape (N, C) or (N, C, *spatial), got a ",
                      input.dim(), "-D input of shape ", size_repr(input.sym_sizes()));
  }
  if (input.dim() >= 2 && input.sym_numel() == 0) {
    // torch: an empty batch gives an empty output (connected to weight and bias, whose gradients
    // are zeros) and leaves the running statistics alone, whatever the dtypes
    return at::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, false);
  }
  check_arguments(input, weight, bias, running_mean, running_var, training, eps);
  const auto dtype = input.scalar_type();
  bool all_half = false;  // a BatchNorm all in 16 bits: per-channel values in float32, as torch's
  for (const auto* t : {&weight, &bias, &running_mean}) {
    if (is_half(dtype) && t->has_value() && (*t)->defined() && (*t)->scalar_type() == dtype) all_half = true;
  }
  if (!all_half) return std::get<0>(forward_op().call(input, weight, bias, running_mean, running_var, training,
                                                      momentum, eps));
  OptionalTensor mean32 = wide(running_mean), var32 = wide(running_var);
  Tensor y = std::get<0>(forward_op().call(input, wide(weight), wide(bias), mean32, var32, training, momentum, eps));
  if (training && mean32.has_value()) {  // updated in float32 copies, rounded once into the buffers
    c10::NoGradGuard no_grad;
    running_mean->copy_(*mean32);
    running_var->copy_(*var32);
  }
  return y;
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY(fastnorm, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps) -> Tensor");
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnorm, CompositeImplicitAutograd, m) { m.impl("batch_norm", &fastnorm::batch_norm); }

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("batch_norm_forward", &fastnorm::forward_cpu);
  m.impl("batch_norm_backward", &fastnorm::backward_cpu);
  m.impl("batch_norm_stats", &fastnorm::stats_cpu);
}

TORCH_LIBRARY_IMPL(fastnorm, Meta, m) {
  m.impl("batch_norm_forward", &fastnorm::forward_meta);
  m.impl("batch_norm_backward", &fastnorm::backward_meta);
  m.impl("batch_norm_stats", &fastnorm::stats_meta);
}

TORCH_LIBRARY_IMPL(fastnorm, Autograd, m) {
  m.impl("batch_norm_forward", &fastnorm::forward_autograd);
  // not differentiable themselves (the forward's node differentiates through ATen ops for second
  // derivatives): autograd passes them straight to their kernels, unboxed
  m.impl("batch_norm_backward", torch::CppFunction::makeFallthrough());
  m.impl("batch_norm_stats", torch::CppFunction::makeFallthrough());
}
