#include "kernels/attention_paged.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/attention_common.cuh"
#include "kernels/attention_paged_internal.cuh"
#include "kernels/device_math.cuh"

namespace ringllama {

namespace {

using namespace paged_detail;

// Block (tile, kv head g): 16 query rows of one item that share kv head g (rows ordered
// token-major, head-minor, so the rows of one token's GQA group share every K/V tile). Each warp
// keeps 4 rows (a decode token's group of 4 is one warp's: each K and V value is converted once
// for all four). Scores: lane l scores key l of the tile against the warp's 4 rows (K row from
// shared memory, q broadcast). Output: lane l accumulates dimensions l + 32j of the 4 rows; p of
// key t comes from lane t by shuffle. Exponentials are base 2 with log2(e) folded into the scale.
//
// Shared memory (bf16): K tile [32][ks2 pairs], V tile [32][head_dim], Q [16][head_dim], and the
// tile's 32 pool rows. ks2 (the K row length in 4-byte words) is odd, so the 32 lanes reading word
// p of 32 rows hit 32 different banks. VEC (16-byte aligned K/V rows): 16-byte loads. Loading the
// next tile into registers during this one's arithmetic, one row per warp, and Q in fp32 were each
// measured slower on an H200: the kernel is bound by its arithmetic per tile (fp32 FMAs, about
// 2400 warp instructions per 16 KiB tile at GQA 4), which tensor-core (mma) scores and P.V would cut.
template <int MAXJ, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    attention_paged_kernel(const __nv_bfloat16* __restrict__ q, int64_t q_stride, const __nv_bfloat16* __restrict__ k,
                           const __nv_bfloat16* __restrict__ v, int64_t kv_stride, int block_tokens,
                           __nv_bfloat16* __restrict__ out, int64_t out_stride, PagedAttentionBatch b, int group,
                           int head_dim, int ks2, float scale_log2, SplitPartials sp) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int hd2 = head_dim / 2;
  __nv_bfloat162* ks = reinterpret_cast<__nv_bfloat162*>(smem_raw);  // [kTile][ks2]
  __nv_bfloat162* vs = ks + kTile * ks2;                               // [kTile][hd2]
  __nv_bfloat162* qs = vs + kTile * hd2;                               // [kRows][hd2]
  int64_t* key_row = reinterpret_cast<int64_t*>(qs + kRows * hd2);     // [kTile] pool row offsets (elements)
  const __nv_bfloat16* vs_h = reinterpret_cast<const __nv_bfloat16*>(vs);

  const int item = b.tile_item[blockIdx.x];
  const int row0 = b.tile_row0[blockIdx.x];
  const int g = blockIdx.y;
  const int64_t tok0 = b.item_row0[item];
  const int n_rows = b.item_count[item] * group;
  const int64_t start_pos = b.item_start[item];
  const int32_t* table = b.block_tables + static_cast<int64_t>(item) * b.table_stride;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const __nv_bfloat162 zero2 = __floats2bfloat162_rn(0.0f, 0.0f);

  for (int idx = threadIdx.x; idx < kRows * hd2; idx += blockDim.x) {
    const int r = idx / hd2, p = idx % hd2, row = row0 + r;
    __nv_bfloat162 val = zero2;
    if (row < n_rows) {
      const int t = row / group, h = g * group + row % group;
      val = reinterpret_cast<const __nv_bfloat162*>(q + (tok0 + t) * q_stride + static_cast<int64_t>(h) * head_dim)[p];
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
  // This block's span of keys (flash-decoding): split blockIdx.z of the tile's used splits.
  const KeySpan span = key_span(key_end, sp.splits);
  const int split = blockIdx.z;
  if (split >= span.used) return;  // uniform over the block: a short context uses fewer splits
  const int64_t key_begin = split * span.chunk;
  const int64_t key_stop = min(key_end, key_begin + span.chunk);

  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][MAXJ];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) o[rr][j] = 0.0f;
  }

