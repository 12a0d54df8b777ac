// fastnorm's C++ op layer on NVIDIA GPUs: kernels loaded from PTX and launched through the CUDA
// driver API (cuda_launch.h says how and why).
#include "cuda_launch.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <dlfcn.h>
#include <torch/extension.h>

#include <atomic>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "fastnorm.h"

namespace fastnorm::cuda {
namespace {

struct Spec {
  const char* module;  // under fastnorm_kernels.numba_cuda
  const char* function;
  const char* signature;
};

// In the order of enum Kernel; the signatures are the launchers' in kernels/fastnorm_kernels/numba_cuda/batchnorm.py.
constexpr Spec kKernels[] = {
    {"batchnorm", "_stats_planes", "aDiiia"},
    {"batchnorm", "_grad_planes", "aaaDKiiia"},
    {"batchnorm", "_stats_rows", "aDiia"},
    {"batchnorm", "_grad_rows", "aaaDKiia"},
    {"batchnorm", "_finalize_train", "aDKiiiaiffaabababaaa"},
    {"batchnorm", "_finalize_eval", "aaKifababa"},
    {"batchnorm", "_finalize_backward", "aiKifaaabbababa"},
    {"batchnorm", "_finalize_stats", "aDiiiaiaa"},
    {"batchnorm", "_normalize_planes", "aaaDKiii"},
    {"batchnorm", "_normalize_flat", "aaaDKiii"},
    {"batchnorm", "_input_grad_planes", "aaaDKiiia"},
    {"batchnorm", "_input_grad_flat", "aaaDKiiia"},
    // kernels/fastnorm_kernels/numba_cuda/layernorm.py: the grouped-row kernels (LayerNorm, RMSNorm, GroupNorm)
    {"layernorm", "_forward_rows", "aaababDKiiiiifbaa"},
    {"layernorm", "_input_grad_rows", "aaaaabDKiiiiiba"},
    {"layernorm", "_param_partials_columns", "aaaaDKiiiiba"},
    {"layernorm", "_param_partials_planes", "aaaaDKiiiiiba"},
    {"layernorm", "_param_finalize", "aiKiabab"},
};
static_assert(sizeof(kKernels) / sizeof(kKernels[0]) == static_cast<int>(Kernel::kCount));

constexpr int kStorages = 5;  // float32, float64, bfloat16, float16, bfloat16 with stochastic rounding
constexpr int kMaxAdded = 64;  // kernels added at load time (add_kernel)

// The kernels added at load time: their texts, kept for the process (a deque: stable addresses).
struct Added {
  std::string module, function, signature;
  Spec spec;
};
std::mutex added_mutex;
auto* added = new std::deque<Added>();  // never freed: launches may come while statics are destroyed
std::atomic<int> added_count{0};

int kernel_count() { return static_cast<int>(Kernel::kCount) + added_count.load(std::memory_order_acquire); }

const Spec& spec_of(int kernel) {
  TORCH_CHECK(kernel >= 0 && kernel < kernel_count(), "fastnorm: no cuda kernel ", kernel);
  if (kernel < static_cast<int>(Kernel::kCount)) return kKernels[kernel];
  return (*added)[kernel - static_cast<int>(Kernel::kCount)].spec;
}

// The number of kernel parameters of a signature (tuples flattened), and its i-th code.
size_t parameter_count(const char* signature) {
  size_t n = 0;
  for (const char* c = signature; *c; ++c) n += (*c != '(' && *c != ')');
  return n;
}
constexpr int kMaxDevices = 64;

// ---- the CUDA driver, opened at run time ---------------------------------------------------------
using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;

struct Driver {
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
  CUresult (*cuStreamIsCapturing)(CUstream, int*) = nullptr;
  std::string error;  // why it could not be opened, else empty
};
constexpr int kComputeCapabilityMajor = 75, kComputeCapabilityMinor = 76;  // CUdevice_attribute

template <typename F>
bool bind(void* library, const char* name, F& slot) {
  slot = reinterpret_cast<F>(dlsym(library, name));
  return slot != nullptr;
}

const Driver& driver() {
  static const Driver* opened = [] {
    auto* d = new Driver();  // never freed: kernels may launch while statics are destroyed
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) {
      const char* why = dlerror();
      d->error = std::string("the CUDA driver (libcuda.so.1) cannot be opened: ") + (why ? why : "unknown error");
      return d;
    }
    const bool ok = bind(library, "cuInit", d->cuInit) && bind(library, "cuDeviceGet", d->cuDeviceGet) &&
                    bind(library, "cuDeviceGetAttribute", d->cuDeviceGetAttribute) &&
                    bind(library, "cuDevicePrimaryCtxRetain", d->cuDevicePrimaryCtxRetain) &&
                    bind(library, "cuCtxGetCurrent", d->cuCtxGetCurrent) &&
                    bind(library, "cuCtxSetCurrent", d->cuCtxSetCurrent) &&
                    bind(library, "cuModuleLoadData", d->cuModuleLoadData) &&
                    bind(library, "cuModuleGetFunction", d->cuModuleGetFunction) &&
                    bind(library, "cuLaunchKernel", d->cuLaunchKernel) &&
                    bind(library, "cuGetErrorString", d->cuGetErrorString) &&
                    bind(library, "cuStreamIsCapturing", d->cuStreamIsCapturing);
    if (!ok) {
      d->error = "the CUDA driver (libcuda.so.1) lacks a function fastnorm launches with";
    } else if (d->cuInit(0) != 0) {
      d->error = "the CUDA driver does not initialise (cuInit failed)";
    }
    return d;
  }();
  return *opened;
}

void check(CUresult result, const char* what) {
  if (result == 0) return;
  const char* text = nullptr;
  if (driver().cuGetErrorString != nullptr) driver().cuGetErrorString(result, &text);
  TORCH_CHECK(false, "fastnorm's cuda ops: ", what, " failed: ", text ? text : "error ", result);
}

// ---- configuration (fastnorm/_ops.py) ----------------------------------------------------------------
py::object* resolver = nullptr;  // (module, function, signature, storage, major, minor) -> (ptx, entry)
py::object* geometry_source = nullptr;  // () -> the launch geometry constants (a dict), asked once
py::object* hook = nullptr;      // tests: (module, function, signature, storage, grid, block, args) runs it
Geometry settings;
std::atomic<bool> settings_loaded{false};
std::mutex load_mutex;

struct Device {
  std::atomic<bool> ready{false};
  CUcontext context = nullptr;
  int major = 0, minor = 0;
};
std::array<Device, kMaxDevices> devices;
std::array<std::atomic<void*>, (static_cast<int>(Kernel::kCount) + kMaxAdded) * kStorages * kMaxDevices> functions{};

Device& device_state(int index) {
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "fastnorm's cuda ops: device index ", index, " out of range");
  Device& d = devices[index];
  if (d.ready.load(std::memory_order_acquire)) return d;
  std::lock_guard<std::mutex> lock(load_mutex);
  if (!d.ready.load(std::memory_order_relaxed)) {
    const Driver& drv = driver();
    TORCH_CHECK(drv.error.empty(), "fastnorm's cuda ops cannot run: ", drv.error);
    CUdevice handle = 0;
    check(drv.cuDeviceGet(&handle, index), "cuDeviceGet");
    check(drv.cuDevicePrimaryCtxRetain(&d.context, handle), "cuDevicePrimaryCtxRetain");  // torch's context
    check(drv.cuDeviceGetAttribute(&d.major, kComputeCapabilityMajor, handle), "cuDeviceGetAttribute");
    check(drv.cuDeviceGetAttribute(&d.minor, kComputeCapabilityMinor, handle), "cuDeviceGetAttribute");
    d.ready.store(true, std::memory_order_release);
  }
  return d;
}

