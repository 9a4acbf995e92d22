// Attention of one new token of one sequence over its KV cache (decode), with grouped-query heads.
// Long contexts are split over the sequence: each block scores a span of keys and writes an
// unnormalised partial output with its max and sum; a second kernel merges the spans. Without the
// split a 4096-token context would run on n_kv_heads blocks, a few percent of the chip.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace ringllama {

// Floats of workspace that launch_attention_decode needs for up to max_splits spans.
size_t attention_decode_workspace_floats(int64_t n_heads, int64_t head_dim, int64_t max_splits);

// q:   [n_heads * head_dim] bf16, RoPE applied, the token at position n_keys - 1.
// k_cache, v_cache: rows [0, n_keys) of this layer (the new token's row included), row stride
//      kv_row_stride elements.
// out: [n_heads * head_dim] bf16.
// workspace: attention_decode_workspace_floats(n_heads, head_dim, S) floats; the split count is
//      at most S. target_blocks: how many blocks to aim for (about 2 per multiprocessor).
// Returns the number of spans used (for tests).
int launch_attention_decode(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                            int64_t kv_row_stride, __nv_bfloat16* out, int64_t n_keys, int64_t n_heads,
                            int64_t n_kv_heads, int64_t head_dim, float scale, float* workspace,
                            size_t workspace_floats, int target_blocks, cudaStream_t stream);

}  // namespace ringllama
