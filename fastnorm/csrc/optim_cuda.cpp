// The optimizer ops on CUDA tensors: torch.ops.fastnorm.<name>_ for the CUDA dispatch key
// (optim.cpp checks the arguments and registers them), launching the description's kernel of
// kernels/fastnorm_kernels/numba_cuda/optim.py from C++ (cuda_launch.h) as its Python launcher does:
//
//   1. the host step counters (state["step"], CPU tensors: torch's optimizers without
//      capturable=True) advance, and each tensor's step-dependent scalars are computed in float64
//      (the description's step scalars, compiled: kernels/fastnorm_kernels/numba_cpu/optim.py, c_scalars);
//   2. tensors sharing those scalars (usually the whole group) share one launch, the scalars and
//      constants passed by value in the compute dtype;
//   3. each launch reads a (5, T) address table and a (K, 3) chunk table (tensor, start, stop) in
//      device memory, uploaded the first time that content is seen and kept (they hold addresses
//      and sizes only: a table is right for any tensors at those addresses, whoever owns them
//      now), so a step is one launch per group with no host-to-device copy.
//
// CUDA graphs: an optimizer without step counters (SGD) is captured as it is once its tables exist
// (a first step inside a capture raises); the others raise under capture, as torch's optimizers do without
// capturable=True: a graph would freeze their host-computed bias corrections. Tables a graph
// captured are never dropped.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "optim.h"

namespace fastnorm {
namespace {

using cuda::Arg;

// The description's per-tensor scalars from a new step count (its compiled step scalars)
std::pair<double, double> tensor_scalars(const Update& u, double step) {
  std::array<double, 2> out{0.0, 0.0};
  auto scalars = u.spec->scalars.load(std::memory_order_acquire);
  if (scalars == nullptr) {  // compiled or loaded once per process ("scalars:<name>": fastnorm/_ops.py)
    scalars = reinterpret_cast<void (*)(double, int64_t, int64_t)>(resolve_entry("scalars:" + u.spec->name, 0));
    const_cast<Spec*>(u.spec)->scalars.store(scalars, std::memory_order_release);
  }
  scalars(step, reinterpret_cast<int64_t>(u.host.data()), reinterpret_cast<int64_t>(out.data()));
  return {out[0], out[1]};
}

// step += 1 on a host counter (float32 arithmetic rounded once for float32 counters, as torch's); the new value
double advance(int64_t addr, bool f64) {
  if (f64) {
    auto* counter = reinterpret_cast<double*>(addr);
    *counter = *counter + 1.0;
    return *counter;
  }
  auto* counter = reinterpret_cast<float*>(addr);
  *counter = static_cast<float>(static_cast<double>(*counter) + 1.0);
  return *counter;
}

struct Tables {
  Tensor addrs, chunks;  // int64 (5, T), (K, 3) on the parameters' device
  int64_t k = 0;
  bool captured = false;  // a CUDA graph reads them: never dropped
  std::vector<c10::StreamId> streams;  // the streams launches read them on (the first: the upload's)
};

// A table is torch-allocated memory, freed when evicted: the caching allocator may then hand it to
// the next allocation on the stream it was made on, ordered after that stream's work only. So the
// first launch on any other stream records it there (torch's record_stream): freeing then waits
// for that stream's work too.
void note_stream(Tables& tables, const Tensor& like) {
  if (!like.is_cuda() || cuda::hooked()) return;
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  const c10::Stream current = impl->getStream(like.device());
  if (std::find(tables.streams.begin(), tables.streams.end(), current.id()) != tables.streams.end()) return;
  if (!tables.streams.empty()) {
    impl->recordDataPtrOnStream(tables.addrs.storage().data_ptr(), current);
    impl->recordDataPtrOnStream(tables.chunks.storage().data_ptr(), current);
  }
  tables.streams.push_back(current.id());
}

constexpr size_t kMaxTables = 1024;
std::mutex tables_mutex;
auto* tables = new std::map<std::vector<int64_t>, Tables>();  // never freed: graphs may outlive statics

Tensor upload(const std::vector<int64_t>& values, const Tensor& like) {
  const bool gpu = like.is_cuda();
  Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions(at::kLong).pinned_memory(gpu));
  std::memcpy(host.data_ptr(), values.data(), values.size() * sizeof(int64_t));
  // a blocking copy (once per table content): later launches on any stream may read the table
  return gpu ? host.to(like.device(), /*non_blocking=*/false) : host;
}

Tables tables_of(const Update& u, const Tensor& like, const std::vector<int64_t>& table,
                 const std::vector<int64_t>& sizes, bool capturing) {
  const int64_t chunk = cuda::geometry().optimizer_chunk;
  std::vector<int64_t> key{like.get_device(), chunk};
  key.insert(key.end(), table.begin(), table.end());
  key.insert(key.end(), sizes.begin(), sizes.end());
  std::lock_guard<std::mutex> lock(tables_mutex);
  auto found = tables->find(key);
  if (found != tables->end()) {
    found->second.captured = found->second.captured || capturing;
    note_stream(found->second, like);
    return found->second;
  }
  TORCH_CHECK(!capturing, "fastnorm::", u.spec->name, "_: the first step of these parameters is being captured in a CUDA "
              "graph; run one step before capturing (it uploads the group's address tables)");
  if (tables->size() >= kMaxTables) {  // parameters that keep moving: forget the tables no graph holds
    for (auto it = tables->begin(); it != tables->end();) it = it->second.captured ? std::next(it) : tables->erase(it);
  }
  std::vector<int64_t> chunks;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (int64_t lo = 0; lo < sizes[i]; lo += chunk) {
      chunks.insert(chunks.end(), {static_cast<int64_t>(i), lo, std::min(sizes[i], lo + chunk)});
    }
  }
  Tables made;
  made.k = static_cast<int64_t>(chunks.size() / 3);
  if (chunks.empty()) chunks.assign(3, 0);
  made.addrs = upload(table, like);
  made.chunks = upload(chunks, like);
  note_stream(made, like);
  return tables->emplace(std::move(key), std::move(made)).first->second;
}

}  // namespace

