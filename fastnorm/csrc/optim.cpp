// The optimizer updates as ops of torch's dispatcher: torch.ops.fastnorm.{sgd_, adagrad_, rmsprop_,
// adam_}, one fused multi-tensor update of a parameter group (modelled on torch's _fused_adam_).
//
// Book: "Deep Learning from Scratch", section 6.1. The per-element math is
// kernels/fastnorm_kernels/formulas/optim.py, compiled into the numba kernels (kernels/fastnorm_kernels/numba_cpu/optim.py) whose C
// entry points this file calls. Scalars are computed here once per call, on the host, as
// kernels/fastnorm_kernels/_optimizer_api.py computes them: the constants in the compute dtype (float32 for 16-bit
// storage), the step-dependent bias corrections in float64 by the kernels' serial prologue, which
// also advances torch's step counters (state["step"], CPU scalar tensors).
//
// Algorithm: the tensors of the call are (5, T) addresses (param, grad, up to three state buffers;
// an absent buffer row repeats the gradient row, never touched) and a chunk table cutting every
// tensor into CHUNK-element pieces, so that one parallel loop balances threads across tensors of
// any size. Every element's update reads and writes each buffer once.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "fastnorm.h"
#include "optim.h"

namespace fastnorm {
namespace {

// void step(addrs, T, chunks, K, steps, step_f64, advance, host0, host1, host2, scalars, constants,
//           flag0, flag1, use0, use1, use2, seed): kernels/fastnorm_kernels/numba_cpu/optim.py, c_entry_point
using Step = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double, double, int64_t,
                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

// Checks every list against the parameters (torch's fused ops raise RuntimeError too), then one
// kernel call (CPU) or the GPU launches (optim_cuda.cpp). buffers: the three rows (an empty list
// where a row does not exist); steps: one scalar per tensor (empty for SGD, whose first_step
// flags mark new momentum buffers), CPU tensors on either device (torch's without capturable=True).
void run(const Update& u, TensorList params, TensorList grads, const std::array<TensorList, 3>& buffers,
         TensorList steps, const c10::List<bool>& first_step, std::optional<int64_t> seed) {
  const int64_t t = static_cast<int64_t>(params.size());
  if (t == 0) return;
  const bool sgd = u.family == Entry::kSgd;
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == t, "fastnorm::", u.name, ": ", t, " params but ", grads.size(),
              " grads");
  for (int r = 0; r < 3; ++r) {
    TORCH_CHECK(!u.uses[r] || static_cast<int64_t>(buffers[r].size()) == t, "fastnorm::", u.name, ": ", t,
                " params but ", buffers[r].size(), " tensors of state row ", r);
  }
  if (sgd) {
    TORCH_CHECK(!u.uses[0] || static_cast<int64_t>(first_step.size()) == t, "fastnorm::", u.name, ": ", t,
                " params but ", first_step.size(), " first_step flags");
  } else {
    TORCH_CHECK(static_cast<int64_t>(steps.size()) == t, "fastnorm::", u.name, ": ", t, " params but ", steps.size(),
                " state_steps");
  }
  const auto dtype = params[0].scalar_type();
  int storage = storage_of(dtype);
  TORCH_CHECK_NOT_IMPLEMENTED(storage >= 0, "fastnorm::", u.name, " updates float32, float64, bfloat16 or float16 "
                              "parameters, got ", dtype_name(dtype));
  if (seed.has_value()) {
    TORCH_CHECK_VALUE(dtype == at::kBFloat16, "fastnorm::", u.name, ": stochastic rounding (rounding_seed) applies to "
                      "bfloat16 parameters, got ", dtype_name(dtype));
    storage = kBFloat16SR;
  }
  // Every tensor is updated elementwise over its memory as it lies: dense (contiguous, or any other
  // non-overlapping dense layout such as channels-last), with its parameter's strides.
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu() || u.on_cuda, "fastnorm::", u.name, ": CPU tensors expected, got ", device);
  TORCH_CHECK(device.is_cuda() || !u.on_cuda || cuda::hooked(), "fastnorm::", u.name, ": CUDA tensors expected, got ",
              device);
  auto check = [&](const Tensor& x, const Tensor& p, const char* what) {
    TORCH_CHECK(x.defined() && x.layout() == at::kStrided && x.device() == device && x.scalar_type() == dtype &&
                    x.sizes() == p.sizes() && x.is_non_overlapping_and_dense() &&
                    (x.is_contiguous() ? p.is_contiguous() : x.strides() == p.strides()),
                "fastnorm::", u.name, ": every ", what, " must be a dense (contiguous) ",
                device.is_cpu() ? std::string("CPU tensor") : "tensor on " + device.str(),
                " of its parameter's dtype, shape and strides (", dtype_name(dtype), ", ", p.sizes(), ")");
  };
  bool step_f64 = false;
  for (int64_t i = 0; i < t; ++i) {
    const Tensor& p = params[i];
    check(p, p, "parameter");
    check(grads[i], p, "gradient");
    for (int r = 0; r < 3; ++r) {
      if (u.uses[r]) check(buffers[r][i], p, "state buffer");
    }
    if (!sgd) {
      const Tensor& s = steps[i];
      if (i == 0) step_f64 = s.scalar_type() == at::kDouble;
      TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 && s.scalar_type() == (step_f64 ? at::kDouble : at::kFloat),
                  "fastnorm::", u.name, ": state_steps must be one-element float32 (or all float64) CPU tensors");
    }
  }
  // the address table: rows param, grad, three buffers (an unused row repeats the gradient row)
  std::vector<int64_t> addrs(5 * t);
  const int64_t chunk = tunables().optimizer_chunk;
  int64_t k = 0;
  for (int64_t i = 0; i < t; ++i) {
    addrs[i] = address(params[i]);
    addrs[t + i] = address(grads[i]);
    for (int r = 0; r < 3; ++r) addrs[(2 + r) * t + i] = u.uses[r] ? address(buffers[r][i]) : addrs[t + i];
    k += (params[i].numel() + chunk - 1) / chunk;
  }
  std::vector<int64_t> chunks(3 * std::max<int64_t>(k, 1));  // (tensor, start, stop) rows
  for (int64_t i = 0, row = 0; i < t; ++i) {
    const int64_t n = params[i].numel();
    for (int64_t lo = 0; lo < n; lo += chunk, ++row) {
      chunks[3 * row] = i;
      chunks[3 * row + 1] = lo;
      chunks[3 * row + 2] = std::min(n, lo + chunk);
    }
  }
  std::vector<int64_t> step_addrs(t, 0);
  if (!sgd) {
    for (int64_t i = 0; i < t; ++i) step_addrs[i] = address(steps[i]);
  }
  if (u.on_cuda) {
    std::vector<int64_t> numels(t);
    for (int64_t i = 0; i < t; ++i) numels[i] = params[i].numel();
    std::vector<bool> fresh(t, false);
    for (int64_t i = 0; i < static_cast<int64_t>(first_step.size()) && u.uses[0]; ++i) fresh[i] = first_step.get(i);
    step_cuda(u, storage, params[0], addrs, numels, step_addrs, step_f64, fresh,
              seed.has_value() ? (*seed & 0xFFFFFFFF) : 0);
    return;
  }
  // per-tensor scalars (filled from the steps; SGD: the first-step flags) and the constants, in
  // the compute dtype: float64 for float64 storage, else float32
  auto launch = [&](auto like) {
    using T = decltype(like);
    std::vector<T> scalars(2 * t, T(0));
    if (sgd) {
      for (int64_t i = 0; i < static_cast<int64_t>(first_step.size()); ++i) scalars[2 * i] = first_step.get(i) ? T(1) : T(0);
    }
    std::vector<T> constants(u.constants.begin(), u.constants.end());
    auto kernel = reinterpret_cast<Step>(entry(u.family, storage));
    without_gil([&] {
      follow_torch_threads();
      kernel(reinterpret_cast<int64_t>(addrs.data()), t, reinterpret_cast<int64_t>(chunks.data()), k,
             sgd ? 0 : reinterpret_cast<int64_t>(step_addrs.data()), step_f64, !sgd, u.host[0], u.host[1], u.host[2],
             reinterpret_cast<int64_t>(scalars.data()), reinterpret_cast<int64_t>(constants.data()), u.flags[0],
             u.flags[1], u.uses[0], u.uses[1], u.uses[2], seed.has_value() ? (*seed & 0xFFFFFFFF) : 0);
    });
  };
  if (dtype == at::kDouble) {
    launch(double(0));
  } else {
    launch(float(0));
  }
}

