// The CUDA backend: the forward of DESIGN.md "Forward" on one GPU, every weight resident there,
// many sequences per step over a paged KV cache. bf16 weights and activations, fp32 accumulation, norms and residual
// stream, GEMMs through cuBLAS. Built only with RINGLLAMA_CUDA (the engine library then defines
// RINGLLAMA_HAVE_CUDA for its users).
#pragma once

#include <memory>

#include "kernels/device_info.h"  // cuda_device_count(): 0 without a GPU or driver, never an error
#include "worker/backend.h"
#include "worker/cuda_memory.h"

namespace ringllama {

struct CudaBackendOptions {
  // Decode steps (one token per sequence) replay a CUDA graph captured once per batch size: one
  // launch instead of ~10 per layer. Off: every step is launched kernel by kernel.
  bool graphs = true;
};

// Makes the CUDA context and the cuBLAS handle on config.gpu and measures what they took; plans the
// device memory with those figures (worker/planner.h, every layer resident: streaming is not wired
// into this backend yet), logs the table, and throws Error with the planner's refusal (what to
// lower, what each change saves) when it does not fit. Then allocates everything the plan lists,
// once: the globals and every layer (acquire_layer/release_layer), the paged KV cache (batch_size x
// ceil(max_context / kv_block_tokens) blocks), the activations of one step (batch_size x
// prefill_chunk_tokens tokens), the workspace, and the decode-step graphs of every batch size; no
// device allocation happens after that. Logs the memory measured in use next to the plan.
std::unique_ptr<Backend> make_cuda_backend(WeightSource& weights, const Config& config,
                                           const CudaBackendOptions& options = {});

// The plan and the measurement of a backend make_cuda_backend made; nullptr for any other.
const CudaMemoryReport* cuda_memory_report(const Backend& backend);

}  // namespace ringllama