  const int64_t head_off = static_cast<int64_t>(g) * head_dim;
  // Spans start on a tile and end on one (or at key_end), so no tile crosses into the next span.
  for (int64_t kt0 = key_begin; kt0 < key_stop; kt0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and, the first time, Q is written)
    if (threadIdx.x < kTile) {
      const int64_t key = kt0 + threadIdx.x;
      key_row[threadIdx.x] =
          key < key_stop ? (static_cast<int64_t>(table[key / block_tokens]) * block_tokens + key % block_tokens) * kv_stride
                         : -1;
    }
    __syncthreads();
    if constexpr (VEC) {
      // 16-byte loads (8 values): a quarter of the load instructions, 4x the bytes in flight.
      const int hd8 = head_dim / 8;
      for (int idx = threadIdx.x; idx < kTile * hd8; idx += blockDim.x) {
        const int t = idx / hd8, p8 = idx % hd8;
        const int64_t at = key_row[t];
        uint4 kv = make_uint4(0, 0, 0, 0), vv = kv;  // zeros past the end: 0 * garbage could be NaN
        if (at >= 0) {
          const int64_t off = (at + head_off) / 8 + p8;
          kv = __ldg(reinterpret_cast<const uint4*>(k) + off);
          vv = __ldg(reinterpret_cast<const uint4*>(v) + off);
        }
        // K rows have an odd stride in words (no bank conflicts when reading them): 4-byte stores.
        uint32_t* kd = reinterpret_cast<uint32_t*>(ks + t * ks2 + 4 * p8);
        kd[0] = kv.x;
        kd[1] = kv.y;
        kd[2] = kv.z;
        kd[3] = kv.w;
        reinterpret_cast<uint4*>(vs + t * hd2)[p8] = vv;
      }
    } else {
      for (int idx = threadIdx.x; idx < kTile * hd2; idx += blockDim.x) {
        const int t = idx / hd2, p = idx % hd2;
        const int64_t at = key_row[t];
        __nv_bfloat162 kv = zero2, vv = zero2;  // zeros past the end: 0 * garbage could be NaN
        if (at >= 0) {
          const int64_t off = (at + head_off) / 2 + p;
          kv = reinterpret_cast<const __nv_bfloat162*>(k)[off];
          vv = reinterpret_cast<const __nv_bfloat162*>(v)[off];
        }
        ks[t * ks2 + p] = kv;
        vs[idx] = vv;
      }
    }
    __syncthreads();
    if (kt0 > warp_last) continue;  // every row of this warp is causally before this tile

    float s[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) s[rr] = 0.0f;
    const __nv_bfloat162* krow = ks + lane * ks2;
    const __nv_bfloat162* qw = qs + warp * kRowsPerWarp * hd2;
    // Unrolled so that several shared-memory loads are in flight: one warp's chain of dependent
    // loads, not arithmetic, is what a decode tile waits on. The sum order per row is unchanged.
#pragma unroll 8
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
    for (int rr = 0; rr < kRowsPerWarp; ++rr)
      online_softmax_tile(s[rr], kt0, key, pos[rr], scale_log2, pr[rr], m[rr], l[rr], o[rr]);

    const int n_keys = static_cast<int>(min(static_cast<int64_t>(kTile), warp_last + 1 - kt0));
#pragma unroll 4
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
    if (span.used > 1) {
      // A partial: unnormalized output, max and sum (a row with no key in this span: 0, -inf, 0).
      const int64_t slot = (static_cast<int64_t>(split) * sp.n_tokens + tok0 + t) * sp.n_heads + h;
      float* po = sp.o + slot * head_dim;
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) po[d] = o[rr][j];
      }
      if (lane == 0) {
        sp.ml[2 * slot] = m[rr];
        sp.ml[2 * slot + 1] = l[rr];
      }
      continue;
    }
    __nv_bfloat16* dst = out + (tok0 + t) * out_stride + static_cast<int64_t>(h) * head_dim;
    const float inv = 1.0f / l[rr];
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) {
      const int d = lane + 32 * j;
      if (d < head_dim) dst[d] = __float2bfloat16_rn(o[rr][j] * inv);
    }
  }
}

