// The CPU backend's operations: the same forward as transformers' LlamaForCausalLM in float32,
// from bf16 weights. They are the reference the CUDA kernels are checked against, so each one
// states the exact arithmetic it performs. Loops run on a ThreadPool when one is given (nullptr:
// this thread only); the result is the same bits either way.
#pragma once

#include <cstdint>
#include <vector>

#include "common/bf16.h"
#include "common/model_config.h"
#include "worker/thread_pool.h"
#include "worker/weights.h"

namespace ringllama::cpu {

// y[t, o] = sum_i x[t, i] * w[o, i] for t < n_tokens, o < out: a linear layer with the weight in
// transformers' [out, in] layout. fp32 accumulation; the bf16 rows are widened as they are used.
void matmul_bf16(ThreadPool* pool, const float* x, int64_t n_tokens, int64_t in, const bf16_t* w, int64_t out, float* y);

// The same for a weight in any stored format: bf16 goes to matmul_bf16; a packed weight is
// dequantized (common/quant.h) a block of rows at a time into float32 and multiplied like the
// widened bf16 block, so each output is the fp32 dot product of x with the dequantized row, in
// the same order whatever n_tokens. Throws Error when w is not [out, in].
void matmul(ThreadPool* pool, const float* x, int64_t n_tokens, int64_t in, const MatrixView& w, int64_t out, float* y);

// y[t] = w * (x[t] * rsqrt(mean(x[t]^2) + eps)), as LlamaRMSNorm in float32. x and y may alias.
void rms_norm(const float* x, const bf16_t* w, int64_t n_tokens, int64_t dim, float eps, float* y);

// The rotation angles of one model: inv_freq as float32 (transformers keeps it in float32).
std::vector<float> rope_inv_freq_f32(const ModelConfig& m);

// Rotates n_heads heads of head_dim values in place at position pos, rotate_half style: value i
// pairs with value i + head_dim/2; angle = float(pos) * inv_freq[i] in float32.
void rope(float* x, int64_t n_heads, int64_t head_dim, int64_t pos, const std::vector<float>& inv_freq);

// gate[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
void silu_mul(float* gate, const float* up, int64_t n);

// One layer's paged keys and values (worker/kv_blocks.h): position p of the sequence is pool row
// table[p / block_tokens] * block_tokens + p % block_tokens, a row being kv_dim floats of k or v.
struct KvPages {
  const float* k = nullptr;
  const float* v = nullptr;
  const int32_t* table = nullptr;
  int64_t block_tokens = 0;
  int64_t row(int64_t p) const { return table[p / block_tokens] * block_tokens + p % block_tokens; }
};

// Causal GQA attention of n_tokens queries ([n_tokens, q_dim], rotated) at positions
// [start, start + n_tokens) of one sequence over its cached keys and values (keys rotated):
// scores q.k * (1/sqrt(head_dim)) in float32, softmax in float32, out [n_tokens, q_dim].
void attention(ThreadPool* pool, const ModelConfig& m, const float* q, const KvPages& kv, int64_t n_tokens,
               int64_t start, float* out);

}  // namespace ringllama::cpu
