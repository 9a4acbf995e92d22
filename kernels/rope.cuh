// Rotary position embedding, in place, on the queries and the keys of a run of tokens.
// Pairs are (i, i + head_dim/2) ("rotate_half", as transformers' Llama): for i < head_dim/2,
//   a' = a cos(p f_i) - b sin(p f_i),  b' = b cos(p f_i) + a sin(p f_i),  a = x[i], b = x[i + half].
// The angle p·f_i is formed in fp32 (as transformers does) and the rotation in fp32, rounded once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ringllama {

// q: [n_tokens rows of q_row_stride] with n_heads heads of head_dim each at the start of a row;
// k: likewise with n_kv_heads heads (k may point into the KV cache); positions: [n_tokens] int32;
// inv_freq: [head_dim / 2] float (rope_inv_freq() of the model, llama3 scaling applied).
void launch_rope(__nv_bfloat16* q, int64_t q_row_stride, int64_t n_heads, __nv_bfloat16* k, int64_t k_row_stride,
                 int64_t n_kv_heads, int64_t head_dim, const int32_t* positions, const float* inv_freq,
                 int64_t n_tokens, cudaStream_t stream);

}  // namespace ringllama