CUfunction function_of(int kernel, int storage, int index, Device& d) {
  auto& slot = functions[(kernel * kStorages + storage) * kMaxDevices + index];
  void* fn = slot.load(std::memory_order_acquire);
  if (fn != nullptr) return fn;
  const Spec& spec = spec_of(kernel);
  std::string ptx, entry;
  {
    TORCH_CHECK(resolver != nullptr, "fastnorm's cuda ops are not configured (fastnorm._ops.load() configures them)");
    py::gil_scoped_acquire gil;
    auto result = (*resolver)(spec.module, spec.function, spec.signature, storage, d.major, d.minor).cast<py::tuple>();
    ptx = result[0].cast<std::string>();
    entry = result[1].cast<std::string>();
  }
  std::lock_guard<std::mutex> lock(load_mutex);
  fn = slot.load(std::memory_order_acquire);
  if (fn != nullptr) return fn;  // another thread loaded it meanwhile
  const Driver& drv = driver();
  // into the device's primary context (torch's), current now: the compile above may have made another current
  check(drv.cuCtxSetCurrent(d.context), "cuCtxSetCurrent");
  CUmodule module = nullptr;  // kept for the process: its functions are cached
  check(drv.cuModuleLoadData(&module, ptx.c_str()), "cuModuleLoadData (loading a kernel's PTX)");
  check(drv.cuModuleGetFunction(&fn, module, entry.c_str()), "cuModuleGetFunction");
  slot.store(fn, std::memory_order_release);
  return fn;
}