// Second pass of a split launch: per query row, out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M)
// over the tile's used splits, M = max m_s (split 0 always holds key 0, so M is finite). Tiles
// whose context needed one split were written by the first pass and are skipped here.
__global__ void __launch_bounds__(kWarps * 32)
    attention_paged_combine_kernel(__nv_bfloat16* __restrict__ out, int64_t out_stride, PagedAttentionBatch b,
                                   int group, int head_dim, SplitPartials sp) {
  __shared__ float factor[kRows][kAttentionPagedMaxSplits];
  const int item = b.tile_item[blockIdx.x];
  const int row0 = b.tile_row0[blockIdx.x];
  const int g = blockIdx.y;
  const int64_t tok0 = b.item_row0[item];
  const int n_rows = b.item_count[item] * group;
  const int last_row = min(row0 + kRows, n_rows) - 1;
  const int64_t key_end = b.item_start[item] + last_row / group + 1;
  const KeySpan span = key_span(key_end, sp.splits);
  if (span.used <= 1) return;
  auto slot_of = [&](int s, int r) {
    const int row = row0 + r, t = row / group, h = g * group + row % group;
    return (static_cast<int64_t>(s) * sp.n_tokens + tok0 + t) * sp.n_heads + h;
  };
  if (threadIdx.x < kRows && row0 + static_cast<int>(threadIdx.x) < n_rows) {
    const int r = threadIdx.x;
    float mx = -INFINITY;
    for (int s = 0; s < span.used; ++s) mx = fmaxf(mx, sp.ml[2 * slot_of(s, r)]);
    float sum = 0.0f;
    for (int s = 0; s < span.used; ++s) {
      const int64_t slot = slot_of(s, r);
      const float f = exp2f(sp.ml[2 * slot] - mx);  // 0 for a span with no visible key (m = -inf)
      factor[r][s] = f;
      sum += sp.ml[2 * slot + 1] * f;
    }
    const float inv = 1.0f / sum;
    for (int s = 0; s < span.used; ++s) factor[r][s] *= inv;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kRows * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim, d = idx % head_dim, row = row0 + r;
    if (row >= n_rows) continue;
    float acc = 0.0f;
    for (int s = 0; s < span.used; ++s) acc = fmaf(sp.o[slot_of(s, r) * head_dim + d], factor[r][s], acc);
    const int t = row / group, h = g * group + row % group;
    out[(tok0 + t) * out_stride + static_cast<int64_t>(h) * head_dim + d] = __float2bfloat16_rn(acc);
  }
}

}  // namespace

void attention_paged_tiles(const std::vector<int64_t>& count, int64_t group, std::vector<int32_t>* tile_item,
                           std::vector<int32_t>* tile_row0) {
  for (size_t i = 0; i < count.size(); ++i)
    for (int64_t r = 0; r < count[i] * group; r += kRows) {
      tile_item->push_back(static_cast<int32_t>(i));
      tile_row0->push_back(static_cast<int32_t>(r));
    }
}

size_t attention_paged_workspace_bytes(int64_t n_tokens, int64_t n_heads, int64_t head_dim, int splits) {
  return static_cast<size_t>(splits) * static_cast<size_t>(n_tokens) * static_cast<size_t>(n_heads) *
         static_cast<size_t>(head_dim + 2) * sizeof(float);
}

