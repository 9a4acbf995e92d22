// The CUDA backend: the forward of DESIGN.md "Forward" on one GPU, every weight resident there,
// many sequences per step over a paged KV cache. bf16 weights and activations, fp32 accumulation, norms and residual
// stream, GEMMs through cuBLAS. Built only with RINGLLAMA_CUDA (the engine library then defines
// RINGLLAMA_HAVE_CUDA for its users).
#pragma once

#include <memory>

#include "kernels/device_info.h"  // cuda_device_count(): 0 without a GPU or driver, never an error
#include "worker/backend.h"

namespace ringllama {

struct CudaBackendOptions {
  // Decode steps (one token per sequence) replay a CUDA graph captured once per batch size: one
  // launch instead of ~10 per layer. Off: every step is launched kernel by kernel.
  bool graphs = true;
};

// Copies the globals and every layer to GPU config.gpu once (acquire_layer/release_layer), and
// allocates, once, the paged KV cache (batch_size x ceil(max_context / kv_block_tokens) blocks)
// and the activations of one step (batch_size x prefill_chunk_tokens tokens). Throws Error naming
// the device and the size when something does not fit.
std::unique_ptr<Backend> make_cuda_backend(WeightSource& weights, const Config& config,
                                           const CudaBackendOptions& options = {});

}  // namespace ringllama