double sign(bool maximize) { return maximize ? -1.0 : 1.0; }

template <bool OnCuda>
void sgd_(TensorList params, TensorList grads, TensorList momentum_buffers, double lr, double weight_decay,
          double momentum, double dampening, bool nesterov, bool maximize, const c10::List<bool>& first_step,
          std::optional<int64_t> rounding_seed) {
  Update u{Entry::kSgd, "sgd_", OnCuda};
  u.constants = {sign(maximize), lr, weight_decay, momentum, 1.0 - dampening};
  u.flags = {weight_decay != 0.0, nesterov};
  u.uses = {momentum != 0.0, false, false};
  run(u, params, grads, {momentum_buffers, {}, {}}, {}, first_step, rounding_seed);
}

template <bool OnCuda>
void adagrad_(TensorList params, TensorList grads, TensorList state_sums, TensorList state_steps, double lr,
              double lr_decay, double weight_decay, double eps, bool maximize, std::optional<int64_t> rounding_seed) {
  Update u{Entry::kAdagrad, "adagrad_", OnCuda};
  u.host = {lr, lr_decay, 0.0};
  u.constants = {sign(maximize), weight_decay, eps};
  u.flags = {weight_decay != 0.0, false};
  u.uses = {true, false, false};
  run(u, params, grads, {state_sums, {}, {}}, state_steps, c10::List<bool>(), rounding_seed);
}

