#include "kernels/attention_decode.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/attention_common.cuh"
#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxRows = 8;          // query heads of one kv group per block (larger groups use more blocks)
constexpr int kMinKeysPerSplit = 64; // below this a span costs more to merge than it saves

// Block (kv head g, row chunk c, span s): query heads g*group + c*8 + [0, rows) over keys
// [s*chunk, min((s+1)*chunk, n_keys)). Warps take tiles of 32 keys in turn; lane l scores key l of
// its tile against every row, reading the key row straight from global memory (each key is used
// by all rows of the group in registers, so shared memory would only add a copy). Output: lane l
// accumulates dimensions l + 32j; p of key t comes from lane t by shuffle. The 4 warps merge
// through shared memory at the end, and the block writes its span's partial (o, max, sum).
template <int MAXJ>
__global__ void __launch_bounds__(kWarps * 32)
    attention_decode_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                            const __nv_bfloat16* __restrict__ v, int64_t kv_stride, int n_keys, int n_heads,
                            int group, int head_dim, int row_chunks, int chunk, float scale_log2,
                            float* __restrict__ part_o, float* __restrict__ part_ml) {
  extern __shared__ __align__(16) float smem_f[];
  float* qs = smem_f;                            // [kMaxRows][head_dim], scaled by scale * log2(e)
  float* wo = qs + kMaxRows * head_dim;          // [kWarps][kMaxRows][head_dim]
  float* wm = wo + kWarps * kMaxRows * head_dim; // [kWarps][kMaxRows]
  float* wl = wm + kWarps * kMaxRows;            // [kWarps][kMaxRows]

  const int g = blockIdx.x / row_chunks;
  const int c = blockIdx.x % row_chunks;
  const int h0 = g * group + c * kMaxRows;
  const int rows = min(kMaxRows, group - c * kMaxRows);
  const int split = blockIdx.y;
  const int k0 = split * chunk;
  const int k1 = min(k0 + chunk, n_keys);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int hd2 = head_dim / 2;

  // The rows' heads are adjacent in q.
  for (int idx = threadIdx.x; idx < rows * head_dim; idx += blockDim.x)
    qs[idx] = __bfloat162float(q[static_cast<int64_t>(h0) * head_dim + idx]) * scale_log2;
  __syncthreads();

  float m[kMaxRows], l[kMaxRows], o[kMaxRows][MAXJ];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) o[r][j] = 0.0f;
  }

  const int64_t head_off = static_cast<int64_t>(g) * head_dim;
  for (int t0 = k0 + 32 * warp; t0 < k1; t0 += 32 * kWarps) {
    const int key = t0 + lane;
    const bool valid = key < k1;
    float s[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) s[r] = 0.0f;
    if (valid) {
      const __nv_bfloat162* krow = reinterpret_cast<const __nv_bfloat162*>(k + key * kv_stride + head_off);
      for (int p = 0; p < hd2; ++p) {
        const float2 kf = __bfloat1622float2(krow[p]);
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          if (r < rows) {
            const float2 qf = reinterpret_cast<const float2*>(qs + r * head_dim)[p];
            s[r] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, s[r]));
          }
        }
      }
    }
    // Lane 0's key (t0 < k1) is always valid, so every max below is finite.
    float pr[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      pr[r] = 0.0f;
      if (r >= rows) continue;  // uniform over the block
      const float sv = valid ? s[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sv));
      const float corr = exp2f(m[r] - m_new);
      pr[r] = exp2f(sv - m_new);
      l[r] = l[r] * corr + warp_sum(pr[r]);
      m[r] = m_new;
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) o[r][j] *= corr;
    }
    const int n_valid = min(32, k1 - t0);
    for (int t = 0; t < n_valid; ++t) {
      const __nv_bfloat16* vrow = v + static_cast<int64_t>(t0 + t) * kv_stride + head_off;
      float vv[MAXJ];
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) {
        const int d = lane + 32 * j;
        vv[j] = d < head_dim ? __bfloat162float(vrow[d]) : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        const float pt = __shfl_sync(0xffffffffu, pr[r], t);
#pragma unroll
        for (int j = 0; j < MAXJ; ++j) o[r][j] = fmaf(pt, vv[j], o[r][j]);
      }
    }
  }

  // Merge the warps. A warp that got no tile has m = -inf, l = 0, o = 0 and weighs exp2(-inf) = 0;
  // warp 0 always has the span's first tile, so the merged max is finite.
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r >= rows) continue;
    if (lane == 0) {
      wm[warp * kMaxRows + r] = m[r];
      wl[warp * kMaxRows + r] = l[r];
    }
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) {
      const int d = lane + 32 * j;
      if (d < head_dim) wo[(warp * kMaxRows + r) * head_dim + d] = o[r][j];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim, d = idx % head_dim;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, wm[w * kMaxRows + r]);
    float acc = 0.0f, sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(wm[w * kMaxRows + r] - mx);
      acc += wo[(w * kMaxRows + r) * head_dim + d] * f;
      sum += wl[w * kMaxRows + r] * f;
    }
    const int64_t slot = static_cast<int64_t>(split) * n_heads + h0 + r;
    part_o[slot * head_dim + d] = acc;
    if (d == 0) {
      part_ml[slot * 2] = mx;
      part_ml[slot * 2 + 1] = sum;
    }
  }
}

