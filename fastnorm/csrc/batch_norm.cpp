// Batch Normalization (training) as a C++ autograd node around fastnorm's Numba CPU kernels.
//
// Book: "Deep Learning from Scratch", section 6.3. The math is the kernels' (kernels/numba_cpu/
// batchnorm.py); this file only moves tensors: it allocates the outputs, calls the kernels' C
// entry points (Numba cfuncs, kernels.numba_cpu.batchnorm.c_entry_points) on the tensors'
// addresses, and records an autograd node whose backward is C++ too.
//
// Why: after a large kernel has streamed the caches, every distinct Python operation around it
// costs tens of microseconds (bench/results/bn_profile.md); a Python torch.autograd.Function and
// the engine's calls into it were ~0.3 ms of a training step's BatchNorm. Here the forward is one
// call from Python and the backward none.
//
// Semantics are those of fastnorm._address_autograd.AddressBatchNormFunction (which serves the
// same kernels where this extension cannot be built): input, weight and running statistics saved
// for backward (torch's error on an in-place change), gradients with the input's strides, and a
// backward with create_graph=True computed by differentiable torch operations (a Python callback).
#include <torch/extension.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The C entry points (argument lists documented in kernels/numba_cpu/batchnorm.py).
using ForwardTrain = void (*)(int64_t dtype, int64_t x, int64_t weight, int64_t bias, int64_t running_mean,
                              int64_t running_var, int64_t y, int64_t save_mean, int64_t save_invstd, int64_t n,
                              int64_t c, int64_t s, double momentum, double eps, int64_t parallel,
                              int64_t rows_per_chunk, int64_t block);
using ForwardEval = void (*)(int64_t dtype, int64_t x, int64_t weight, int64_t bias, int64_t running_mean,
                             int64_t running_var, int64_t y, int64_t n, int64_t c, int64_t s, double eps,
                             int64_t parallel, int64_t rows_per_chunk);
using Backward = void (*)(int64_t dtype, int64_t dy, int64_t x, int64_t mean, int64_t invstd, int64_t weight,
                          int64_t training, int64_t dx, int64_t dweight, int64_t dbias, int64_t n, int64_t c,
                          int64_t s, int64_t parallel, int64_t rows_per_chunk, int64_t block);
using SetThreads = void (*)(int);  // Numba's threading layer: the calling thread's thread count

struct Config {
  ForwardTrain forward_train = nullptr;
  ForwardEval forward_eval = nullptr;
  Backward backward = nullptr;
  SetThreads set_threads = nullptr;
  int64_t max_threads = 1;              // Numba's pool size
  py::object* differentiable = nullptr;  // fastnorm.autograd._differentiable_backward (never freed)
};
Config config;

// A caching allocator for large outputs (fastnorm._arrays.BufferPool's policy, in C++): torch's
// CPU allocator gives large blocks back to the OS, so every fresh output of megabytes is paid
// again in page faults. Blocks of at least min_bytes are kept, up to max_bytes in all, keyed by
// their exact size; a block is free again when the last tensor viewing it dies.
class Pool {
 public:
  void configure(size_t min_bytes, size_t max_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    min_bytes_ = min_bytes;
    max_bytes_ = max_bytes;
  }