template <bool OnCuda>
void rmsprop_(TensorList params, TensorList grads, TensorList square_avgs, TensorList grad_avgs,
              TensorList momentum_buffers, TensorList state_steps, double lr, double alpha, double eps,
              double weight_decay, double momentum, bool centered, bool maximize,
              std::optional<int64_t> rounding_seed) {
  Update u{Entry::kRmsprop, "rmsprop_", OnCuda};
  u.constants = {sign(maximize), weight_decay, alpha, 1.0 - alpha, eps, lr, momentum};
  u.flags = {weight_decay != 0.0, 1.0 - alpha < 0.5};
  u.uses = {true, centered, momentum > 0.0};
  run(u, params, grads, {square_avgs, grad_avgs, momentum_buffers}, state_steps, c10::List<bool>(), rounding_seed);
}

template <bool OnCuda>
void adam_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
           TensorList max_exp_avg_sqs, TensorList state_steps, double lr, double beta1, double beta2,
           double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
           std::optional<int64_t> rounding_seed) {
  Update u{Entry::kAdam, "adam_", OnCuda};
  u.host = {lr, beta1, beta2};
  const double decay = decoupled_weight_decay ? 1.0 - lr * weight_decay : 1.0;
  u.constants = {sign(maximize), decay, weight_decay, 1.0 - beta1, beta1, beta2, 1.0 - beta2, eps};
  u.flags = {weight_decay != 0.0 && !decoupled_weight_decay, 1.0 - beta1 < 0.5};
  u.uses = {true, true, amsgrad};
  run(u, params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, state_steps, c10::List<bool>(), rounding_seed);
}

// Meta: the updates are in place and return nothing: shapes need no work.
void sgd_meta(TensorList, TensorList, TensorList, double, double, double, double, bool, bool, const c10::List<bool>&,
              std::optional<int64_t>) {}
void adagrad_meta(TensorList, TensorList, TensorList, TensorList, double, double, double, double, bool,
                  std::optional<int64_t>) {}
void rmsprop_meta(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, double, double, double,
                  double, double, bool, bool, std::optional<int64_t>) {}
void adam_meta(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, double, double, double, double,
               double, bool, bool, bool, std::optional<int64_t>) {}

// ADInplaceOrView: the version counters of everything the update writes move, as torch's own
// fused updates move them (an autograd graph that saved a parameter raises torch's in-place error)
void bump(std::initializer_list<TensorList> lists) {
  for (const auto& list : lists) {
    for (const auto& t : list) {
      if (t.defined()) torch::autograd::increment_version(t);
    }
  }
}

