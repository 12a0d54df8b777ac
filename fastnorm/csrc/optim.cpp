// The optimizer updates as ops of torch's dispatcher: torch.ops.fastnorm.<name>_ for every
// optimizer kernels/fastnorm_kernels/formulas/optim.py describes (sgd_, adagrad_, rmsprop_, adam_,
// ...), one fused multi-tensor update of a parameter group (modelled on torch's _fused_adam_).
//
// Book: "Deep Learning from Scratch", section 6.1. Nothing in this file is per optimizer:
// fastnorm/_ops.py hands each description over when the extension loads (define_optimizer): the
// op's schema (Optimizer.schema), its shape (buffer lists, step counters, first-step flags) and
// two compiled functions from kernels/fastnorm_kernels/numba_cpu/optim.py: the packer that turns
// the op's options into the kernels' constants, flags, buffer uses and step-scalar inputs
// (Optimizer.pack), and the step scalars the CUDA launches compute on the host. One boxed kernel
// per dispatch key reads any such op's arguments from the stack.
//
// Algorithm: the tensors of the call are (5, T) addresses (param, grad, up to three state buffers;
// an absent buffer row repeats the gradient row, never touched) and a chunk table cutting every
// tensor into CHUNK-element pieces, so that one parallel loop balances threads across tensors of
// any size. Every element's update reads and writes each buffer once. The kernels' serial
// prologue advances torch's step counters (state["step"], CPU scalar tensors) and computes each
// tensor's step-dependent scalars in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <mutex>
#include <vector>

#include "fastnorm.h"
#include "optim.h"

