// fastnorm's C++ op layer, runtime: the kernels' entry points, the output pool, threads, and the
// Python module that configures them (fastnorm/_ops.py builds and loads this extension).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "fastnorm.h"

namespace fastnorm {
namespace {

constexpr const char* kFamilies[] = {"forward_train",      "forward_eval",      "backward",
                                     "stats",              "row_norm_forward",  "row_norm_backward",
                                     "group_norm_forward", "group_norm_backward"};
static_assert(sizeof(kFamilies) / sizeof(kFamilies[0]) == static_cast<int>(Entry::kCount));
constexpr int kStorages = 5;

std::array<std::atomic<void*>, static_cast<int>(Entry::kCount) * kStorages> entries{};
py::object* resolver = nullptr;  // fastnorm._ops._entry_point(family, storage) -> address (never freed)
using SetThreads = void (*)(int);
SetThreads set_threads = nullptr;  // Numba's threading layer: the calling thread's thread count
Tunables settings;

// A caching allocator for large outputs (blocks of at least min_bytes kept by exact size, up to
// max_bytes in all; FASTNORM_CPU_POOL_MB): torch's CPU allocator hands large blocks back to the
// OS, so every fresh output of megabytes is paid again in page faults. A block is free again when
// the last tensor viewing it dies.
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

}  // namespace

void* entry(Entry family, int storage) {
  TORCH_CHECK(storage >= 0 && storage < kStorages, "fastnorm: no kernel storage ", storage);
  auto& slot = entries[static_cast<int>(family) * kStorages + storage];
  void* fn = slot.load(std::memory_order_acquire);
  if (fn != nullptr) return fn;
  TORCH_CHECK(resolver != nullptr, "fastnorm's C++ ops are not configured (fastnorm._ops.load() configures them)");
  py::gil_scoped_acquire gil;
  fn = reinterpret_cast<void*>(
      (*resolver)(kFamilies[static_cast<int>(family)], storage).cast<int64_t>());  // compiles or loads the cfunc
  slot.store(fn, std::memory_order_release);
  return fn;
}

void* resolve_entry(const std::string& family, int storage) {
  TORCH_CHECK(storage >= 0 && storage < kStorages, "fastnorm: no kernel storage ", storage);
  TORCH_CHECK(resolver != nullptr, "fastnorm's C++ ops are not configured (fastnorm._ops.load() configures them)");
  py::gil_scoped_acquire gil;
  return reinterpret_cast<void*>((*resolver)(family, storage).cast<int64_t>());
}

int storage_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: return -1;
  }
}

void without_gil(const std::function<void()>& f) {
  if (Py_IsInitialized() && PyGILState_Check()) {
    py::gil_scoped_release no_gil;
    f();
  } else {
    f();
  }
}

void follow_torch_threads() {
  if (set_threads == nullptr) return;
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), settings.max_threads));
  set_threads(static_cast<int>(n));
}

Tunables& tunables() { return settings; }

at::MemoryFormat layout_of(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

std::vector<int64_t> canonical_strides(const at::Tensor& x, at::MemoryFormat layout) {
  if (layout == at::MemoryFormat::ChannelsLast) return c10::get_channels_last_strides_2d(x.sizes());
  if (layout == at::MemoryFormat::ChannelsLast3d) return c10::get_channels_last_strides_3d(x.sizes());
  const auto strides = c10::contiguous_strides(x.sizes());
  return std::vector<int64_t>(strides.begin(), strides.end());
}

// torch's name of a dtype ("torch.float32"), as Python prints it
std::string dtype_name(at::ScalarType t) {
  std::string name = c10::toString(t);
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return "torch." + name;
  }
}

std::string size_repr(c10::SymIntArrayRef sizes) {  // torch.Size([2, 3])
  std::ostringstream out;
  out << "torch.Size([";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "])";
  return out.str();
}


