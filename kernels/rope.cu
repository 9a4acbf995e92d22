#include "kernels/rope.cuh"

#include <string>

#include "kernels/check.h"

namespace ringllama {

namespace {

// One thread per (token, head, pair); the q heads come first, then the k heads.
__global__ void rope_kernel(__nv_bfloat16* __restrict__ q, int64_t q_row_stride, int n_heads,
                            __nv_bfloat16* __restrict__ k, int64_t k_row_stride, int n_kv_heads, int head_dim,
                            const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                            int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int half = head_dim / 2;
  const int heads = n_heads + n_kv_heads;
  const int i = static_cast<int>(idx % half);
  const int head = static_cast<int>((idx / half) % heads);
  const int64_t t = idx / (static_cast<int64_t>(half) * heads);
  __nv_bfloat16* x = head < n_heads ? q + t * q_row_stride + static_cast<int64_t>(head) * head_dim
                                    : k + t * k_row_stride + static_cast<int64_t>(head - n_heads) * head_dim;
  // sincosf, not __sincosf: the fast version loses accuracy at the large angles of long contexts.
  float s, c;
  sincosf(static_cast<float>(positions[t]) * inv_freq[i], &s, &c);
  const float a = __bfloat162float(x[i]);
  const float b = __bfloat162float(x[i + half]);
  x[i] = __float2bfloat16_rn(a * c - b * s);
  x[i + half] = __float2bfloat16_rn(b * c + a * s);
}

}  // namespace

void launch_rope(__nv_bfloat16* q, int64_t q_row_stride, int64_t n_heads, __nv_bfloat16* k, int64_t k_row_stride,
                 int64_t n_kv_heads, int64_t head_dim, const int32_t* positions, const float* inv_freq,
                 int64_t n_tokens, cudaStream_t stream) {
  const char* op = "launch_rope";
  KERNEL_REQUIRE(q && k && positions && inv_freq, op, "null pointer");
  KERNEL_REQUIRE(n_tokens > 0 && n_heads > 0 && n_kv_heads > 0, op,
                 "sizes must be > 0, got n_tokens=" + std::to_string(n_tokens) + " n_heads=" +
                     std::to_string(n_heads) + " n_kv_heads=" + std::to_string(n_kv_heads));
  KERNEL_REQUIRE(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= 4096, op,
                 "head_dim must be even and in [2, 4096], got " + std::to_string(head_dim));
  KERNEL_REQUIRE(q_row_stride >= n_heads * head_dim, op, "q_row_stride shorter than n_heads * head_dim");
  KERNEL_REQUIRE(k_row_stride >= n_kv_heads * head_dim, op, "k_row_stride shorter than n_kv_heads * head_dim");
  KERNEL_REQUIRE(n_heads + n_kv_heads <= 0x7fffffff, op, "too many heads");
  const int64_t total = n_tokens * (n_heads + n_kv_heads) * (head_dim / 2);
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  KERNEL_REQUIRE(blocks <= 0x7fffffff, op, "too much work for one launch");
  rope_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      q, q_row_stride, static_cast<int>(n_heads), k, k_row_stride, static_cast<int>(n_kv_heads),
      static_cast<int>(head_dim), positions, inv_freq, total);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