void launch_hooked(int kernel, int storage, Dim3 grid, Dim3 block, const std::vector<Arg>& args) {
  const Spec& spec = spec_of(kernel);
  py::gil_scoped_acquire gil;
  py::list values;
  std::string codes;
  for (const char* c = spec.signature; *c; ++c) {
    if (*c != '(' && *c != ')') codes += *c;
  }
  int i = 0;
  for (const Arg& a : args) {
    switch (codes[i++]) {
      case 'f': {
        double v;
        std::memcpy(&v, &a.bits, sizeof(double));
        values.append(v);
        break;
      }
      case 'k': {
        if (storage == kFloat64) {
          double v;
          std::memcpy(&v, &a.bits, sizeof(double));
          values.append(v);
        } else {
          float v;
          const auto low = static_cast<uint32_t>(a.bits);
          std::memcpy(&v, &low, sizeof(float));
          values.append(static_cast<double>(v));
        }
        break;
      }
      case 'b': values.append(py::bool_(a.bits != 0)); break;
      case 'D':
      case 'K': values.append(py::none()); break;
      default: values.append(a.bits);
    }
  }
  (*hook)(spec.module, spec.function, spec.signature, storage, py::make_tuple(grid.x, grid.y, grid.z),
          py::make_tuple(block.x, block.y, block.z), values);
}

void* current_stream(const at::Tensor& like) {  // torch's current stream on like's device
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStream(like.device()).native_handle();
}

}  // namespace

bool hooked() { return hook != nullptr; }

bool capturing(const at::Tensor& like) {
  if (hook != nullptr || !like.is_cuda()) return false;
  const Driver& drv = driver();
  TORCH_CHECK(drv.error.empty(), "fastnorm's cuda ops cannot run: ", drv.error);
  int status = 0;  // CU_STREAM_CAPTURE_STATUS_NONE
  check(drv.cuStreamIsCapturing(current_stream(like), &status), "cuStreamIsCapturing");
  return status != 0;
}

const Geometry& geometry() {
  if (settings_loaded.load(std::memory_order_acquire)) return settings;
  TORCH_CHECK(geometry_source != nullptr, "fastnorm's cuda ops are not configured (fastnorm._ops.load() configures them)");
  Geometry g;
  {
    py::gil_scoped_acquire gil;  // the GIL before any lock: an autograd thread may get here without it
    py::dict values = (*geometry_source)().cast<py::dict>();
    g.block = values["block"].cast<int64_t>();
    g.row_tile = values["row_tile"].cast<int64_t>();
    g.row_lanes = values["row_lanes"].cast<int64_t>();
    g.target_blocks = values["target_blocks"].cast<int64_t>();
    g.unroll = values["unroll"].cast<int64_t>();
    g.plane_min = values["plane_min"].cast<int64_t>();
    g.optimizer_chunk = values["optimizer_chunk"].cast<int64_t>();
    g.optimizer_max_blocks = values["optimizer_max_blocks"].cast<int64_t>();
    g.row_block = values["row_block"].cast<int64_t>();
    g.col_tile = values["col_tile"].cast<int64_t>();
    g.col_lanes = values["col_lanes"].cast<int64_t>();
    g.max_row_blocks = values["max_row_blocks"].cast<int64_t>();
    g.rows_per_split = values["rows_per_split"].cast<int64_t>();
  }
  TORCH_CHECK(g.block > 0 && g.row_tile > 0 && g.row_lanes > 0 && g.target_blocks > 0 && g.unroll > 0 &&
                  g.optimizer_chunk > 0 && g.optimizer_max_blocks > 0 && g.row_block > 0 && g.col_tile > 0 &&
                  g.col_lanes > 0 && g.max_row_blocks > 0 && g.rows_per_split > 0,
              "fastnorm's cuda ops: the launch geometry must be positive");
  std::lock_guard<std::mutex> lock(load_mutex);
  if (!settings_loaded.load(std::memory_order_relaxed)) {
    settings = g;
    settings_loaded.store(true, std::memory_order_release);
  }
  return settings;
}

bool usable(std::string* why) {
  if (resolver == nullptr) {
    if (why) *why = "fastnorm's cuda ops are not configured";
    return false;
  }
  const Driver& drv = driver();
  if (!drv.error.empty()) {
    if (why) *why = drv.error;
    return false;
  }
  return true;
}

