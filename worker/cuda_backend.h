// The CUDA backend: the forward of DESIGN.md "Forward" on one GPU, every weight resident there,
// one sequence at a time. bf16 weights and activations, fp32 accumulation, norms and residual
// stream, GEMMs through cuBLAS. Built only with RINGLLAMA_CUDA (the engine library then defines
// RINGLLAMA_HAVE_CUDA for its users).
#pragma once

#include <memory>

#include "kernels/device_info.h"  // cuda_device_count(): 0 without a GPU or driver, never an error
#include "worker/backend.h"

namespace ringllama {

// Copies the globals and every layer to GPU config.gpu once (acquire_layer/release_layer), and
// allocates the KV cache for config.max_context positions and the activations of
// config.prefill_chunk_tokens tokens (longer prompts run in chunks of that size). Throws Error
// naming the device and the size when something does not fit.
std::unique_ptr<Backend> make_cuda_backend(WeightSource& weights, const Config& config);

}  // namespace ringllama
