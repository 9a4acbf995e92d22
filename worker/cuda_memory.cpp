#include "worker/cuda_memory.h"

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <unistd.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "common/errors.h"
#include "common/log.h"
#include "kernels/check.h"

namespace ringllama {

namespace {

// NVML, opened at run time (the driver's libnvidia-ml.so.1; the toolkit ships no header here): the
// device memory of this process alone, so that several workers on one GPU each count their own.
// The few declarations below are NVML's stable C ABI (nvml.h, v3 process query).
struct NvmlProcessInfo {
  unsigned int pid;
  unsigned long long used_gpu_memory;
  unsigned int gpu_instance_id;
  unsigned int compute_instance_id;
};

class Nvml {
 public:
  static Nvml& get() {
    static Nvml n;
    return n;
  }
  // Bytes NVML counts for this process on the CUDA device `device`; nullopt where NVML is missing
  // or does not list this process (a container's own pid namespace).
  std::optional<uint64_t> process_bytes(int device) {
    if (!ok_) return std::nullopt;
    char bus[32] = {};
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, device) != cudaSuccess) return std::nullopt;
    void* handle = nullptr;
    if (by_bus_(bus, &handle) != 0) return std::nullopt;
    std::vector<NvmlProcessInfo> infos(64);
    unsigned int count = static_cast<unsigned int>(infos.size());
    if (procs_(handle, &count, infos.data()) != 0) return std::nullopt;
    const unsigned int self = static_cast<unsigned int>(::getpid());
    for (unsigned int i = 0; i < count && i < infos.size(); ++i)
      if (infos[i].pid == self && infos[i].used_gpu_memory != ~0ull) return infos[i].used_gpu_memory;
    return std::nullopt;
  }

 private:
  Nvml() {
    void* lib = ::dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
    auto init = reinterpret_cast<int (*)()>(::dlsym(lib, "nvmlInit_v2"));
    by_bus_ = reinterpret_cast<int (*)(const char*, void**)>(::dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2"));
    procs_ = reinterpret_cast<int (*)(void*, unsigned int*, NvmlProcessInfo*)>(
        ::dlsym(lib, "nvmlDeviceGetComputeRunningProcesses_v3"));
    ok_ = init && by_bus_ && procs_ && init() == 0;
  }
  bool ok_ = false;
  int (*by_bus_)(const char*, void**) = nullptr;
  int (*procs_)(void*, unsigned int*, NvmlProcessInfo*) = nullptr;
};

}  // namespace

std::optional<uint64_t> process_device_bytes(int device) { return Nvml::get().process_bytes(device); }

DeviceMemory device_memory() {
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return DeviceMemory{total_b, free_b};
}

uint64_t process_context_bytes(int device) {
  // A process-wide record because the context is process-wide: only the first backend on a device
  // sees the context being made.
  static std::mutex mu;
  static std::map<int, uint64_t> measured;
  std::lock_guard<std::mutex> lock(mu);
  auto it = measured.find(device);
  if (it != measured.end()) return it->second;
  CUDA_CHECK(cudaSetDevice(device));
  CUDA_CHECK(cudaFree(nullptr));  // makes the context, if nothing in this process has yet
  // This process's own figure where NVML gives it; the device's use otherwise (which counts other
  // processes on the GPU too).
  const uint64_t used = process_device_bytes(device).value_or(device_memory().used());
  measured.emplace(device, used);
  return used;
}

double CudaMemoryReport::difference_of_budget() const {
  return plan.budget_bytes > 0 ? static_cast<double>(difference()) / static_cast<double>(plan.budget_bytes) : 0.0;
}

std::string CudaMemoryReport::summary() const {
  const int64_t d = difference();
  return fmt::format(
      "measured {} in use ({} bytes: context {} + device use grown by {} from cuBLAS on), planned {} without the free "
      "guard ({} bytes): {}{:.1f} MiB, {:+.2f}% of the {} budget; the backend's own allocations {} against the "
      "plan's {}",
      format_bytes(measured_bytes), measured_bytes, format_bytes(context_bytes),
      format_bytes(measured_bytes - context_bytes), format_bytes(planned_bytes), planned_bytes, d < 0 ? "-" : "+",
      std::fabs(static_cast<double>(d)) / static_cast<double>(kMiB), 100.0 * difference_of_budget(),
      format_bytes(plan.budget_bytes), format_bytes(allocated_bytes), format_bytes(planned_allocations));
}

void log_memory_report(int device, const CudaMemoryReport& report) {
  spdlog::info("device memory after allocation (GPU {}): {}", device, report.summary());
}

MemoryPlan plan_backend(const Manifest& manifest, const Config& config, const DeviceMemory& after_cublas,
                        uint64_t context_bytes, uint64_t cublas_bytes) {
  PlanInputs in;
  in.device_total_bytes = after_cublas.total;
  in.device_free_bytes = after_cublas.free;
  in.context_bytes = context_bytes;
  in.cublas_bytes = cublas_bytes;
  in.measured = true;
  MemoryPlan plan = plan_memory(manifest, config, in);
  spdlog::info("device memory plan (GPU {}):\n{}", config.gpu, plan.table());
  if (!plan.fits) fail("{}", plan.refusal());
  return plan;
}

double measure_pinned_h2d(size_t bytes, int reps, void* into) {
  void* host = nullptr;
  CUDA_CHECK(cudaMallocHost(&host, bytes));
  std::unique_ptr<void, cudaError_t (*)(void*)> host_owner(host, cudaFreeHost);
  std::memset(host, 1, bytes);
  void* dev = into;
  if (!dev) CUDA_CHECK(cudaMalloc(&dev, bytes));
  std::unique_ptr<void, cudaError_t (*)(void*)> dev_owner(into ? nullptr : dev, cudaFree);
  cudaEvent_t a = nullptr, b = nullptr;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> s;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(a, nullptr));
    CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, nullptr));
    CUDA_CHECK(cudaEventRecord(b, nullptr));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    s.push_back(ms * 1e-3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(s.begin(), s.end());
  return static_cast<double>(bytes) / s[s.size() / 2];
}

}  // namespace ringllama