  // A block of nbytes, or nullptr when it is not pooled (small, or over the budget).
  void* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (nbytes < min_bytes_ || max_bytes_ == 0) return nullptr;
    auto& free = free_[nbytes];
    if (!free.empty()) {
      void* block = free.back();
      free.pop_back();
      return block;
    }
    if (bytes_ + nbytes > max_bytes_) return nullptr;
    void* block = nullptr;
    // 2 MB aligned and advised as huge pages, as NumPy does for large arrays
    if (posix_memalign(&block, size_t(2) << 20, nbytes) != 0) return nullptr;
    madvise(block, nbytes, MADV_HUGEPAGE);
    bytes_ += nbytes;
    return block;
  }

  void give_back(void* block, size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_[nbytes].push_back(block);
  }

  size_t in_use() {
    std::lock_guard<std::mutex> lock(mutex_);
    return bytes_ - free_bytes();
  }

  void clear() {  // forget the free blocks (those in use come back when their tensors die)
    std::lock_guard<std::mutex> lock(mutex_);
    bytes_ -= free_bytes();
    for (auto& [nbytes, blocks] : free_) {
      for (void* block : blocks) std::free(block);
    }
    free_.clear();
  }

 private:
  size_t free_bytes() const {
    size_t total = 0;
    for (const auto& [nbytes, blocks] : free_) total += nbytes * blocks.size();
    return total;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t bytes_ = 0;  // owned by the pool: free and handed out
  size_t min_bytes_ = size_t(1) << 20;
  size_t max_bytes_ = size_t(1) << 30;
};
Pool* pool = new Pool();  // never freed: tensors from it may outlive this library's statics

// An uninitialised tensor shaped as x with the given strides (x is dense in them), from the pool.
at::Tensor output(const at::Tensor& x, at::IntArrayRef strides) {
  size_t nbytes = x.numel() * x.element_size();
  void* block = pool->take(nbytes);
  if (block == nullptr) return at::empty_strided(x.sizes(), strides, x.options());
  return torch::from_blob(block, x.sizes(), strides, [nbytes](void* p) { pool->give_back(p, nbytes); },
                          x.options());
}

int64_t dtype_code(at::ScalarType t) {  // kernels.numba_cpu.batchnorm.C_DTYPE_CODES
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: TORCH_CHECK(false, "fastnorm's C++ BatchNorm: unsupported dtype ", t);
  }
}

int64_t address(const at::Tensor& t) { return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0; }

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// y's strides: its layout's own (torch's outputs have them; they differ from x's at size-1 dims)
std::vector<int64_t> canonical_strides(const at::Tensor& x, bool channels_last) {
  if (channels_last) {
    return x.dim() == 5 ? c10::get_channels_last_strides_3d(x.sizes()) : c10::get_channels_last_strides_2d(x.sizes());
  }
  const auto strides = c10::contiguous_strides(x.sizes());
  return std::vector<int64_t>(strides.begin(), strides.end());
}

at::MemoryFormat layout_of(const at::Tensor& x, bool channels_last) {
  if (!channels_last) return at::MemoryFormat::Contiguous;
  return x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// The forward kernels into a new y: (y, stats), stats the (2, C) mean and invstd that normalised x
// (training; undefined in eval). Running statistics are updated in training where given.
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                               const at::Tensor& running_mean, const at::Tensor& running_var,
                                               bool training, double momentum, double eps, bool channels_last,
                                               int64_t n, int64_t c, int64_t s, bool parallel, int64_t rows_per_chunk,
                                               int64_t block) {
  at::Tensor y = output(x, canonical_strides(x, channels_last));
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = training ? at::empty({2, c}, x.options().dtype(compute)) : at::Tensor();
  // the kernels read (C,) vectors with unit stride: strided ones through dense copies
  at::Tensor w = weight.defined() ? weight.contiguous() : weight;
  at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor mean_in = running_mean.defined() ? running_mean.contiguous() : running_mean;
  at::Tensor var_in = running_var.defined() ? running_var.contiguous() : running_var;
  const int64_t dtype = dtype_code(x.scalar_type());
  {
    py::gil_scoped_release no_gil;
    if (training) {
      const int64_t mean = address(stats);
      config.forward_train(dtype, address(x), address(w), address(b), address(mean_in), address(var_in), address(y),
                           mean, mean + c * stats.element_size(), n, c, s, momentum, eps, parallel, rows_per_chunk,
                           block);
    } else {
      config.forward_eval(dtype, address(x), address(w), address(b), address(mean_in), address(var_in), address(y), n,
                          c, s, eps, parallel, rows_per_chunk);
    }
  }
  if (training) {
    // strided running statistics: written back without a version bump, as the kernels' own
    // writes (torch's BatchNorm does not bump them either: a second forward before the
    // backward must not raise the in-place error for the first one's saved tensors)
    at::AutoDispatchBelowADInplaceOrView no_version_bump;
    if (mean_in.defined() && !mean_in.is_same(running_mean)) running_mean.copy_(mean_in);
    if (var_in.defined() && !var_in.is_same(running_var)) running_var.copy_(var_in);
  }
  return {y, stats};
}