namespace fastnorm {
namespace {

// void step(addrs, T, chunks, K, steps, step_f64, advance, host0, host1, host2, scalars, constants,
//           flag_bits, use_bits, seed): kernels/fastnorm_kernels/numba_cpu/optim.py, c_entry_point
using Step = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double, double, int64_t,
                      int64_t, int64_t, int64_t, int64_t);

std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

// Checks every list against the parameters (torch's fused ops raise RuntimeError too), then one
// kernel call (CPU) or the GPU launches (optim_cuda.cpp). buffers: the three rows (an empty list
// where a row does not exist); steps: one scalar per tensor (none where the optimizer counts no
// steps; first_step flags then mark buffers new this step), CPU tensors on either device (torch's
// without capturable=True).
void run(const Update& u, TensorList params, TensorList grads, const std::array<std::vector<Tensor>, 3>& buffers,
         TensorList steps, const c10::List<bool>& first_step, std::optional<int64_t> seed) {
  const int64_t t = static_cast<int64_t>(params.size());
  if (t == 0) return;
  const Spec& spec = *u.spec;
  const std::string& name = spec.op;
  const bool counts = spec.counts_steps;
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == t, "fastnorm::", name, ": ", t, " params but ", grads.size(),
              " grads");
  for (int r = 0; r < 3; ++r) {
    TORCH_CHECK(!u.uses[r] || static_cast<int64_t>(buffers[r].size()) == t, "fastnorm::", name, ": ", t,
                " params but ", buffers[r].size(), " tensors of state row ", r);
  }
  if (!counts) {
    TORCH_CHECK(spec.clone_first < 0 || !u.uses[spec.clone_first] || static_cast<int64_t>(first_step.size()) == t,
                "fastnorm::", name, ": ", t, " params but ", first_step.size(), " first_step flags");
  } else {
    TORCH_CHECK(static_cast<int64_t>(steps.size()) == t, "fastnorm::", name, ": ", t, " params but ", steps.size(),
                " state_steps");
  }
  const auto dtype = params[0].scalar_type();
  int storage = storage_of(dtype);
  TORCH_CHECK_NOT_IMPLEMENTED(storage >= 0, "fastnorm::", name, " updates float32, float64, bfloat16 or float16 "
                              "parameters, got ", dtype_name(dtype));
  if (seed.has_value()) {
    TORCH_CHECK_VALUE(dtype == at::kBFloat16, "fastnorm::", name, ": stochastic rounding (rounding_seed) applies to "
                      "bfloat16 parameters, got ", dtype_name(dtype));
    storage = kBFloat16SR;
  }
  // Every tensor is updated elementwise over its memory as it lies: dense (contiguous, or any other
  // non-overlapping dense layout such as channels-last), with its parameter's strides.
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cpu() || u.on_cuda, "fastnorm::", name, ": CPU tensors expected, got ", device);
  TORCH_CHECK(device.is_cuda() || !u.on_cuda || cuda::hooked(), "fastnorm::", name, ": CUDA tensors expected, got ",
              device);
  auto check = [&](const Tensor& x, const Tensor& p, const char* what) {
    TORCH_CHECK(x.defined() && x.layout() == at::kStrided && x.device() == device && x.scalar_type() == dtype &&
                    x.sizes() == p.sizes() && x.is_non_overlapping_and_dense() &&
                    (x.is_contiguous() ? p.is_contiguous() : x.strides() == p.strides()),
                "fastnorm::", name, ": every ", what, " must be a dense (contiguous) ",
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
    if (counts) {
      const Tensor& s = steps[i];
      if (i == 0) step_f64 = s.scalar_type() == at::kDouble;
      TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 && s.scalar_type() == (step_f64 ? at::kDouble : at::kFloat),
                  "fastnorm::", name, ": state_steps must be one-element float32 (or all float64) CPU tensors");
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
  if (counts) {
    for (int64_t i = 0; i < t; ++i) step_addrs[i] = address(steps[i]);
  }
  if (u.on_cuda) {
    std::vector<int64_t> numels(t);
    for (int64_t i = 0; i < t; ++i) numels[i] = params[i].numel();
    std::vector<bool> fresh(t, false);
    const bool cloned = spec.clone_first >= 0 && u.uses[spec.clone_first];
    for (int64_t i = 0; i < static_cast<int64_t>(first_step.size()) && cloned; ++i) fresh[i] = first_step.get(i);
    step_cuda(u, storage, params[0], addrs, numels, step_addrs, step_f64, fresh,
              seed.has_value() ? (*seed & 0xFFFFFFFF) : 0);
    return;
  }
  // per-tensor scalars (filled from the steps; SGD: the first-step flags) and the constants, in
  // the compute dtype: float64 for float64 storage, else float32
  auto launch = [&](auto like) {
    using T = decltype(like);
    std::vector<T> scalars(2 * t, T(0));
    if (!counts) {
      for (int64_t i = 0; i < static_cast<int64_t>(first_step.size()); ++i) scalars[2 * i] = first_step.get(i) ? T(1) : T(0);
    }
    std::vector<T> constants(u.constants.begin(), u.constants.end());
    auto& slot = const_cast<Spec&>(spec).entries[storage];
    void* fn = slot.load(std::memory_order_acquire);
    if (fn == nullptr) {
      fn = resolve_entry(spec.name, storage);  // compiles or loads the cfunc (once per process)
      slot.store(fn, std::memory_order_release);
    }
    int64_t flag_bits = 0, use_bits = 0;
    for (int i = 0; i < spec.flags; ++i) flag_bits |= int64_t(u.flags[i]) << i;
    for (int i = 0; i < 3; ++i) use_bits |= int64_t(u.uses[i]) << i;
    auto kernel = reinterpret_cast<Step>(fn);
    without_gil([&] {
      follow_torch_threads();
      kernel(reinterpret_cast<int64_t>(addrs.data()), t, reinterpret_cast<int64_t>(chunks.data()), k,
             counts ? reinterpret_cast<int64_t>(step_addrs.data()) : 0, step_f64, counts, u.host[0], u.host[1],
             u.host[2], reinterpret_cast<int64_t>(scalars.data()), reinterpret_cast<int64_t>(constants.data()),
             flag_bits, use_bits, seed.has_value() ? (*seed & 0xFFFFFFFF) : 0);
    });
  };
  if (dtype == at::kDouble) {
    launch(double(0));
  } else {
    launch(float(0));
  }
}

// -- one boxed kernel per dispatch key, for every optimizer's op ---------------------------------

// "fastnorm::adam_" -> its description (never freed). Written only by define_optimizer, which
// fastnorm/_ops.py calls while the extension loads, each entry before its op exists: calls of an
// op read its entry without a lock.
std::mutex specs_mutex;
auto* specs = new std::map<std::string, Spec*>();

const Spec& spec_of(const c10::OperatorHandle& op) {
  thread_local const c10::FunctionSchema* last_schema = nullptr;  // the op called last on this thread
  thread_local const Spec* last_spec = nullptr;
  const c10::FunctionSchema& schema = op.schema();
  if (&schema == last_schema) return *last_spec;
  auto found = specs->find(schema.name());
  TORCH_CHECK(found != specs->end(), schema.name(), ": no optimizer description registered for this op");
  last_schema = &schema;
  last_spec = found->second;
  return *last_spec;
}

// CPU and CUDA: the op's arguments in schema order (params, grads, buffer lists, [state_steps],
// options, [first_step], rounding_seed), packed by the description's packer, then run().
template <bool OnCuda>
void step_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const Spec& spec = spec_of(op);
  const size_t n = op.schema().arguments().size();
  auto args = torch::jit::last(*stack, n);
  size_t a = 0;
  std::vector<Tensor> params = args[a++].toTensorVector();
  std::vector<Tensor> grads = args[a++].toTensorVector();
  std::array<std::vector<Tensor>, 3> buffers;
  for (int i = 0; i < spec.buffers; ++i) buffers[i] = args[a++].toTensorVector();
  std::vector<Tensor> steps;
  if (spec.counts_steps) steps = args[a++].toTensorVector();
  std::array<double, kMaxPacked> options{};
  for (int i = 0; i < spec.options; ++i, ++a) {
    options[i] = args[a].isBool() ? (args[a].toBool() ? 1.0 : 0.0) : args[a].toDouble();
  }
  c10::List<bool> first_step;
  if (spec.clone_first >= 0) first_step = args[a++].toBoolList();
  std::optional<int64_t> seed;
  if (!args[a].isNone()) seed = args[a].toInt();
  torch::jit::drop(*stack, n);

  Update u;
  u.spec = &spec;
  u.on_cuda = OnCuda;
  std::array<double, kMaxPacked> packed{};
  auto pack = spec.pack.load(std::memory_order_acquire);
  if (pack == nullptr) {  // compiled or loaded once per process ("pack:<name>": fastnorm/_ops.py)
    pack = reinterpret_cast<void (*)(int64_t, int64_t)>(resolve_entry("pack:" + spec.name, 0));
    const_cast<Spec&>(spec).pack.store(pack, std::memory_order_release);
  }
  pack(reinterpret_cast<int64_t>(options.data()), reinterpret_cast<int64_t>(packed.data()));
  u.constants.assign(packed.begin(), packed.begin() + spec.constants);
  for (int i = 0; i < spec.flags; ++i) u.flags[i] = packed[spec.constants + i] != 0.0;
  for (int i = 0; i < 3; ++i) u.uses[i] = packed[spec.constants + spec.flags + i] != 0.0;
  for (int i = 0; i < 3; ++i) u.host[i] = packed[spec.constants + spec.flags + 3 + i];
  run(u, params, grads, buffers, steps, first_step, seed);
}

