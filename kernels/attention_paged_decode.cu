// The decode first pass of the paged attention (kernels/attention_paged_internal.cuh): a decode
// token's GQA group is at most one warp's 4 rows, so the old kernel left three of a block's four
// warps idle; here all four read and score different keys of the same rows.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/attention_common.cuh"
#include "kernels/attention_paged_internal.cuh"
#include "kernels/check.h"
#include "kernels/device_math.cuh"

namespace ringllama {
namespace paged_detail {
namespace {

// cp.async (sm_80+): global to shared memory without registers, so a warp's next tile is in
// flight while it computes this one. Bytes past `valid` are zero-filled (keys past the span: a
// zero times garbage could be NaN). Older GPUs load synchronously.
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
#else
  if constexpr (BYTES == 16)
    *static_cast<uint4*>(dst) = valid ? __ldg(static_cast<const uint4*>(src)) : make_uint4(0, 0, 0, 0);
  else
    *static_cast<uint32_t*>(dst) = valid ? __ldg(static_cast<const unsigned int*>(src)) : 0u;
#endif
}
__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Decode (every item one token, group <= 4): block (item, kv head g, split) holds the token's
// ROWS (>= group) query rows, and its 4 warps take different tiles of the span's keys (warp w:
// tiles w, w + 4, ...), each with its own online softmax; the warps' states are merged at the end.
// A tile is one warp's alone (its own 32 K and V rows in shared memory), so the loop needs no
// block barrier, and each warp pipelines its own loads: K of the next tile is issued as soon as
// this tile's scores are read, V of the next as soon as this one's P.V is done.
//
// Per warp (words of 4 bytes): K [32][kstr], V [32][hd2]. VEC: kstr = hd2 + 4, rows start on
// 16 bytes and each lane reads its key's row 16 bytes at a time (8 lanes per phase land on 8
// distinct 4-bank groups); otherwise kstr is odd and reads are single words, as in the kernel
// above. Q: [ROWS][head_dim] fp32 after the four warps' tiles. Output: lane l keeps dimension
// pairs l + 32jj (one 4-byte V read per key). The merge reuses the tiles' memory.
// Three blocks per SM is what shared memory allows at head_dim 128; saying so also keeps ptxas
// from spilling (it did, at 96 registers, without the hint).
template <int MAXJ, bool VEC, int ROWS>
__global__ void __launch_bounds__(kWarps * 32, 3)
    attention_paged_decode_kernel(const __nv_bfloat16* __restrict__ q, int64_t q_stride,
                                  const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                  int64_t kv_stride, int block_tokens, __nv_bfloat16* __restrict__ out,
                                  int64_t out_stride, PagedAttentionBatch b, int group, int head_dim, int kstr,
                                  float scale_log2, SplitPartials sp) {
  constexpr int NP = MAXJ >= 2 ? MAXJ / 2 : 1;  // dimension pairs per lane
  constexpr int PW = VEC ? 4 : 1;               // words per load
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int hd2 = head_dim / 2;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  uint32_t* kw = reinterpret_cast<uint32_t*>(smem_raw) + warp * kTile * (kstr + hd2);
  uint32_t* vw = kw + kTile * kstr;
  float* qs = reinterpret_cast<float*>(reinterpret_cast<uint32_t*>(smem_raw) + kWarps * kTile * (kstr + hd2));

  const int item = b.tile_item[blockIdx.x];
  const int row0 = b.tile_row0[blockIdx.x];
  const int g = blockIdx.y;
  const int64_t tok0 = b.item_row0[item];
  const int n_rows = b.item_count[item] * group;
  const int nr = min(ROWS, n_rows - row0);
  const int64_t start_pos = b.item_start[item];
  const int32_t* table = b.block_tables + static_cast<int64_t>(item) * b.table_stride;
  // The same span rule as the kernel above and the combine kernel (kRows, not ROWS).
  const int last_row = min(row0 + kRows, n_rows) - 1;
  const int64_t key_end = start_pos + last_row / group + 1;
  const KeySpan span = key_span(key_end, sp.splits);
  const int split = blockIdx.z;
  if (split >= span.used) return;  // uniform over the block
  const int64_t key_begin = split * span.chunk;
  const int64_t key_stop = min(key_end, key_begin + span.chunk);
  const int n_tiles = static_cast<int>((key_stop - key_begin + kTile - 1) / kTile);
  const int64_t head_off = static_cast<int64_t>(g) * head_dim;

  // A tile's pool rows, lane = key (-1 past the span), and its K or V pieces into this warp's
  // buffer: piece i of row t is (t, p) = (i / np, i % np), advanced by 32 pieces per step.
  const int np = hd2 / PW;
  auto tile_rows = [&](int tile) -> int64_t {
    const int64_t key = key_begin + static_cast<int64_t>(tile) * kTile + lane;
    if (key >= key_stop) return -1;
    return (static_cast<int64_t>(table[key / block_tokens]) * block_tokens + key % block_tokens) * kv_stride + head_off;
  };
  auto issue = [&](const __nv_bfloat16* src, uint32_t* dst, int stride, int64_t rows) {
    int t = lane / np, p = lane % np;
    const int dt = kTile / np, dp = kTile % np;
    for (int i = lane; i < kTile * np; i += 32) {
      const int64_t at = __shfl_sync(0xffffffffu, rows, t);
      const bool ok = at >= 0;
      copy_async<4 * PW>(dst + t * stride + p * PW, ok ? src + at + 2 * PW * p : src, ok);
      t += dt;
      p += dp;
      if (p >= np) p -= np, ++t;
    }
    copy_commit();
  };
  // Shuffles in issue() need every lane: the loop bound is warp-uniform (kTile * np is).

  if (warp < n_tiles) {
    const int64_t rows = tile_rows(warp);
    issue(k, kw, kstr, rows);
    issue(v, vw, hd2, rows);
  }
  for (int idx = threadIdx.x; idx < ROWS * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim, d = idx % head_dim, row = row0 + r;
    float val = 0.0f;
    if (r < nr) {
      const int t = row / group, h = g * group + row % group;
      val = __bfloat162float(q[(tok0 + t) * q_stride + static_cast<int64_t>(h) * head_dim + d]);
    }
    qs[idx] = val;
  }
  __syncthreads();

  // Each row's last visible key in this span; -1 for rows past the end.
  int64_t last[ROWS];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) last[rr] = rr < nr ? min(start_pos + (row0 + rr) / group, key_stop - 1) : -1;
  float m[ROWS], l[ROWS];
  float2 o[ROWS][NP];
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int jj = 0; jj < NP; ++jj) o[rr][jj] = make_float2(0.0f, 0.0f);
  }

  for (int tile = warp; tile < n_tiles; tile += kWarps) {
    const int64_t kt0 = key_begin + static_cast<int64_t>(tile) * kTile;
    // The next tile's pool rows: their block-table reads are waited on during this tile's scores.
    const int next = tile + kWarps;
    const int64_t next_rows = next < n_tiles ? tile_rows(next) : -1;
    copy_wait<1>();  // K of this tile (V may still be in flight)
    __syncwarp();
    float s[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) s[rr] = 0.0f;
    if constexpr (VEC) {
      const uint4* krow = reinterpret_cast<const uint4*>(kw + lane * kstr);
      const int hd8 = head_dim / 8;
#pragma unroll 2
      for (int p = 0; p < hd8; ++p) {
        const uint4 kk = krow[p];
        // bf16 to fp32 is exact as a shift: the even element is the low half of each word.
        const float k0 = __uint_as_float(kk.x << 16), k1 = __uint_as_float(kk.x & 0xffff0000u);
        const float k2 = __uint_as_float(kk.y << 16), k3 = __uint_as_float(kk.y & 0xffff0000u);
        const float k4 = __uint_as_float(kk.z << 16), k5 = __uint_as_float(kk.z & 0xffff0000u);
        const float k6 = __uint_as_float(kk.w << 16), k7 = __uint_as_float(kk.w & 0xffff0000u);
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          const float4* qr = reinterpret_cast<const float4*>(qs + rr * head_dim + 8 * p);
          const float4 qa = qr[0], qb = qr[1];
          // The pair order of the word path below: (even, odd) per pair, odd first into the sum.
          float a = s[rr];
          a = fmaf(qa.x, k0, fmaf(qa.y, k1, a));
          a = fmaf(qa.z, k2, fmaf(qa.w, k3, a));
          a = fmaf(qb.x, k4, fmaf(qb.y, k5, a));
          s[rr] = fmaf(qb.z, k6, fmaf(qb.w, k7, a));
        }
      }
    } else {
      const __nv_bfloat162* krow = reinterpret_cast<const __nv_bfloat162*>(kw + lane * kstr);
#pragma unroll 4
      for (int p = 0; p < hd2; ++p) {
        const float2 kf = __bfloat1622float2(krow[p]);
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          const float2 qf = reinterpret_cast<const float2*>(qs + rr * head_dim)[p];
          s[rr] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, s[rr]));
        }
      }
    }
    __syncwarp();  // every lane has read its K row: the buffer takes the next tile's
    if (next < n_tiles) issue(k, kw, kstr, next_rows);
    else copy_commit();  // an empty group keeps the wait counts below the same

    float pr[ROWS];
    const int64_t key = kt0 + lane;
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr)
      online_softmax_tile(s[rr], kt0, key, last[rr], scale_log2, pr[rr], m[rr], l[rr], o[rr]);

    copy_wait<1>();  // V of this tile (the next K may still be in flight)
    __syncwarp();
    const int n_keys = static_cast<int>(min(static_cast<int64_t>(kTile), key_stop - kt0));
    const __nv_bfloat162* vrow = reinterpret_cast<const __nv_bfloat162*>(vw);