// One block per query head: out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M).
__global__ void attention_decode_merge_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                              int n_splits, int n_heads, int head_dim,
                                              __nv_bfloat16* __restrict__ out) {
  const int h = blockIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < n_splits; ++s) mx = fmaxf(mx, part_ml[(static_cast<int64_t>(s) * n_heads + h) * 2]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f, sum = 0.0f;
    for (int s = 0; s < n_splits; ++s) {
      const int64_t slot = static_cast<int64_t>(s) * n_heads + h;
      const float f = exp2f(part_ml[slot * 2] - mx);
      acc += part_o[slot * head_dim + d] * f;
      sum += part_ml[slot * 2 + 1] * f;
    }
    out[static_cast<int64_t>(h) * head_dim + d] = __float2bfloat16_rn(acc / sum);
  }
}

}  // namespace

size_t attention_decode_workspace_floats(int64_t n_heads, int64_t head_dim, int64_t max_splits) {
  return static_cast<size_t>(max_splits) * static_cast<size_t>(n_heads) * static_cast<size_t>(head_dim + 2);
}

int launch_attention_decode(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                            int64_t kv_row_stride, __nv_bfloat16* out, int64_t n_keys, int64_t n_heads,
                            int64_t n_kv_heads, int64_t head_dim, float scale, float* workspace,
                            size_t workspace_floats, int target_blocks, cudaStream_t stream) {
  const char* op = "launch_attention_decode";
  KERNEL_REQUIRE(q && k_cache && v_cache && out && workspace, op, "null pointer");
  // bf16 pairs are read with 4-byte loads.
  KERNEL_REQUIRE(reinterpret_cast<uintptr_t>(q) % 4 == 0 && reinterpret_cast<uintptr_t>(k_cache) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(v_cache) % 4 == 0,
                 op, "q, k_cache and v_cache must be 4-byte aligned");
  KERNEL_REQUIRE(n_keys > 0 && n_keys <= 0x7fffffff - 32 * kWarps, op,
                 "n_keys must be in [1, 2^31), got " + std::to_string(n_keys));
  check_attention_shape(op, n_heads, n_kv_heads, head_dim, kv_row_stride);
  KERNEL_REQUIRE(scale > 0.0f && std::isfinite(scale), op, "scale must be finite and > 0");
  KERNEL_REQUIRE(n_heads <= 0x7fffffff, op, "too many heads");
  const size_t per_split = attention_decode_workspace_floats(n_heads, head_dim, 1);
  const int64_t fit = static_cast<int64_t>(workspace_floats / per_split);
  KERNEL_REQUIRE(fit >= 1, op,
                 "workspace of " + std::to_string(workspace_floats) + " floats is under one span's " +
                     std::to_string(per_split));
  const int64_t group = n_heads / n_kv_heads;
  const int64_t row_chunks = (group + kMaxRows - 1) / kMaxRows;
  const int64_t base_blocks = n_kv_heads * row_chunks;
  KERNEL_REQUIRE(base_blocks <= 0x7fffffff, op, "too many heads");

  int64_t splits = std::max<int64_t>(1, (std::max(target_blocks, 1) + base_blocks - 1) / base_blocks);
  splits = std::min(splits, (n_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  splits = std::max<int64_t>(1, std::min({splits, fit, int64_t{65535}}));
  // Whole tiles per span, and no empty span: recount after rounding.
  int64_t chunk = (n_keys + splits - 1) / splits;
  chunk = (chunk + 31) / 32 * 32;
  splits = (n_keys + chunk - 1) / chunk;

  float* part_o = workspace;
  float* part_ml = workspace + splits * n_heads * head_dim;
  const size_t smem = sizeof(float) * (static_cast<size_t>(kMaxRows) * head_dim +
                                       static_cast<size_t>(kWarps) * kMaxRows * head_dim + 2 * kWarps * kMaxRows);
  const dim3 grid(static_cast<unsigned>(base_blocks), static_cast<unsigned>(splits));
  dispatch_head_dim(head_dim, op, [&](auto maxj) {
    attention_decode_kernel<decltype(maxj)::value><<<grid, kWarps * 32, smem, stream>>>(
        q, k_cache, v_cache, kv_row_stride, static_cast<int>(n_keys), static_cast<int>(n_heads),
        static_cast<int>(group), static_cast<int>(head_dim), static_cast<int>(row_chunks), static_cast<int>(chunk),
        scale * kLog2e, part_o, part_ml);
  });
  CUDA_CHECK_LAUNCH();
  attention_decode_merge_kernel<<<static_cast<unsigned>(n_heads), 128, 0, stream>>>(
      part_o, part_ml, static_cast<int>(splits), static_cast<int>(n_heads), static_cast<int>(head_dim), out);
  CUDA_CHECK_LAUNCH();
  return static_cast<int>(splits);
}

}  // namespace ringllama
