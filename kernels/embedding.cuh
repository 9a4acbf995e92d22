// Embedding lookup: out[t, :] = table[ids[t], :], converted to the residual stream's type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/elem_type.h"

namespace ringllama {

// ids: [n_tokens] int32 on the device, each in [0, vocab) (the caller checks them on the host:
// the kernel does not). table: [vocab, dim] bf16. out: [n_tokens, dim] of out_type.
void launch_embedding(const int32_t* ids, int64_t n_tokens, const __nv_bfloat16* table, int64_t vocab,
                      int64_t dim, void* out, ElemType out_type, cudaStream_t stream);

}  // namespace ringllama