#pragma unroll 4
    for (int t = 0; t < n_keys; ++t) {
      float pt[ROWS];
#pragma unroll
      for (int rr = 0; rr < ROWS; ++rr) pt[rr] = __shfl_sync(0xffffffffu, pr[rr], t);
#pragma unroll
      for (int jj = 0; jj < NP; ++jj) {
        const int pp = lane + 32 * jj;
        const float2 vf = pp < hd2 ? __bfloat1622float2(vrow[t * hd2 + pp]) : make_float2(0.0f, 0.0f);
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) {
          o[rr][jj].x = fmaf(pt[rr], vf.x, o[rr][jj].x);
          o[rr][jj].y = fmaf(pt[rr], vf.y, o[rr][jj].y);
        }
      }
    }
    __syncwarp();  // every lane has read V: the buffer takes the next tile's
    if (next < n_tiles) issue(v, vw, hd2, next_rows);
    else copy_commit();
  }
  copy_wait<0>();
  __syncthreads();  // every warp is done with its tiles: their memory takes the merge

  // Merge: warp w's rows at mo[w][r][0, head_dim), its max and sum at mml[w][r].
  float* mo = reinterpret_cast<float*>(smem_raw);
  float* mml = mo + kWarps * ROWS * head_dim;
#pragma unroll
  for (int rr = 0; rr < ROWS; ++rr) {
    float2* dst = reinterpret_cast<float2*>(mo + (warp * ROWS + rr) * head_dim);
#pragma unroll
    for (int jj = 0; jj < NP; ++jj) {
      const int pp = lane + 32 * jj;
      if (pp < hd2) dst[pp] = o[rr][jj];
    }
    if (lane == 0) {
      mml[2 * (warp * ROWS + rr)] = m[rr];
      mml[2 * (warp * ROWS + rr) + 1] = l[rr];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nr * head_dim; idx += blockDim.x) {
    const int r = idx / head_dim, d = idx % head_dim, row = row0 + r;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, mml[2 * (w * ROWS + r)]);
    float acc = 0.0f, sum = 0.0f;
    if (mx != -INFINITY) {  // a row with no visible key in this span keeps (0, -inf, 0)
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(mml[2 * (w * ROWS + r)] - mx);  // 0 for a warp with no tile (m = -inf)
        sum = fmaf(mml[2 * (w * ROWS + r) + 1], f, sum);
        acc = fmaf(mo[(w * ROWS + r) * head_dim + d], f, acc);
      }
    }
    const int t = row / group, h = g * group + row % group;
    if (span.used > 1) {
      const int64_t slot = (static_cast<int64_t>(split) * sp.n_tokens + tok0 + t) * sp.n_heads + h;
      sp.o[slot * head_dim + d] = acc;
      if (d == 0) {
        sp.ml[2 * slot] = mx;
        sp.ml[2 * slot + 1] = sum;
      }
    } else {
      out[(tok0 + t) * out_stride + static_cast<int64_t>(h) * head_dim + d] = __float2bfloat16_rn(acc / sum);
    }
  }
}