// saved_data keys
constexpr const char* kStats = "stats";    // (2, C): the mean and invstd that normalised x
constexpr const char* kLaunch = "launch";  // channels_last, n, c, s, parallel, rows_per_chunk, block, has_bias,
                                           // the input's dtype code
constexpr const char* kEps = "eps";

}  // namespace

namespace fastnorm {

// The node's name in autograd graphs: torch::autograd::CppNode<fastnorm::BatchNormBackward>
struct BatchNormBackward : public torch::autograd::Function<BatchNormBackward> {
  // x: (N, C, *), contiguous or channels-last; weight, bias, running_*: (C,) or absent; source: the
  // caller's input when x is its dense copy, else absent.
  // n, c, s: the (N, C, S) geometry the kernels see; the rest: kernels.numba_cpu.batchnorm.plan.
  // An absent tensor (std::nullopt) is not an input of the node: it has no edge (see backward).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight_,
                            const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& running_mean_,
                            const std::optional<at::Tensor>& running_var_,
                            const std::optional<at::Tensor>& source, double momentum, double eps,
                            bool channels_last, int64_t n, int64_t c, int64_t s, bool parallel,
                            int64_t rows_per_chunk, int64_t forward_block, int64_t backward_block) {
    at::Tensor weight = value_or_undefined(weight_), bias = value_or_undefined(bias_);
    at::Tensor running_mean = value_or_undefined(running_mean_), running_var = value_or_undefined(running_var_);
    auto [y, stats] = run_forward(x, weight, bias, running_mean, running_var, /*training=*/true, momentum, eps,
                                  channels_last, n, c, s, parallel, rows_per_chunk, forward_block);
    // saved for torch's error on an in-place change before the backward, as torch's own BatchNorm
    // saves them; source (the caller's strided input, x its dense copy) for that alone
    ctx->save_for_backward({x, weight, running_mean, running_var, value_or_undefined(source)});
    ctx->saved_data[kStats] = stats;
    ctx->saved_data[kLaunch] =
        std::vector<int64_t>{channels_last, n, c, s, parallel, rows_per_chunk, backward_block, bias.defined(),
                             dtype_code(x.scalar_type())};
    ctx->saved_data[kEps] = eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();  // torch's error if any changed in place
    at::Tensor x = saved[0], weight = saved[1];
    at::Tensor stats = ctx->saved_data[kStats].toTensor();
    const auto launch = ctx->saved_data[kLaunch].toIntVector();
    const bool channels_last = launch[0];
    const int64_t n = launch[1], c = launch[2], s = launch[3], parallel = launch[4];
    // which gradients are wanted: the node's edges are its defined tensor inputs only (x, then
    // weight and bias where given, then the running statistics), its outputs one per forward input
    const bool has_weight = weight.defined(), has_bias = launch[7];
    const bool need[3] = {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
                          has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    variable_list out(16);  // one per input of forward (source gets none: its copy x passes it on)
    at::Tensor dy = grads[0];
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable backward
      py::gil_scoped_acquire gil;
      auto result = (*config.differentiable)(true, ctx->saved_data[kEps].toDouble(), dy, x, weight, stats[0],
                                             stats[1]).cast<py::tuple>();
      for (int i = 0; i < 3; ++i) {
        if (need[i]) out[i] = result[i].cast<at::Tensor>();
      }
      return out;
    }
    const auto layout = layout_of(x, channels_last);
    // a saved-tensor hook (torch.autograd.graph.saved_tensors_hooks, save_on_cpu) may give back
    // x or weight in another layout (read in the forward's), or another dtype or size (refused:
    // the kernels would read it as the forward's)
    if (!x.is_contiguous(layout)) x = x.contiguous(layout);
    TORCH_CHECK(dtype_code(x.scalar_type()) == launch[8] && x.numel() == n * c * s &&
                    (!weight.defined() || (weight.scalar_type() == stats.scalar_type() && weight.numel() == c)),
                "fastnorm's BatchNorm backward: a saved tensor came back with another dtype or size than the "
                "forward saved (a saved-tensor hook?): input ", x.scalar_type(), " ", x.sizes(), ", weight ",
                weight.defined() ? c10::toString(weight.scalar_type()) : "None");
    if (!dy.is_contiguous(layout)) dy = dy.contiguous(layout);
    at::Tensor dx, dweight, dbias;
    if (need[0]) dx = output(x, x.strides());  // torch's dx has x's strides
    if (need[1]) dweight = at::empty({c}, stats.options());
    if (need[2]) dbias = at::empty({c}, stats.options());
    at::Tensor w = weight.defined() ? weight.contiguous() : weight;  // held while the kernel reads it
    if (parallel) {  // torch.set_num_threads governs the kernels (fastnorm._dispatch.follow_torch_threads)
      config.set_threads(static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                                    config.max_threads))));
    }
    const int64_t mean = address(stats);
    config.backward(dtype_code(x.scalar_type()), address(dy), address(x), mean, mean + c * stats.element_size(),
                    address(w), /*training=*/1, address(dx), address(dweight), address(dbias), n, c, s, parallel,
                    launch[5], launch[6]);
    out[0] = dx;
    out[1] = dweight;
    out[2] = dbias;
    return out;
  }
};

}  // namespace fastnorm

