#include "kernels/attention_prefill.cuh"

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/attention_common.cuh"
#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows (token, head of the group) per block
constexpr int kTile = 32;                     // keys per tile: one per lane for the scores

// A block takes 16 query rows that share one kv head (rows ordered token-major, head-minor, so the
// rows of one token's GQA group sit together and share every K/V tile). Each warp keeps 4 rows.
// Scores: lane l scores key l of the tile against the warp's 4 rows (K row from shared memory, q
// broadcast). Output: lane l accumulates dimensions l + 32j of the 4 rows; p of key t comes from
// lane t by shuffle. Exponentials are base 2 with log2(e) folded into the scale.
//
// Shared memory (bf16): K tile [32][ks2 pairs], V tile [32][head_dim], Q [16][head_dim].
// ks2 (the K row length in 4-byte words) is odd, so the 32 lanes reading word p of 32 rows hit 32
// different banks.
template <int MAXJ>
__global__ void __launch_bounds__(kWarps * 32)
    attention_prefill_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                             const __nv_bfloat16* __restrict__ v, int64_t kv_stride, __nv_bfloat16* __restrict__ out,
                             int n_tokens, int64_t start_pos, int n_heads, int group, int head_dim, int ks2,
                             float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int hd2 = head_dim / 2;
  __nv_bfloat162* ks = reinterpret_cast<__nv_bfloat162*>(smem_raw);  // [kTile][ks2]
  __nv_bfloat162* vs = ks + kTile * ks2;                               // [kTile][hd2]
  __nv_bfloat162* qs = vs + kTile * hd2;                               // [kRows][hd2]
  const __nv_bfloat16* vs_h = reinterpret_cast<const __nv_bfloat16*>(vs);

  const int g = blockIdx.y;
  const int row0 = blockIdx.x * kRows;
  const int n_rows = n_tokens * group;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t q_stride = static_cast<int64_t>(n_heads) * head_dim;
  const __nv_bfloat162 zero2 = __floats2bfloat162_rn(0.0f, 0.0f);

  for (int idx = threadIdx.x; idx < kRows * hd2; idx += blockDim.x) {
    const int r = idx / hd2, p = idx % hd2, row = row0 + r;
    __nv_bfloat162 val = zero2;
    if (row < n_rows) {
      const int t = row / group, h = g * group + row % group;
      val = reinterpret_cast<const __nv_bfloat162*>(q + t * q_stride + static_cast<int64_t>(h) * head_dim)[p];
    }
    qs[idx] = val;
  }

  // Each row's last visible key (its own position); -1 for rows past the end.
  int64_t pos[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int row = row0 + warp * kRowsPerWarp + rr;
    pos[rr] = row < n_rows ? start_pos + row / group : -1;
  }
  int64_t warp_last = -1;  // the warp's last visible key over its rows
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) warp_last = pos[rr] > warp_last ? pos[rr] : warp_last;
  const int last_row = min(row0 + kRows, n_rows) - 1;
  const int64_t key_end = start_pos + last_row / group + 1;

  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][MAXJ];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) o[rr][j] = 0.0f;
  }

  for (int64_t kt0 = 0; kt0 < key_end; kt0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and, the first time, Q is written)
    for (int idx = threadIdx.x; idx < kTile * hd2; idx += blockDim.x) {
      const int t = idx / hd2, p = idx % hd2;
      const int64_t key = kt0 + t;
      __nv_bfloat162 kv = zero2, vv = zero2;  // zeros past the end: 0 * garbage could be NaN
      if (key < key_end) {
        const int64_t off = (key * kv_stride + static_cast<int64_t>(g) * head_dim) / 2 + p;
        kv = reinterpret_cast<const __nv_bfloat162*>(k)[off];
        vv = reinterpret_cast<const __nv_bfloat162*>(v)[off];
      }
      ks[t * ks2 + p] = kv;
      vs[idx] = vv;
    }
    __syncthreads();
    if (kt0 > warp_last) continue;  // every row of this warp is causally before this tile

    float s[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = 0.0f;
    const __nv_bfloat162* krow = ks + lane * ks2;
    const __nv_bfloat162* qw = qs + warp * kRowsPerWarp * hd2;
    for (int p = 0; p < hd2; ++p) {
      const float2 kf = __bfloat1622float2(krow[p]);
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const float2 qf = __bfloat1622float2(qw[rr * hd2 + p]);
        s[rr] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, s[rr]));
      }
    }

    float pr[kRowsPerWarp];
    const int64_t key = kt0 + lane;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      pr[rr] = 0.0f;
      if (kt0 > pos[rr]) continue;  // uniform over the warp; key kt0 is visible otherwise, so m stays finite
      const float sv = key <= pos[rr] ? s[rr] * scale_log2 : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(sv));
      const float corr = exp2f(m[rr] - m_new);
      pr[rr] = exp2f(sv - m_new);
      l[rr] = l[rr] * corr + warp_sum(pr[rr]);
      m[rr] = m_new;
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) o[rr][j] *= corr;
    }

    const int n_keys = static_cast<int>(min(static_cast<int64_t>(kTile), warp_last + 1 - kt0));
    for (int t = 0; t < n_keys; ++t) {
      float pt[kRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) pt[rr] = __shfl_sync(0xffffffffu, pr[rr], t);
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) {
        const int d = lane + 32 * j;
        const float vv = d < head_dim ? __bfloat162float(vs_h[t * head_dim + d]) : 0.0f;
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr) o[rr][j] = fmaf(pt[rr], vv, o[rr][j]);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int row = row0 + warp * kRowsPerWarp + rr;
    if (row >= n_rows) continue;
    const int t = row / group, h = g * group + row % group;
    __nv_bfloat16* dst = out + t * q_stride + static_cast<int64_t>(h) * head_dim;
    const float inv = 1.0f / l[rr];
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) {
      const int d = lane + 32 * j;
      if (d < head_dim) dst[d] = __float2bfloat16_rn(o[rr][j] * inv);
    }
  }
}

}  // namespace