int add_kernel(const std::string& module, const std::string& function, const std::string& signature) {
  std::lock_guard<std::mutex> lock(added_mutex);
  const int n = added_count.load(std::memory_order_acquire);
  for (int i = 0; i < n; ++i) {
    const Added& a = (*added)[i];
    if (a.module == module && a.function == function && a.signature == signature) {
      return static_cast<int>(Kernel::kCount) + i;
    }
  }
  TORCH_CHECK(n < kMaxAdded, "fastnorm's cuda ops: more than ", kMaxAdded, " kernels added");
  Added& a = added->emplace_back();
  a.module = module;
  a.function = function;
  a.signature = signature;
  a.spec = Spec{a.module.c_str(), a.function.c_str(), a.signature.c_str()};
  added_count.store(n + 1, std::memory_order_release);
  return static_cast<int>(Kernel::kCount) + n;
}

void launch(int kernel, int storage, const at::Tensor& like, Dim3 grid, Dim3 block, const std::vector<Arg>& args) {
  const Spec& spec = spec_of(kernel);
  TORCH_CHECK(args.size() == parameter_count(spec.signature), "fastnorm's cuda ops: ", spec.function, " takes ",
              parameter_count(spec.signature), " arguments, ", args.size(), " given");
  TORCH_CHECK(storage >= 0 && storage < kStorages, "fastnorm's cuda ops: no kernel storage ", storage);
  if (grid.x * grid.y * grid.z == 0) return;
  if (hook != nullptr) {  // tests: the simulator runs the kernel on host memory
    launch_hooked(kernel, storage, grid, block, args);
    return;
  }
  TORCH_CHECK(like.is_cuda(), "fastnorm's cuda ops launch on CUDA tensors, got one on ", like.device());
  launch_on(kernel, storage, like.get_device(), current_stream(like), grid, block, args);
}

void launch_on(int kernel, int storage, int index, void* stream, Dim3 grid, Dim3 block,
               const std::vector<Arg>& args) {
  const Spec& spec = spec_of(kernel);
  Device& d = device_state(index);
  CUfunction fn = function_of(kernel, storage, index, d);
  const Driver& drv = driver();
  CUcontext current = nullptr;
  check(drv.cuCtxGetCurrent(&current), "cuCtxGetCurrent");
  if (current != d.context) check(drv.cuCtxSetCurrent(d.context), "cuCtxSetCurrent");
  std::array<int64_t, 32> slots{};
  std::array<void*, 32> params{};
  TORCH_CHECK(args.size() <= slots.size(), "fastnorm's cuda ops: too many kernel arguments");
  size_t i = 0;
  for (const Arg& a : args) {
    slots[i] = a.bits;  // little-endian: a smaller parameter reads the low bytes (typed zeros: all zero)
    params[i] = &slots[i];
    ++i;
  }
  check(drv.cuLaunchKernel(fn, static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y),
                           static_cast<unsigned>(grid.z), static_cast<unsigned>(block.x),
                           static_cast<unsigned>(block.y), static_cast<unsigned>(block.z), 0, stream, params.data(),
                           nullptr),
        spec.function);
}

}  // namespace fastnorm::cuda

namespace fastnorm {

void cuda_configure(py::object resolve, py::object geometry) {
  if (cuda::resolver == nullptr) {  // never freed: launches may come while statics are destroyed
    cuda::resolver = new py::object(std::move(resolve));
    cuda::geometry_source = new py::object(std::move(geometry));
  }
}

// Diagnostics and tests: one launch through the driver path (module loading, context, argument
// packing, cuLaunchKernel) without tensors, on `device`'s legacy default stream.
void cuda_probe(int kernel, int storage, int device, std::array<int64_t, 3> grid, std::array<int64_t, 3> block,
                const std::vector<int64_t>& bits) {
  TORCH_CHECK(storage >= 0 && storage < cuda::kStorages, "fastnorm: no kernel storage ", storage);
  const cuda::Spec& spec = cuda::spec_of(kernel);
  TORCH_CHECK(bits.size() == cuda::parameter_count(spec.signature), "fastnorm: ", spec.function, " takes ",
              cuda::parameter_count(spec.signature), " arguments, ", bits.size(), " given");
  std::vector<cuda::Arg> args(bits.begin(), bits.end());
  py::gil_scoped_release no_gil;  // as an op called from Python: the PTX resolver takes the GIL itself
  cuda::launch_on(kernel, storage, device, nullptr, {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, args);
}

void cuda_set_hook(py::object run) {
  py::object* old = cuda::hook;
  cuda::hook = run.is_none() ? nullptr : new py::object(std::move(run));
  delete old;
}

py::list cuda_kernels() {
  py::list out;
  for (int i = 0; i < cuda::kernel_count(); ++i) {
    const cuda::Spec& spec = cuda::spec_of(i);
    out.append(py::make_tuple(spec.module, spec.function, spec.signature));
  }
  return out;
}

py::object cuda_unusable() {
  std::string why;
  if (cuda::usable(&why)) return py::none();
  return py::str(why);
}

}  // namespace fastnorm