// Meta: the updates are in place and return nothing: shapes need no work.
void meta_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  torch::jit::drop(*stack, op.schema().arguments().size());
}

// ADInplaceOrView: the version counters of everything the update writes (the schema's (x!)
// lists) move, as torch's own fused updates move them (an autograd graph that saved a parameter
// raises torch's in-place error)
void view_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const Spec& spec = spec_of(op);
  auto args = torch::jit::last(*stack, op.schema().arguments().size());
  // the written lists: params, the buffer lists and the step counters (arguments 0, 2, 3, ...)
  std::array<c10::List<Tensor>, 5> written;
  const int n = 1 + spec.buffers + (spec.counts_steps ? 1 : 0);
  for (int i = 0; i < n; ++i) written[i] = args[i == 0 ? 0 : i + 1].toTensorList();
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  for (int i = 0; i < n; ++i) {
    for (const Tensor& t : written[i]) {
      if (t.defined()) torch::autograd::increment_version(t);
    }
  }
}

torch::Library& library(c10::DispatchKey key) {  // one per key, kept for the process
  static std::map<c10::DispatchKey, torch::Library*> made;
  auto& lib = made[key];
  if (lib == nullptr) lib = new torch::Library(torch::Library::IMPL, "fastnorm", key, __FILE__, __LINE__);
  return *lib;
}

}  // namespace

// fastnorm/_ops.py, once per description when the extension loads: defines fastnorm::<name>_ with
// `schema` and registers the boxed kernels above for it.
void define_optimizer(const std::string& name, const std::string& schema, int buffers, bool counts_steps,
                      int clone_first, int options, int constants, int flags, const std::string& cuda_signature) {
  const std::string op = "fastnorm::" + name + "_";
  {
    std::lock_guard<std::mutex> lock(specs_mutex);
    if (specs->count(op)) return;
    auto* spec = new Spec();
    TORCH_CHECK(options <= kMaxPacked && constants + flags + 6 <= kMaxPacked && flags <= kMaxFlags, "fastnorm: ",
                name, ": too many options, constants or flags for the optimizer ops");
    spec->name = name;
    spec->op = name + "_";
    spec->buffers = buffers;
    spec->counts_steps = counts_steps;
    spec->clone_first = clone_first;
    spec->options = options;
    spec->constants = constants;
    spec->flags = flags;
    spec->cuda_kernel = cuda::add_kernel("optim", "_" + name + "{storage}", cuda_signature);
    (*specs)[op] = spec;
  }
  static auto* definitions = new torch::Library(torch::Library::FRAGMENT, "fastnorm", std::nullopt, __FILE__, __LINE__);
  definitions->def(schema.c_str());
  const std::string unqualified = name + "_";
  library(c10::DispatchKey::CPU).impl(unqualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&step_boxed<false>>());
  // CUDA: the same checks, then optim_cuda.cpp's launches of kernels/fastnorm_kernels/numba_cuda/optim.py's kernels
  library(c10::DispatchKey::CUDA).impl(unqualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&step_boxed<true>>());
  library(c10::DispatchKey::Meta).impl(unqualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&meta_boxed>());
  library(c10::DispatchKey::ADInplaceOrView)
      .impl(unqualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&view_boxed>());
  // The updates are not differentiable (torch's optimizers run them under no_grad): autograd passes them through.
  library(c10::DispatchKey::Autograd).impl(unqualified.c_str(), torch::CppFunction::makeFallthrough());
}

}  // namespace fastnorm