void launch_attention_prefill(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                              int64_t kv_row_stride, __nv_bfloat16* out, int64_t n_tokens, int64_t start_pos,
                              int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale,
                              cudaStream_t stream) {
  const char* op = "launch_attention_prefill";
  KERNEL_REQUIRE(q && k_cache && v_cache && out, op, "null pointer");
  // bf16 pairs are read with 4-byte loads.
  KERNEL_REQUIRE(reinterpret_cast<uintptr_t>(q) % 4 == 0 && reinterpret_cast<uintptr_t>(k_cache) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(v_cache) % 4 == 0,
                 op, "q, k_cache and v_cache must be 4-byte aligned");
  KERNEL_REQUIRE(n_tokens > 0 && start_pos >= 0, op,
                 "need n_tokens > 0 and start_pos >= 0, got " + std::to_string(n_tokens) + ", " +
                     std::to_string(start_pos));
  check_attention_shape(op, n_heads, n_kv_heads, head_dim, kv_row_stride);
  KERNEL_REQUIRE(scale > 0.0f && std::isfinite(scale), op, "scale must be finite and > 0");
  const int64_t group = n_heads / n_kv_heads;
  KERNEL_REQUIRE(n_tokens * group <= 0x7fffffff - kRows && n_kv_heads <= 65535, op, "too many rows or kv heads");
  const int hd2 = static_cast<int>(head_dim / 2);
  const int ks2 = hd2 % 2 == 1 ? hd2 : hd2 + 1;
  const size_t smem = sizeof(__nv_bfloat162) * (static_cast<size_t>(kTile) * ks2 + static_cast<size_t>(kTile) * hd2 +
                                                static_cast<size_t>(kRows) * hd2);
  const dim3 grid(static_cast<unsigned>((n_tokens * group + kRows - 1) / kRows), static_cast<unsigned>(n_kv_heads));
  dispatch_head_dim(head_dim, op, [&](auto maxj) {
    attention_prefill_kernel<decltype(maxj)::value><<<grid, kWarps * 32, smem, stream>>>(
        q, k_cache, v_cache, kv_row_stride, out, static_cast<int>(n_tokens), start_pos, static_cast<int>(n_heads),
        static_cast<int>(group), static_cast<int>(head_dim), ks2, scale * kLog2e);
  });
  CUDA_CHECK_LAUNCH();
}

}  // namespace ringllama