at::Tensor pooled_empty(const at::Tensor& x, at::IntArrayRef strides) {
  const size_t nbytes = x.numel() * x.element_size();
  void* block = pool->take(nbytes);
  if (block == nullptr) return at::empty_strided(x.sizes(), strides, x.options());
  return at::from_blob(block, x.sizes(), strides, [nbytes](void* p) { pool->give_back(p, nbytes); }, x.options());
}

}  // namespace fastnorm

namespace fastnorm {  // optim.cpp
void define_optimizer(const std::string& name, const std::string& schema, int buffers, bool counts_steps,
                      int clone_first, int options, int constants, int flags, const std::string& cuda_signature);
}  // namespace fastnorm

namespace fastnorm {  // cuda_launch.cpp
void cuda_configure(py::object resolve, py::object geometry);
void cuda_set_hook(py::object run);
py::list cuda_kernels();
py::object cuda_unusable();
void cuda_probe(int kernel, int storage, int device, std::array<int64_t, 3> grid, std::array<int64_t, 3> block,
                const std::vector<int64_t>& bits);
}  // namespace fastnorm

namespace {
void set_tunables(const py::dict& values) {
  auto& t = fastnorm::settings;
  t.parallel_min_elements = values["parallel_min_elements"].cast<int64_t>();
  t.max_chunks = values["max_chunks"].cast<int64_t>();
  t.chunk_elements = values["chunk_elements"].cast<int64_t>();
  t.block_bytes = values["block_bytes"].cast<int64_t>();
  t.optimizer_chunk = values["optimizer_chunk"].cast<int64_t>();
  t.max_threads = values["max_threads"].cast<int64_t>();
  TORCH_CHECK(t.max_chunks > 0 && t.chunk_elements > 0 && t.block_bytes > 0 && t.optimizer_chunk > 0,
              "fastnorm: the kernels' tunables must be positive");
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnorm's C++ ops (torch.ops.fastnorm.*): configuration of their kernels and output pool";
  m.def("configure", [](py::object resolve, int64_t set_num_threads, py::dict values) {
    set_tunables(values);
    fastnorm::set_threads = reinterpret_cast<fastnorm::SetThreads>(set_num_threads);
    if (fastnorm::resolver == nullptr) fastnorm::resolver = new py::object(std::move(resolve));
  });
  m.def("set_tunables", &set_tunables);
  m.def("define_optimizer", &fastnorm::define_optimizer,
        "defines torch.ops.fastnorm.<name>_ from an optimizer description (fastnorm/_ops.py, once per description): "
        "(name, schema, buffers, counts_steps, clone_first, options, constants, flags, cuda_signature)");
  m.def("pool_configure", [](int64_t min_bytes, int64_t max_bytes) {
    fastnorm::pool->configure(static_cast<size_t>(min_bytes), static_cast<size_t>(std::max<int64_t>(0, max_bytes)));
  });
  m.def("pool_in_use", [] { return fastnorm::pool->in_use(); });
  m.def("pool_clear", [] { fastnorm::pool->clear(); });
  m.def("cuda_configure", &fastnorm::cuda_configure,
        "the cuda ops' PTX resolver (module, function, signature, storage, major, minor) -> (ptx, entry) and "
        "launch geometry () -> dict, each asked when first needed");
  m.def("cuda_set_hook", &fastnorm::cuda_set_hook,
        "tests: run every cuda launch through hook(module, function, signature, storage, grid, block, args)");
  m.def("cuda_kernels", &fastnorm::cuda_kernels, "the (module, function, signature) of every kernel the cuda ops launch");
  m.def("cuda_unusable", &fastnorm::cuda_unusable, "why the cuda ops cannot launch here, or None");
  m.def("cuda_probe", &fastnorm::cuda_probe,
        "one launch of kernel (an index of cuda_kernels()) through the CUDA driver path, without tensors: "
        "(kernel, storage, device, grid, block, argument bits); diagnostics and tests");
}
