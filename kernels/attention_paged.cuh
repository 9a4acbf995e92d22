// Causal attention for one step of many sequences over the paged KV cache (worker/kv_blocks.h),
// with grouped-query heads. One launch serves the whole step: prefill chunks (their queries see the
// sequence's cached prefix plus the chunk up to themselves) and single decode tokens side by side.
// Keys and values stream through shared memory in tiles of 32 with an online softmax (flash
// attention style); each key row is found through the sequence's block table.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ringllama {

// Query rows (token, head of one kv group) per block: the unit of work of the launch.
inline constexpr int kAttentionPagedRows = 16;

// Flash-decoding: a split launch gives each (tile, kv head) up to `splits` blocks, each over one
// span of the keys, writing an unnormalized partial output with its max and sum; a second small
// kernel combines them. Tiles whose context fits one span are finished by the first kernel as
// before. The span length follows each tile's own context length on the device, so a launch (or
// a captured graph) sized for the longest context serves shorter ones too.
inline constexpr int kAttentionPagedMaxSplits = 64;
inline constexpr int64_t kAttentionPagedMinSplitKeys = 256;  // attention_paged_splits' shortest span

struct PagedAttentionSplit {
  int splits = 1;               // 1: no partials, no second kernel (the workspace may be null)
  int64_t n_tokens = 0;         // rows of q and out in the step (partials are indexed by them)
  void* workspace = nullptr;    // attention_paged_workspace_bytes(n_tokens, n_heads, head_dim, splits)
  size_t workspace_bytes = 0;
};

// fp32 partials of a split launch: splits x n_tokens x n_heads x (head_dim + 2).
size_t attention_paged_workspace_bytes(int64_t n_tokens, int64_t n_heads, int64_t head_dim, int splits);

// The split count for a step: enough blocks to fill the GPU (sm_count, from cuda_sm_count), none
// of them under kAttentionPagedMinSplitKeys keys of the longest context (max_keys: the step's, or
// the largest any replay of a captured graph will see), at most kAttentionPagedMaxSplits, and no
// more than the workspace holds. 1 where the tiles alone fill the GPU (prefill, large batches).
int attention_paged_splits(int64_t n_tiles, int64_t n_kv_heads, int64_t max_keys, int sm_count, int64_t n_tokens,
                           int64_t n_heads, int64_t head_dim, size_t workspace_bytes);

// Blocks of the decode kernel (PagedAttentionBatch::decode_only) that one SM of the current device
// holds at once for these heads (16-byte K/V loads where head_dim allows), 0 where the general
// kernel would serve the step: what a split count that fills the GPU in one wave is made from
// (ringllama-kernel-bench compares it with attention_paged_splits').
int attention_paged_decode_blocks_per_sm(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim);

// The split count for a decode step run by the decode kernel (blocks_per_sm from the function
// above, > 0): one wave of blocks (blocks_per_sm x sm_count over n_items x n_kv_heads), but at
// least 3 spans, and, as attention_paged_splits, no span under kAttentionPagedMinSplitKeys keys of
// max_keys, at most kAttentionPagedMaxSplits and no more than the workspace holds. Measured on an
// H200 (3 blocks per SM, 32k context): one wave reads the KV at 0.39 / 0.65 / 0.73 of a device
// copy at batch 1 / 4 / 16 against 0.31 / 0.58 / 0.73 with attention_paged_splits' count; at
// batch 64 one wave is 1 span (0.65) and 3 spans read it at 0.75.
int attention_paged_decode_splits(int64_t n_items, int64_t n_kv_heads, int64_t max_keys, int sm_count,
                                  int blocks_per_sm, int64_t n_heads, int64_t head_dim, size_t workspace_bytes);

// Device-side description of a step, all int32 arrays on the device.
struct PagedAttentionBatch {
  const int32_t* item_row0 = nullptr;     // [items] first token (row of q and out) of the item
  const int32_t* item_count = nullptr;    // [items] new tokens of the item
  const int32_t* item_start = nullptr;    // [items] cached positions before them
  const int32_t* block_tables = nullptr;  // [items, table_stride] physical blocks of each item's sequence
  int64_t table_stride = 0;
  const int32_t* tile_item = nullptr;     // [n_tiles] item of each block of work
  const int32_t* tile_row0 = nullptr;     // [n_tiles] its first row within the item (rows: token-major)
  int64_t n_tiles = 0;
  // Every item has exactly one token (the caller knows it: a decode step). With a GQA group of at
  // most 4, the launch then runs the decode kernel: one block per (token, kv head, span) whose four
  // warps score different keys of the token's group rows and merge their softmax states at the
  // end. Same results within rounding, same split partials; a wider group, or a head_dim whose tiles
  // need more shared memory than the device gives a block, takes the general kernel.
  bool decode_only = false;
};

// The work tiles of a step, for PagedAttentionBatch::tile_item/tile_row0: item i with count[i]
// tokens gives ceil(count[i] * group / kAttentionPagedRows) tiles. Appends to the two vectors.
void attention_paged_tiles(const std::vector<int64_t>& count, int64_t group, std::vector<int32_t>* tile_item,
                           std::vector<int32_t>* tile_row0);

// q:   [tokens, q_row_stride] bf16, n_heads heads of head_dim at the start of each row, RoPE applied;
//      token t of item i sits at position item_start[i] + t - item_row0[i].
// k_pool, v_pool: one layer's pool rows, row r = physical row block * block_tokens + offset, row
//      stride kv_row_stride; every position up to each token's own must be written (the step's
//      new rows included).
// out: [tokens, out_row_stride] bf16. scale: 1/sqrt(head_dim) for Llama. head_dim: even, <= 256.
void launch_attention_paged(const __nv_bfloat16* q, int64_t q_row_stride, const __nv_bfloat16* k_pool,
                            const __nv_bfloat16* v_pool, int64_t kv_row_stride, int64_t block_tokens,
                            __nv_bfloat16* out, int64_t out_row_stride, const PagedAttentionBatch& batch,
                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale, cudaStream_t stream);
// The same with the keys split over blocks (PagedAttentionSplit above); split.splits == 1 is the
// launch above.
void launch_attention_paged(const __nv_bfloat16* q, int64_t q_row_stride, const __nv_bfloat16* k_pool,
                            const __nv_bfloat16* v_pool, int64_t kv_row_stride, int64_t block_tokens,
                            __nv_bfloat16* out, int64_t out_row_stride, const PagedAttentionBatch& batch,
                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale, cudaStream_t stream,
                            const PagedAttentionSplit& split);

}  // namespace ringllama