int attention_paged_decode_splits(int64_t n_items, int64_t n_kv_heads, int64_t max_keys, int sm_count,
                                  int blocks_per_sm, int64_t n_heads, int64_t head_dim, size_t workspace_bytes) {
  if (n_items <= 0 || n_kv_heads <= 0 || max_keys <= 0 || sm_count <= 0 || blocks_per_sm <= 0) return 1;
  const int64_t blocks = n_items * n_kv_heads;
  const int64_t wave = std::max<int64_t>(3, int64_t{blocks_per_sm} * sm_count / blocks);
  const int64_t by_keys = (max_keys + kAttentionPagedMinSplitKeys - 1) / kAttentionPagedMinSplitKeys;
  int64_t splits = std::min<int64_t>({wave, by_keys, kAttentionPagedMaxSplits});
  const size_t per_split = attention_paged_workspace_bytes(n_items, n_heads, head_dim, 1);
  if (per_split > 0) splits = std::min<int64_t>(splits, static_cast<int64_t>(workspace_bytes / per_split));
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

int attention_paged_splits(int64_t n_tiles, int64_t n_kv_heads, int64_t max_keys, int sm_count, int64_t n_tokens,
                           int64_t n_heads, int64_t head_dim, size_t workspace_bytes) {
  if (n_tiles <= 0 || n_kv_heads <= 0 || max_keys <= 0 || sm_count <= 0) return 1;
  // Enough blocks for every SM to hold 8 (each is 4 warps, and a decode tile keeps only one of
  // them busy with scores: a block waits on latency, so more of them per SM is what feeds HBM;
  // measured on an H200 against 4 per SM: equal at batch 1-16, +28% at batch 64), and no span
  // shorter than kAttentionPagedMinSplitKeys, where the second pass and the partials would cost
  // more than the parallelism brings.
  const int64_t blocks = n_tiles * n_kv_heads;
  const int64_t want = (int64_t{8} * sm_count + blocks - 1) / blocks;
  const int64_t by_keys = (max_keys + kAttentionPagedMinSplitKeys - 1) / kAttentionPagedMinSplitKeys;
  int64_t splits = std::min<int64_t>({want, by_keys, kAttentionPagedMaxSplits});
  const size_t per_split = attention_paged_workspace_bytes(n_tokens, n_heads, head_dim, 1);
  if (per_split > 0) splits = std::min<int64_t>(splits, static_cast<int64_t>(workspace_bytes / per_split));
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

void launch_attention_paged(const __nv_bfloat16* q, int64_t q_row_stride, const __nv_bfloat16* k_pool,
                            const __nv_bfloat16* v_pool, int64_t kv_row_stride, int64_t block_tokens,
                            __nv_bfloat16* out, int64_t out_row_stride, const PagedAttentionBatch& batch,
                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale, cudaStream_t stream) {
  launch_attention_paged(q, q_row_stride, k_pool, v_pool, kv_row_stride, block_tokens, out, out_row_stride, batch,
                         n_heads, n_kv_heads, head_dim, scale, stream, PagedAttentionSplit{});
}

void launch_attention_paged(const __nv_bfloat16* q, int64_t q_row_stride, const __nv_bfloat16* k_pool,
                            const __nv_bfloat16* v_pool, int64_t kv_row_stride, int64_t block_tokens,
                            __nv_bfloat16* out, int64_t out_row_stride, const PagedAttentionBatch& batch,
                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale, cudaStream_t stream,
                            const PagedAttentionSplit& split) {
  const char* op = "launch_attention_paged";
  KERNEL_REQUIRE(q && k_pool && v_pool && out, op, "null pointer");
  KERNEL_REQUIRE(batch.item_row0 && batch.item_count && batch.item_start && batch.block_tables && batch.tile_item &&
                     batch.tile_row0,
                 op, "null batch array");
  // bf16 pairs are read with 4-byte loads.
  KERNEL_REQUIRE(reinterpret_cast<uintptr_t>(q) % 4 == 0 && reinterpret_cast<uintptr_t>(k_pool) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(v_pool) % 4 == 0 && q_row_stride % 2 == 0,
                 op, "q, k_pool and v_pool must be 4-byte aligned and q_row_stride even");
  check_attention_shape(op, n_heads, n_kv_heads, head_dim, kv_row_stride);
  KERNEL_REQUIRE(q_row_stride >= n_heads * head_dim && out_row_stride >= n_heads * head_dim, op,
                 "q and out rows must hold n_heads * head_dim values");
  KERNEL_REQUIRE(block_tokens > 0 && block_tokens <= 0x7fffffff, op, "block_tokens must be in [1, 2^31)");
  KERNEL_REQUIRE(batch.table_stride > 0, op, "table_stride must be > 0");
  KERNEL_REQUIRE(scale > 0.0f && std::isfinite(scale), op, "scale must be finite and > 0");
  KERNEL_REQUIRE(batch.n_tiles > 0 && batch.n_tiles <= 0x7fffffff && n_kv_heads <= 65535, op,
                 "need 1 <= n_tiles < 2^31 and n_kv_heads <= 65535");
  KERNEL_REQUIRE(split.splits >= 1 && split.splits <= kAttentionPagedMaxSplits, op,
                 "splits must be in [1, " + std::to_string(kAttentionPagedMaxSplits) + "], got " +
                     std::to_string(split.splits));
  SplitPartials sp;
  sp.splits = split.splits;
  if (split.splits > 1) {
    const size_t need = attention_paged_workspace_bytes(split.n_tokens, n_heads, head_dim, split.splits);
    KERNEL_REQUIRE(split.n_tokens > 0 && split.workspace && split.workspace_bytes >= need &&
                       reinterpret_cast<uintptr_t>(split.workspace) % 4 == 0,
                   op, "a split launch needs n_tokens > 0 and a 4-byte aligned workspace of " + std::to_string(need) +
                           " bytes, got " + std::to_string(split.workspace_bytes));
    sp.n_tokens = split.n_tokens;
    sp.n_heads = n_heads;
    sp.o = static_cast<float*>(split.workspace);
    sp.ml = sp.o + static_cast<size_t>(split.splits) * split.n_tokens * n_heads * head_dim;
  }
  const int64_t group = n_heads / n_kv_heads;
  const int hd2 = static_cast<int>(head_dim / 2);
  const int ks2 = hd2 % 2 == 1 ? hd2 : hd2 + 1;
  const size_t smem = sizeof(__nv_bfloat162) * (static_cast<size_t>(kTile) * ks2 + static_cast<size_t>(kTile) * hd2 +
                                                static_cast<size_t>(kRows) * hd2) +
                      sizeof(int64_t) * kTile + 8;  // + 8: the int64 table starts 8-byte aligned
  // 16-byte loads where every K/V row piece starts on 16 bytes (the V tile does too: its offset in
  // shared memory, 128 * ks2 bytes, and its rows, 2 * head_dim bytes, are multiples of 16).
  const bool vec = head_dim % 8 == 0 && kv_row_stride % 8 == 0 && reinterpret_cast<uintptr_t>(k_pool) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(v_pool) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(batch.n_tiles), static_cast<unsigned>(n_kv_heads),
                  static_cast<unsigned>(split.splits));
  // A decode step with a group of at most one warp's rows: the decode kernel, where it fits.
  const bool decoded = batch.decode_only && group <= kRowsPerWarp &&
                       launch_attention_paged_decode(q, q_row_stride, k_pool, v_pool, kv_row_stride, block_tokens,
                                                     out, out_row_stride, batch, group, n_kv_heads, head_dim,
                                                     scale * kLog2e, vec, sp, stream);
  if (!decoded) {
    dispatch_head_dim(head_dim, op, [&](auto maxj) {
      constexpr int J = decltype(maxj)::value;
      auto kernel = vec ? attention_paged_kernel<J, true> : attention_paged_kernel<J, false>;
      kernel<<<grid, kWarps * 32, smem, stream>>>(q, q_row_stride, k_pool, v_pool, kv_row_stride,
                                                 static_cast<int>(block_tokens), out, out_row_stride, batch,
                                                 static_cast<int>(group), static_cast<int>(head_dim), ks2,
                                                 scale * kLog2e, sp);
    });
    CUDA_CHECK_LAUNCH();
  }
  if (split.splits > 1) {
    attention_paged_combine_kernel<<<dim3(static_cast<unsigned>(batch.n_tiles), static_cast<unsigned>(n_kv_heads)),
                                     kWarps * 32, 0, stream>>>(out, out_row_stride, batch, static_cast<int>(group),
                                                               static_cast<int>(head_dim), sp);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace ringllama
