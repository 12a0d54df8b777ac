// fastnorm's C++ op layer on NVIDIA GPUs: the numba-cuda kernels, compiled once to PTX and
// launched from C++ with the CUDA driver API on torch's current stream.
//
// Nothing here needs the CUDA toolkit's headers or libraries at build time: the driver
// (libcuda.so.1) is opened with dlopen the first time a kernel is launched, and torch's current
// stream and device come through c10's device-agnostic guard interface (libc10). The extension
// therefore builds, and the CPU package imports, on a machine without a GPU or CUDA toolkit.
//
// A kernel is named by its kernels/fastnorm_kernels/numba_cuda module and function, and typed by a signature
// string, one code per argument (kernels/fastnorm_kernels/numba_cuda/ptx.py reads the same codes):
//   a  an address (int64)        i  an int64            f  a float64        b  a boolean
//   u  a uint32                  k  a value in the compute dtype (float32, or float64 for float64 data)
//   D  the data's typed zero (float32, float64, or the 16-bit storage as uint16 / int16 bits)
//   K  the compute dtype's typed zero
//   (..) a tuple of the codes inside (Numba passes its elements as consecutive parameters)
// A function name's "{storage}" is the storage's suffix (the optimizers' 16-bit kernels).
// The first launch of a (kernel, storage) on a device asks Python for its PTX (compiled by
// numba-cuda for the device's compute capability, or read from fastnorm's PTX cache), loads it
// into the device's primary context and keeps the function; later launches are one
// cuLaunchKernel: no host synchronisation, no allocation (scratch memory comes from torch's
// caching allocator), so the ops can be captured in CUDA graphs once they have run once.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace fastnorm::cuda {

// The kernels the C++ ops launch (kKernels in cuda_launch.cpp: module, function, signature), then
// those added at load time (add_kernel: the optimizers', one per description).
enum class Kernel : int {
  kStatsPlanes = 0,
  kGradPlanes,
  kStatsRows,
  kGradRows,
  kFinalizeTrain,
  kFinalizeEval,
  kFinalizeBackward,
  kFinalizeStats,
  kNormalizePlanes,
  kNormalizeFlat,
  kInputGradPlanes,
  kInputGradFlat,
  kForwardRows,
  kInputGradRows,
  kParamPartialsColumns,
  kParamPartialsPlanes,
  kParamFinalize,
  kCount
};

// One kernel argument, as the signature code of its position says (see above): an address or
// integer, a float64, a boolean, or a typed zero (its value ignored).
struct Arg {
  int64_t bits;
  Arg(int64_t v) : bits(v) {}                                          // NOLINT: a, i
  Arg(int v) : bits(v) {}                                              // NOLINT: i
  Arg(bool v) : bits(v ? 1 : 0) {}                                     // NOLINT: b
  Arg(double v) { std::memcpy(&bits, &v, sizeof(double)); }           // NOLINT: f
  static Arg zero() { return Arg(int64_t(0)); }                        // D, K
  static Arg real(double v, bool f64) {                                // k: the compute dtype's bits
    if (f64) return Arg(v);
    const float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(float));
    return Arg(static_cast<int64_t>(bits));
  }
};

struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
};

// A kernel described at load time (kernels/fastnorm_kernels/numba_cuda module, function, signature):
// its index for launch (at least Kernel::kCount). The same triple again gives the same index.
int add_kernel(const std::string& module, const std::string& function, const std::string& signature);

// Launch kernel `kernel` (a Kernel, or an add_kernel index) for the storage code `storage`
// (fastnorm.h, Storage) on `like`'s device and torch's current stream there (or, when a simulator
// hook is set, through it: tests).
void launch(int kernel, int storage, const at::Tensor& like, Dim3 grid, Dim3 block, const std::vector<Arg>& args);
inline void launch(Kernel kernel, int storage, const at::Tensor& like, Dim3 grid, Dim3 block,
                   const std::vector<Arg>& args) {
  launch(static_cast<int>(kernel), storage, like, grid, block, args);
}
// The driver part of launch: on device `index`'s primary context and `stream`.
void launch_on(int kernel, int storage, int index, void* stream, Dim3 grid, Dim3 block, const std::vector<Arg>& args);

// The launch geometry constants of the kernels (kernels/fastnorm_kernels/numba_cuda: BLOCK, and batchnorm.py's
// ROW_TILE, ROW_LANES, TARGET_BLOCKS, UNROLL, PLANE_MIN), handed over by Python: the simulator
// runs smaller blocks than a GPU.
struct Geometry {
  int64_t block = 256, row_tile = 32, row_lanes = 8, target_blocks = 1024, unroll = 4, plane_min = 32;
  int64_t optimizer_chunk = 1 << 16, optimizer_max_blocks = 4096;  // kernels/fastnorm_kernels/numba_cuda/optim.py's CHUNK, MAX_BLOCKS
  // kernels/fastnorm_kernels/numba_cuda/layernorm.py's ROW_BLOCK, COL_TILE, COL_LANES, MAX_ROW_BLOCKS, ROWS_PER_SPLIT
  int64_t row_block = 256, col_tile = 32, col_lanes = 8, max_row_blocks = 65535, rows_per_split = 128;
};
const Geometry& geometry();

// Whether torch's current stream on `like`'s device is capturing a CUDA graph (false under the
// simulator hook and for CPU tensors).
bool capturing(const at::Tensor& like);

// Whether launches go through the simulator hook (tests): "device" memory is then host memory.
bool hooked();

// Whether the C++ cuda ops can run: configured, and the CUDA driver loads (the reason otherwise).
bool usable(std::string* why = nullptr);

}  // namespace fastnorm::cuda