using DecodeKernel = void (*)(const __nv_bfloat16*, int64_t, const __nv_bfloat16*, const __nv_bfloat16*, int64_t, int,
                              __nv_bfloat16*, int64_t, PagedAttentionBatch, int, int, int, float, SplitPartials);

// The instance for a step: ROWS is the token's group rounded up to 1, 2 or 4 rows, so that a small
// group does not pay for four rows' scores.
template <int MAXJ, bool VEC>
DecodeKernel kernel_for(int rows) {
  return rows == 1 ? attention_paged_decode_kernel<MAXJ, VEC, 1>
         : rows == 2 ? attention_paged_decode_kernel<MAXJ, VEC, 2>
                     : attention_paged_decode_kernel<MAXJ, VEC, 4>;
}

// The shape of a launch: the instance, its K row stride and its shared memory; null where the
// device cannot give a block that much (head_dim 256 needs about 137 KiB; Ada gives 99 KiB).
struct DecodeShape {
  DecodeKernel kernel = nullptr;
  int kstr = 0;
  size_t smem = 0;
};
DecodeShape decode_shape(int64_t group, int64_t head_dim, bool kv_vec) {
  DecodeShape d;
  const int hd2 = static_cast<int>(head_dim / 2);
  const int rows = group == 1 ? 1 : group == 2 ? 2 : 4;
  // VEC: K rows padded by 16 bytes (16-byte aligned, conflict-free 16-byte reads); otherwise an
  // odd number of words (conflict-free single-word reads).
  d.kstr = kv_vec ? hd2 + 4 : (hd2 % 2 == 1 ? hd2 : hd2 + 1);
  const size_t tiles = sizeof(uint32_t) * kWarps * kTile * static_cast<size_t>(d.kstr + hd2);
  const size_t merge = sizeof(float) * kWarps * rows * static_cast<size_t>(head_dim + 2);
  d.smem = std::max(tiles, merge) + sizeof(float) * rows * static_cast<size_t>(head_dim);
  int device = 0, optin = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (d.smem > static_cast<size_t>(optin)) return d;
  dispatch_head_dim(head_dim, "launch_attention_paged", [&](auto maxj) {
    constexpr int J = decltype(maxj)::value;
    d.kernel = kv_vec ? kernel_for<J, true>(rows) : kernel_for<J, false>(rows);
  });
  // Over the default 48 KiB (head_dim 128: about 68 KiB, three blocks per SM). Allowed while a
  // stream is being captured: it is no stream operation.
  if (d.smem > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(d.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(d.smem)));
  return d;
}

}  // namespace

