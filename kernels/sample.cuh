// Sampling on the GPU: one token per row of logits, each row with its own temperature, top_k,
// top_p, seed and step. The rule (kernels/sample_common.h) is the CPU sampler's
// (worker/sampler.h): for the same logits and (seed, step) both pick the same token.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernels/sample_common.h"

namespace ringllama {

// Bytes of device workspace launch_sample needs for `rows` rows of `vocab` logits (may be 0; the
// caller still passes what it has, so that the kernel may use some later without new plumbing).
size_t sample_workspace_bytes(int rows, int vocab);

// logits: [rows, vocab] fp32, row r at logits + r * row_stride (row_stride >= vocab elements).
// params_device: [rows] SampleParams in device memory; out_tokens: [rows] int32 in [0, vocab).
// A row with temperature 0 takes the argmax (lowest index on ties, NaN as -inf); others draw with
// softmax(logits / T), top_k, then top_p. 1 <= rows, 1 <= vocab <= kSampleMaxVocab.
void launch_sample(const float* logits, int rows, int vocab, int64_t row_stride, const SampleParams* params_device,
                   int32_t* out_tokens, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace ringllama
