// The CUDA backend's side of the memory planner (DESIGN.md "The memory planner"): what the
// context and cuBLAS took, measured on the device; the plan made with those figures; and, after
// every allocation, the memory measured in use next to the plan. Built only with RINGLLAMA_CUDA.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/config.h"
#include "common/manifest.h"
#include "worker/planner.h"

namespace ringllama {

// Device memory in use and in all, by cudaMemGetInfo on the current device.
struct DeviceMemory {
  uint64_t total = 0;
  uint64_t free = 0;
  uint64_t used() const { return total - free; }
};
DeviceMemory device_memory();

// The device memory this process holds on `device`, by NVML (the driver's libnvidia-ml, opened at
// run time); nullopt where NVML is missing or does not list this process.
std::optional<uint64_t> process_device_bytes(int device);

// The device memory in use just after this process made its context on `device` (cudaFree(0)),
// read the first time it is asked for and remembered: the context is the process's, one per
// device, and later backends share it. It counts whatever other processes held at that moment too.
uint64_t process_context_bytes(int device);

// Pinned host -> device rate on the current device, bytes per second: `bytes` copies from
// cudaMallocHost memory, the median of `reps` (events on the copy). The PCIe figure of the host
// plan and of the benchmarks. `into`: device memory of at least `bytes` whose contents do not
// matter (a backend's, measured after its plan allocated everything); null = allocated here.
double measure_pinned_h2d(size_t bytes, int reps, void* into = nullptr);

// What a CUDA backend planned and what it then measured.
struct CudaMemoryReport {
  MemoryPlan plan;
  uint64_t context_bytes = 0;    // process_context_bytes
  uint64_t cublas_bytes = 0;     // in use after the cuBLAS handle and workspace, less before
  uint64_t allocated_bytes = 0;  // the backend's own allocations: weights, KV, activations, workspace
  uint64_t planned_allocations = 0;  // the plan's lines for those (globals, layers, KV, table, activations, workspace)
  uint64_t measured_bytes = 0;   // context + what the device's use grew by from before cuBLAS to after everything
  uint64_t planned_bytes = 0;    // the plan's total less the free guard, which is never allocated

  // measured - planned, in bytes and as a fraction of the budget.
  int64_t difference() const { return static_cast<int64_t>(measured_bytes) - static_cast<int64_t>(planned_bytes); }
  double difference_of_budget() const;
  // "measured 2.1 GiB in use, planned 2.1 GiB (without the free guard): +12.3 MiB, +0.45% of the budget"
  std::string summary() const;
};

// Logs the report's summary (spdlog info).
void log_memory_report(int device, const CudaMemoryReport& report);

// Plans with the measured figures (resident_layers auto: as many layers as fit, the others streamed
// through the group pool; or the explicit count), logs the table, and throws Error with the
// planner's refusal (what to lower, what each change saves) when it does not fit.
MemoryPlan plan_backend(const Manifest& manifest, const Config& config, const DeviceMemory& after_cublas,
                        uint64_t context_bytes, uint64_t cublas_bytes);

}  // namespace ringllama