namespace {

at::Tensor batch_norm_train(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& source,
                            double momentum, double eps, bool channels_last, int64_t n, int64_t c, int64_t s,
                            bool parallel, int64_t rows_per_chunk, int64_t forward_block, int64_t backward_block) {
  TORCH_CHECK(config.forward_train != nullptr, "fastnorm's C++ BatchNorm is not configured");
  return fastnorm::BatchNormBackward::apply(x, weight, bias, running_mean, running_var, source, momentum, eps,
                                            channels_last, n, c, s, parallel, rows_per_chunk, forward_block,
                                            backward_block);
}

// A forward without an autograd node (torch.no_grad, inference_mode, or nothing requires a
// gradient): training (batch statistics, running statistics updated) or eval.
at::Tensor batch_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var, bool training, double momentum,
                              double eps, bool channels_last, int64_t n, int64_t c, int64_t s, bool parallel,
                              int64_t rows_per_chunk, int64_t block) {
  TORCH_CHECK(config.forward_eval != nullptr, "fastnorm's C++ BatchNorm is not configured");
  return std::get<0>(run_forward(x, value_or_undefined(weight), value_or_undefined(bias),
                                 value_or_undefined(running_mean), value_or_undefined(running_var), training,
                                 momentum, eps, channels_last, n, c, s, parallel, rows_per_chunk, block));
}

void configure(int64_t forward_train, int64_t forward_eval, int64_t backward, int64_t set_threads,
               int64_t max_threads, py::object differentiable) {
  config.forward_train = reinterpret_cast<ForwardTrain>(forward_train);
  config.forward_eval = reinterpret_cast<ForwardEval>(forward_eval);
  config.backward = reinterpret_cast<Backward>(backward);
  config.set_threads = reinterpret_cast<SetThreads>(set_threads);
  config.max_threads = max_threads;
  config.differentiable = new py::object(std::move(differentiable));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnorm's BatchNorm training forward and backward as a C++ autograd node";
  m.def("batch_norm_train", &batch_norm_train);
  m.def("batch_norm_forward", &batch_norm_forward);
  m.def("configure", &configure);
  m.def("pool_configure", [](int64_t min_bytes, int64_t max_bytes) {
    pool->configure(static_cast<size_t>(min_bytes), static_cast<size_t>(std::max<int64_t>(0, max_bytes)));
  });
  m.def("pool_in_use", [] { return pool->in_use(); });
  m.def("pool_clear", [] { pool->clear(); });
}
