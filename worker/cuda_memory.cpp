#include "worker/cuda_memory.h"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <cmath>
#include <map>
#include <mutex>

#include "common/errors.h"
#include "common/log.h"
#include "kernels/check.h"

namespace ringllama {

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
  const uint64_t used = device_memory().used();
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

}  // namespace ringllama
