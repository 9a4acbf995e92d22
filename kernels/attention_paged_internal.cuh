// What the paged attention kernels share inside the library (kernels/attention_paged.cu and
// kernels/attention_paged_decode.cu): the block shape, the split partials' layout and the rule
// that cuts a tile's keys into spans, which both passes and both first-pass kernels must agree on,
// and the online-softmax step both first-pass kernels take per tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "kernels/attention_paged.cuh"
#include "kernels/device_math.cuh"

namespace ringllama {
namespace paged_detail {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows (token, head of the group) per block
constexpr int kTile = 32;                     // keys per tile: one per lane for the scores
static_assert(kRows == kAttentionPagedRows, "the header's tile height");

// Where a split launch leaves its partials (layout: attention_paged_workspace_bytes).
struct SplitPartials {
  int splits = 1;
  int64_t n_tokens = 0, n_heads = 0;
  float* o = nullptr;   // [splits][n_tokens][n_heads][head_dim]
  float* ml = nullptr;  // [splits][n_tokens][n_heads][2]: max (log2 units) and sum
};

// A tile's keys [0, key_end) in `used` spans of `chunk` keys (a multiple of the tile), at most
// `splits` of them. Both passes compute it from the same device-side metadata, so a launch sized
// for a long context (a captured graph) serves any shorter one.
struct KeySpan {
  int64_t chunk;
  int used;
};
__device__ __forceinline__ KeySpan key_span(int64_t key_end, int splits) {
  int64_t chunk = (key_end + splits - 1) / splits;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  return {chunk, static_cast<int>((key_end + chunk - 1) / chunk)};
}

// An output accumulator times a softmax correction: a float per dimension, or a float2 per pair.
__device__ __forceinline__ void scale_acc(float& o, float c) { o *= c; }
__device__ __forceinline__ void scale_acc(float2& o, float c) { o.x *= c, o.y *= c; }

// One query row's online-softmax step over a tile of 32 keys from kt0, this lane's key `key` with
// raw score s; `last` is the row's last visible key. Sets p to this lane's weight 2^(s - m) (0 for
// a masked key), takes the tile's max and sum into the row's running max m (log2 units) and sum l
// and rescales the row's output accumulator o (a float per dimension or a float2 per dimension
// pair). p is an out-parameter, set to 0 first and read back by the sum, as the kernels had it
// inline: their PTX stays as it was (up to register names), where returning p cost the general
// kernel up to 21 registers more (ptxas, sm_90).
template <typename Acc, int N>
__device__ __forceinline__ void online_softmax_tile(float s, int64_t kt0, int64_t key, int64_t last, float scale_log2,
                                                    float& p, float& m, float& l, Acc (&o)[N]) {
  p = 0.0f;
  if (kt0 <= last) {  // uniform over the warp; key kt0 is visible, so m stays finite
    const float sv = key <= last ? s * scale_log2 : -INFINITY;
    const float m_new = fmaxf(m, warp_max(sv));
    const float corr = exp2f(m - m_new);
    p = exp2f(sv - m_new);
    l = l * corr + warp_sum(p);
    m = m_new;
#pragma unroll
    for (int j = 0; j < N; ++j) scale_acc(o[j], corr);
  }
}

// The first pass of a decode step (PagedAttentionBatch::decode_only, group <= kRowsPerWarp): the
// four warps of a block on different keys of the same rows (attention_paged_decode.cu). Arguments
// as launch_attention_paged's, checked there; kv_vec: 16-byte loads of K and V are allowed.
// Returns false, launching nothing, where the device cannot give a block the shared memory it
// needs (the general kernel then serves the step).
bool launch_attention_paged_decode(const __nv_bfloat16* q, int64_t q_row_stride, const __nv_bfloat16* k_pool,
                                   const __nv_bfloat16* v_pool, int64_t kv_row_stride, int64_t block_tokens,
                                   __nv_bfloat16* out, int64_t out_row_stride, const PagedAttentionBatch& batch,
                                   int64_t group, int64_t n_kv_heads, int64_t head_dim, float scale_log2, bool kv_vec,
                                   const SplitPartials& sp, cudaStream_t stream);

}  // namespace paged_detail
}  // namespace ringllama