void step_cuda(const Update& u, int storage, const Tensor& like, const std::vector<int64_t>& addrs,
               const std::vector<int64_t>& numels, const std::vector<int64_t>& step_addrs, bool step_f64,
               const std::vector<bool>& fresh, int64_t seed) {
  c10::OptionalDeviceGuard guard(like.device());
  const int64_t t = static_cast<int64_t>(numels.size());
  const bool counts = u.spec->counts_steps;
  const bool capturing = cuda::capturing(like);
  TORCH_CHECK(!capturing || !counts, "fastnorm::", u.spec->name, "_: a CUDA graph cannot capture this step: its step counters "
              "are CPU tensors (torch's optimizers without capturable=True), whose values a graph would freeze");
  // 1. per-tensor scalars (without step counters: s0 != 0 where a cloned buffer is new this step)
  std::vector<std::pair<double, double>> keys(t);
  std::map<double, std::pair<double, double>> by_step;
  for (int64_t i = 0; i < t; ++i) {
    if (!counts) {
      keys[i] = {fresh[i] ? 1.0 : 0.0, 0.0};
      continue;
    }
    const double step = advance(step_addrs[i], step_f64);
    auto found = by_step.find(step);
    keys[i] = found != by_step.end() ? found->second : (by_step[step] = tensor_scalars(u, step));
  }
  // 2. groups of equal scalars, in first-seen order
  std::vector<std::pair<std::pair<double, double>, std::vector<int64_t>>> groups;
  for (int64_t i = 0; i < t; ++i) {
    auto same = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == keys[i]; });
    if (same == groups.end()) {
      groups.push_back({keys[i], {i}});
    } else {
      same->second.push_back(i);
    }
  }
  // 3. one launch per group
  const bool f64 = storage == kFloat64;
  const auto& geometry = cuda::geometry();
  for (const auto& [scalars, index] : groups) {
    const int64_t n = static_cast<int64_t>(index.size());
    std::vector<int64_t> table(5 * n), sizes(n);
    for (int64_t j = 0; j < n; ++j) {
      for (int r = 0; r < 5; ++r) table[r * n + j] = addrs[r * t + index[j]];
      sizes[j] = numels[index[j]];
    }
    const Tables tb = tables_of(u, like, table, sizes, capturing);
    std::vector<Arg> args{Arg(address(tb.addrs)), Arg(n), Arg(address(tb.chunks)), Arg(tb.k),
                          Arg::real(scalars.first, f64), Arg::real(scalars.second, f64)};
    for (double c : u.constants) args.push_back(Arg::real(c, f64));
    for (int i = 0; i < u.spec->flags; ++i) args.push_back(Arg(u.flags[i]));
    for (bool use : u.uses) args.push_back(Arg(use));
    args.push_back(Arg(seed));
    const cuda::Dim3 grid{std::max<int64_t>(1, std::min(tb.k, geometry.optimizer_max_blocks))};
    cuda::launch(u.spec->cuda_kernel, storage, like, grid, {geometry.block}, args);
  }
}

}  // namespace fastnorm