void sgd_view(c10::DispatchKeySet ks, TensorList params, TensorList grads, TensorList momentum_buffers, double lr,
              double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
              const c10::List<bool>& first_step, std::optional<int64_t> rounding_seed) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::sgd_", "").typed<decltype(sgd_<false>)>();
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, momentum_buffers, lr, weight_decay, momentum,
                dampening, nesterov, maximize, first_step, rounding_seed);
  bump({params, momentum_buffers});
}

void adagrad_view(c10::DispatchKeySet ks, TensorList params, TensorList grads, TensorList state_sums,
                  TensorList state_steps, double lr, double lr_decay, double weight_decay, double eps, bool maximize,
                  std::optional<int64_t> rounding_seed) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::adagrad_", "").typed<decltype(adagrad_<false>)>();
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, state_sums, state_steps, lr, lr_decay,
                weight_decay, eps, maximize, rounding_seed);
  bump({params, state_sums, state_steps});
}

void rmsprop_view(c10::DispatchKeySet ks, TensorList params, TensorList grads, TensorList square_avgs,
                  TensorList grad_avgs, TensorList momentum_buffers, TensorList state_steps, double lr, double alpha,
                  double eps, double weight_decay, double momentum, bool centered, bool maximize,
                  std::optional<int64_t> rounding_seed) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::rmsprop_", "").typed<decltype(rmsprop_<false>)>();
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, square_avgs, grad_avgs, momentum_buffers,
                state_steps, lr, alpha, eps, weight_decay, momentum, centered, maximize, rounding_seed);
  bump({params, square_avgs, grad_avgs, momentum_buffers, state_steps});
}

void adam_view(c10::DispatchKeySet ks, TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList state_steps, double lr, double beta1,
               double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, std::optional<int64_t> rounding_seed) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::adam_", "").typed<decltype(adam_<false>)>();
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                state_steps, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
                rounding_seed);
  bump({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps});
}

}  // namespace
}  // namespace fastnorm

TORCH_LIBRARY_FRAGMENT(fastnorm, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, float lr, float weight_decay, "
      "float momentum, float dampening, bool nesterov, bool maximize, bool[] first_step, int? rounding_seed=None) "
      "-> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] state_steps, *, float lr, "
      "float lr_decay, float weight_decay, float eps, bool maximize, int? rounding_seed=None) -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
      "Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, *, float lr, float alpha, float eps, "
      "float weight_decay, float momentum, bool centered, bool maximize, int? rounding_seed=None) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay=False, "
      "int? rounding_seed=None) -> ()");
}

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("sgd_", &fastnorm::sgd_<false>);
  m.impl("adagrad_", &fastnorm::adagrad_<false>);
  m.impl("rmsprop_", &fastnorm::rmsprop_<false>);
  m.impl("adam_", &fastnorm::adam_<false>);
}

// CUDA: the same checks, then optim_cuda.cpp's launches of kernels/fastnorm_kernels/numba_cuda/optim.py's kernels
TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("sgd_", &fastnorm::sgd_<true>);
  m.impl("adagrad_", &fastnorm::adagrad_<true>);
  m.impl("rmsprop_", &fastnorm::rmsprop_<true>);
  m.impl("adam_", &fastnorm::adam_<true>);
}

TORCH_LIBRARY_IMPL(fastnorm, Meta, m) {
  m.impl("sgd_", &fastnorm::sgd_meta);
  m.impl("adagrad_", &fastnorm::adagrad_meta);
  m.impl("rmsprop_", &fastnorm::rmsprop_meta);
  m.impl("adam_", &fastnorm::adam_meta);
}

TORCH_LIBRARY_IMPL(fastnorm, ADInplaceOrView, m) {
  m.impl("sgd_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(fastnorm::sgd_view)));
  m.impl("adagrad_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(fastnorm::adagrad_view)));
  m.impl("rmsprop_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(fastnorm::rmsprop_view)));
  m.impl("adam_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(fastnorm::adam_view)));
}

// The updates are not differentiable (torch's optimizers run them under no_grad): autograd passes
// them through.
TORCH_LIBRARY_IMPL(fastnorm, Autograd, m) {
  m.impl("sgd_", torch::CppFunction::makeFallthrough());
  m.impl("adagrad_", torch::CppFunction::makeFallthrough());
  m.impl("rmsprop_", torch::CppFunction::makeFallthrough());
  m.impl("adam_", torch::CppFunction::makeFallthrough());
}
