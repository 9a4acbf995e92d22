// The CUDA backend: the forward of DESIGN.md "Forward" on one GPU, many sequences per step over a
// paged KV cache. The globals and as many layers as the memory plan leaves room for stay on the
// device; the others stream through the GPU group pool (worker/gpu_weights.h) each step. bf16 weights and activations, fp32 accumulation, norms and residual
// stream, GEMMs through cuBLAS. Built only with RINGLLAMA_CUDA (the engine library then defines
// RINGLLAMA_HAVE_CUDA for its users).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/device_info.h"  // cuda_device_count(): 0 without a GPU or driver, never an error
#include "worker/backend.h"
#include "worker/cuda_memory.h"

namespace ringllama {

struct CudaBackendOptions {
  // Decode steps (one token per sequence) replay a CUDA graph captured once per batch size: one
  // launch instead of ~10 per layer. Off: every step is launched kernel by kernel.
  // Used only when every layer is resident: a streamed step runs kernel by kernel.
  bool graphs = true;
  // Each eager step records two events per layer on the compute stream (after the wait for the
  // layer's copy, after its last kernel): CudaStreamReport's per-layer compute times.
  bool profile_layers = false;
};

// Where a backend's weights came from, pass after pass.
struct CudaStreamReport {
  int64_t n_layers = 0;
  int64_t resident_layers = 0;
  int64_t attn_buffers = 0;          // group pool buffers (0: every layer resident)
  int64_t ffn_buffers = 0;
  bool graphs = false;               // decode steps replay graphs
  uint64_t passes = 0;
  uint64_t bytes = 0;                // streamed host to device, all passes
  double copy_seconds = 0;           // the copies' time on the copy stream (events)
  uint64_t source_stalls = 0;        // host layers the pool had to wait for (over 100 us)
  uint64_t registration_waits = 0;   // copies that waited for their host memory to be registered
  double registration_wait_seconds = 0;
  double source_wait_seconds = 0;
  uint64_t event_syncs = 0;          // host waits for a copy to land (room for the next one)
  std::vector<double> layer_copy_seconds;     // the last pass, per layer (0: resident)
  std::vector<double> layer_compute_seconds;  // the last profiled step, per layer (profile_layers)
  double step_seconds = 0;           // the last profiled step: first layer's start to last layer's end
  // The hybrid (cpu_share): the CPU's rows of streamed layers, all passes.
  uint64_t skipped_bytes = 0;        // streamed layers' bytes left on the host for the CPU
  bool hybrid = false;
  uint64_t cpu_calls = 0;            // row ranges the CPU computed
  uint64_t cpu_bytes = 0;            // weight bytes the CPU read
  double cpu_seconds = 0;            // in the CPU kernel
  double cpu_callback_seconds = 0;   // in the host functions (conversion and bookkeeping too)
  uint64_t cpu_joins = 0;            // matrices whose halves met on the GPU
  double cpu_join_wait_seconds = 0;  // the compute stream waiting for the CPU's rows, summed
  double cpu_ahead_seconds = 0;      // the CPU's rows in before the GPU's half was done, summed
  double h2d_gbs_measured = 0;       // pinned H2D at start (the split's rate)
  double cpu_dram_read_gbs = 0;      // a plain read by the same threads at start (0: share forced)
  std::string cpu_isa;
  int cpu_threads = 0;
  double gpu_fraction = 1;           // the last step's GPU share f (before rounding to rows)
  double gb_per_s() const { return copy_seconds > 0 ? double(bytes) / copy_seconds * 1e-9 : 0.0; }
};

// Makes the CUDA context and the cuBLAS handle on config.gpu and measures what they took; plans the
// device memory with those figures (worker/planner.h: resident_layers auto keeps what fits),
// logs the table, and throws Error with the planner's refusal (what to lower, what each change
// saves) when it does not fit. Then allocates everything the plan lists, once: the globals, the
// resident layers and the group pool (GpuWeights over `weights`, whose HostSlots are used when it
// has them, e.g. open_window_weights), the paged KV cache (batch_size x
// ceil(max_context / kv_block_tokens) blocks), the activations of one step (batch_size x
// prefill_chunk_tokens tokens), the workspace, and the decode-step graphs of every batch size; no
// device allocation happens after that. Logs the memory measured in use next to the plan.
std::unique_ptr<Backend> make_cuda_backend(WeightSource& weights, const Config& config,
                                           const CudaBackendOptions& options = {});

// The plan and the measurement of a backend make_cuda_backend made; nullptr for any other.
const CudaMemoryReport* cuda_memory_report(const Backend& backend);

// The streaming figures of a backend make_cuda_backend made; false for any other.
bool cuda_stream_report(const Backend& backend, CudaStreamReport* out);

// The layers a CUDA backend with `config` would keep resident on config.gpu, planned with the
// memory free now (the context made, cuBLAS estimated): tells the caller whether to open the whole
// store or a ring window.
int64_t cuda_planned_resident_layers(const Manifest& manifest, const Config& config);

}  // namespace ringllama
