// fastnorm's C++ op layer: what the translation units share.
//
// The ops (TORCH_LIBRARY(fastnorm, m) in library.cpp) run the Numba CPU kernels through their C
// entry points (Numba cfuncs: kernels/fastnorm_kernels/numba_cpu/batchnorm.py and optim.py, `c_entry_point`),
// whose addresses Python hands over the first time each one is needed (runtime.cpp). Outputs of
// a megabyte and more come from a caching pool (torch's CPU allocator gives large blocks back to
// the OS, and every fresh output is then paid again in page faults).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace fastnorm {

// Entry point families of the norms; each has one C function per storage code (see entry()).
// The optimizers' are named by their descriptions (optim.cpp).
enum class Entry : int {
  kForwardTrain = 0,
  kForwardEval,
  kBackward,
  kStats,
  kRowNormForward,
  kRowNormBackward,
  kGroupNormForward,
  kGroupNormBackward,
  kCount
};

// Storage codes: BatchNorm's storage dtypes, and the optimizers' storages (bfloat16_sr: bfloat16
// with stochastic rounding).
enum Storage : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kBFloat16SR = 4 };

// The C function of (family, storage), resolved through Python the first time (the GIL is taken
// then, once per entry point and process); raises if it cannot be compiled.
void* entry(Entry family, int storage);
// The same for a family named at load time (an optimizer's: optim.cpp keeps what it resolves).
void* resolve_entry(const std::string& family, int storage);

// Storage code of a tensor dtype (float32, float64, bfloat16, float16), -1 for any other.
int storage_of(at::ScalarType t);

// Runs f with the GIL released where the calling thread holds it (ops called from Python).
void without_gil(const std::function<void()>& f);

// Numba's thread count for the calling thread made torch's (at::get_num_threads(), capped by
// Numba's pool), so that torch.set_num_threads governs the kernels too.
void follow_torch_threads();

// The kernels' tunables (kernels/fastnorm_kernels/numba_cpu: PARALLEL_MIN_ELEMENTS, MAX_CHUNKS, CHUNK_ELEMENTS,
// BLOCK_BYTES; optim.CHUNK), handed over by Python when the extension is configured.
struct Tunables {
  int64_t parallel_min_elements = 1 << 16;
  int64_t max_chunks = 64;
  int64_t chunk_elements = 1 << 14;
  int64_t block_bytes = int64_t(6) << 20;
  int64_t optimizer_chunk = 1 << 15;
  int64_t max_threads = 1;
};
Tunables& tunables();

// An uninitialised CPU tensor of x's sizes, dtype and the given strides (dense in them): from the
// pool when it is large enough, else from torch's allocator.
at::Tensor pooled_empty(const at::Tensor& x, at::IntArrayRef strides);

// torch's name of a dtype ("torch.float32") and of sizes ("torch.Size([2, 3])"), as Python prints them.
std::string dtype_name(at::ScalarType t);
std::string size_repr(c10::SymIntArrayRef sizes);

// Small helpers the ops share.
inline bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }
// The dtype the kernels compute and keep statistics and parameters in: float32 for 16-bit storage.
inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline const at::Tensor& value(const std::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}
inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
// A 16-bit parameter as the float32 the kernels compute with (differentiable: gradients flow back
// in its dtype); others as they are.
inline std::optional<at::Tensor> wide(const std::optional<at::Tensor>& t) {
  if (!defined(t)) return std::nullopt;
  return is_half(t->scalar_type()) ? std::optional<at::Tensor>(t->to(at::kFloat)) : t;
}

// The layout the kernels read x in: channels-last (4-D or 5-D memory N, *spatial, C) if x is
// dense in it and not contiguous, else contiguous.
at::MemoryFormat layout_of(const at::Tensor& x);
// An output's strides in x's layout: the layout's own (torch's outputs have them; they differ
// from x's at size-1 dims).
std::vector<int64_t> canonical_strides(const at::Tensor& x, at::MemoryFormat layout);

// Address of a tensor's data, 0 for an undefined tensor.
inline int64_t address(const at::Tensor& t) { return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0; }

}  // namespace fastnorm
