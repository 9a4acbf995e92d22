// New keys and values into the paged KV cache: row t of the step goes to pool row slots[t]
// (block * block_tokens + position % block_tokens, worker/kv_blocks.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ringllama {

// k, v: [n_rows] rows of kv_dim bf16 at row stride src_row_stride (e.g. columns of a fused QKV
// output); slots: [n_rows] int32 on the device; k_pool, v_pool: rows of pool_row_stride elements.
// kv_dim, both strides and the pointers must be even (4-byte copies).
void launch_kv_store(const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t src_row_stride, int64_t n_rows,
                     int64_t kv_dim, const int32_t* slots, __nv_bfloat16* k_pool, __nv_bfloat16* v_pool,
                     int64_t pool_row_stride, cudaStream_t stream);

}  // namespace ringllama