bool launch_attention_paged_decode(const __nv_bfloat16* q, int64_t q_row_stride, const __nv_bfloat16* k_pool,
                                   const __nv_bfloat16* v_pool, int64_t kv_row_stride, int64_t block_tokens,
                                   __nv_bfloat16* out, int64_t out_row_stride, const PagedAttentionBatch& batch,
                                   int64_t group, int64_t n_kv_heads, int64_t head_dim, float scale_log2, bool kv_vec,
                                   const SplitPartials& sp, cudaStream_t stream) {
  const DecodeShape d = decode_shape(group, head_dim, kv_vec);
  if (!d.kernel) return false;
  const dim3 grid(static_cast<unsigned>(batch.n_tiles), static_cast<unsigned>(n_kv_heads),
                  static_cast<unsigned>(sp.splits));
  d.kernel<<<grid, kWarps * 32, d.smem, stream>>>(q, q_row_stride, k_pool, v_pool, kv_row_stride,
                                                  static_cast<int>(block_tokens), out, out_row_stride, batch,
                                                  static_cast<int>(group), static_cast<int>(head_dim), d.kstr,
                                                  scale_log2, sp);
  CUDA_CHECK_LAUNCH();
  return true;
}

}  // namespace paged_detail

int attention_paged_decode_blocks_per_sm(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim) {
  const char* op = "attention_paged_decode_blocks_per_sm";
  check_attention_shape(op, n_heads, n_kv_heads, head_dim, n_kv_heads * head_dim);
  const int64_t group = n_heads / n_kv_heads;
  if (group > paged_detail::kRowsPerWarp) return 0;
  const paged_detail::DecodeShape d = paged_detail::decode_shape(group, head_dim, head_dim % 8 == 0);
  if (!d.kernel) return 0;
  int blocks = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, d.kernel, paged_detail::kWarps * 32, d.smem));
  return blocks;
}

}  // namespace ringllama
