// Causal attention of a run of new tokens of one sequence (a prompt or a chunk of one) over the
// KV cache, with grouped-query heads. Flash-attention style: keys and values stream through shared
// memory in tiles of 32 with an online softmax, so memory does not grow with the prompt's square.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ringllama {

// q:   [n_tokens, n_heads * head_dim] bf16, RoPE applied; token t sits at position start_pos + t.
// k_cache, v_cache: this layer's keys/values, row p = position p, row stride kv_row_stride
//      (elements); rows [0, start_pos + n_tokens) must be written (the new tokens' rows included).
// out: [n_tokens, n_heads * head_dim] bf16. Query head h reads kv head h / (n_heads / n_kv_heads).
// scale: softmax scale, 1/sqrt(head_dim) for Llama. head_dim: even, <= 256.
void launch_attention_prefill(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                              int64_t kv_row_stride, __nv_bfloat16* out, int64_t n_tokens, int64_t start_pos,
                              int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale,
                              cudaStream_t stream);

}  // namespace ringllama
