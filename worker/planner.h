// The memory planner (DESIGN.md "The memory planner"): every device byte accounted before it is
// allocated. A pure computation over the manifest, the config and a few measured figures: it makes
// no CUDA call, so the CUDA backend runs it with what it measured at start, and
// `ringllama-generate --plan-only --device-memory GB` runs it for a card that is not there.
//
// Components, each one line of the table:
//   CUDA context, cuBLAS           measured at start (or the fixed estimates below)
//   resident globals               embedding, final norm, lm_head unless tied (the store's globals group)
//   resident layers                count x layer bytes
//   group pool                     attn buffers x attn group + ffn buffers x ffn group
//   KV cache                       paged: batch x ceil(max_context / kv_block_tokens) blocks
//   activations                    one layer's buffers at batch x prefill_chunk_tokens tokens
//   workspace                      decode attention's split partials, the sampler's scratch (cuBLAS's
//                                  is in its own line)
//   free guard                     free_guard_mb
// against a budget of gpu_memory_limit x device memory (0: what is free).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/manifest.h"

namespace ringllama {

inline constexpr uint64_t kMiB = uint64_t{1} << 20;
inline constexpr uint64_t kGiB = uint64_t{1} << 30;

// Figures used where nothing was measured (--plan-only), from a measurement on an H100 80GB HBM3
// (driver 580, CUDA 13 runtime and cuBLAS 13, lazy module loading):
//   CUDA context: cudaFree(0) took 518 MiB by nvidia-smi's per-process count (527 MiB by
//   cudaMemGetInfo); 576 MiB leaves room for the engine's own kernels, loaded at first launch.
//   cuBLAS: cublasCreate took 68 MiB, and the Gemm wrapper hands it a fixed 32 MiB workspace
//   (kernels/gemm.h): 100 MiB; 128 MiB rounds that up.
inline constexpr uint64_t kEstimatedContextBytes = 576 * kMiB;
inline constexpr uint64_t kEstimatedCublasBytes = 128 * kMiB;

// Decode attention (flash-decoding in kernels/attention_paged.cuh, kAttentionPagedMaxSplits)
// splits a long context into at most this many spans per head, each with a partial output row, a
// max and a sum in fp32 for every token of a decode step. A step takes fewer splits the larger its
// batch (they fill the GPU with blocks: about 8 x SMs / (tiles x kv heads), so a batch of b takes
// about 1/b of them past b = 4), so the workspace line holds the partials of
// kDecodeAttentionSplitSeqs sequences at the most splits
// (attention_paged_workspace_bytes(min(batch_size, 16), n_heads, head_dim, 64)): every batch on
// a GPU of up to ~250 SMs splits as it wants; past that, attention_paged_splits takes what fits.
inline constexpr int64_t kDecodeAttentionSplits = 64;
inline constexpr int64_t kDecodeAttentionSplitSeqs = 16;

// Query rows of one attention work tile (kernels/attention_paged.cuh kAttentionPagedRows): a step's
// metadata holds one (item, first row) pair per tile.
inline constexpr int64_t kAttentionTileRows = 16;

struct PlanInputs {
  uint64_t device_total_bytes = 0;  // the card's memory
  uint64_t device_free_bytes = 0;   // free memory, measured after the context and cuBLAS were made
  uint64_t context_bytes = 0;       // the CUDA context of this process
  uint64_t cublas_bytes = 0;        // cuBLAS handle and workspace
  bool measured = false;            // false: the figures above are estimates (--plan-only)
  // The backend keeps every layer on the device (the CUDA backend until streaming is wired into
  // it): resident_layers is planned at the layer count and never suggested as a key to lower.
  bool all_resident = false;
};

// Inputs for a card of `device_bytes` that is not measured: every byte free, fixed estimates.
PlanInputs estimated_inputs(uint64_t device_bytes);

// One buffer of the activation peak.
struct ActivationBuffer {
  std::string name;  // "residual stream", "q", ...
  uint64_t bytes = 0;
  std::string note;  // shape and dtype
};

// One change of one config key.
struct ConfigChange {
  std::string key;
  int64_t from = 0;
  int64_t to = 0;
};

// What lowering one key (or several, for a combined fix) saves.
struct Suggestion {
  std::vector<ConfigChange> changes;
  uint64_t saves = 0;  // bytes: the plan's total before minus after, resident layers held
  bool fits = false;   // the plan fits with these changes
  // The config with the changes applied (prefill_chunk_tokens follows max_context down).
  Config apply(Config c) const;
  std::string text() const;  // "gpu_ahead_layers 4 -> 2 saves 3.2 GiB (3435973836 bytes)"
};

struct TableLine {
  std::string component;
  uint64_t bytes = 0;
  std::string note;
  bool sub = false;  // a part of the line above it (activation buffers)
};

struct MemoryPlan {
  // The model and the settings planned for.
  int64_t n_layers = 0;
  int64_t batch_size = 0;
  int64_t max_context = 0;
  int64_t prefill_chunk_tokens = 0;
  int64_t kv_block_tokens = 0;

  uint64_t context_bytes = 0;
  uint64_t cublas_bytes = 0;
  bool measured = false;

  uint64_t globals_bytes = 0;
  std::string globals_note;        // its tensors

  uint64_t layer_bytes = 0;        // one layer: its attn and ffn groups (the largest layer)
  int64_t resident_layers = 0;
  bool resident_auto = false;      // resident_layers was auto: the room left
  uint64_t resident_bytes = 0;

  uint64_t attn_group_bytes = 0;   // the largest attn group: one pool buffer
  uint64_t ffn_group_bytes = 0;    // the largest ffn group
  int64_t pool_attn_buffers = 0;
  int64_t pool_ffn_buffers = 0;
  std::string pool_rule;           // "gpu_ahead_layers 4 + 1 of each kind", "gpu_max_groups 5 split"
  uint64_t pool_bytes = 0;         // 0 when every layer is resident

  uint64_t kv_token_bytes = 0;     // K and V, bf16, every layer, one token
  uint64_t kv_block_bytes = 0;     // kv_block_tokens tokens
  int64_t kv_blocks_per_sequence = 0;
  int64_t kv_blocks = 0;
  uint64_t kv_bytes = 0;
  int64_t kv_waste_tokens = 0;     // over all sequences: blocks x block_tokens - max_context, x batch
  uint64_t kv_waste_bytes = 0;

  int64_t activation_tokens = 0;   // batch_size x prefill_chunk_tokens
  std::vector<ActivationBuffer> activations;
  uint64_t activation_bytes = 0;

  uint64_t workspace_bytes = 0;
  uint64_t dequant_bytes = 0;      // packed stores: a slice of a packed matrix as bf16 (within the workspace)
  uint64_t guard_bytes = 0;

  uint64_t total_bytes = 0;
  uint64_t budget_bytes = 0;
  std::string budget_note;         // "0.90 x 16.0 GiB"
  bool fits = false;

  // When it does not fit: each key lowered alone (the smallest change that fits, else the largest
  // saving), then one combined fix: every key stepped down in turn until it fits, then each raised
  // back as far as it still fits.
  std::vector<Suggestion> suggestions;

  std::vector<TableLine> lines() const;
  // The aligned table: component, bytes, size, note; the last line is the total and the verdict.
  std::string table() const;
  // Empty when it fits; else why not and what to lower, several lines.
  std::string refusal() const;
};

// Plans the device memory. Throws ConfigError when the config cannot describe a plan (an explicit
// resident_layers above the layer count).
MemoryPlan plan_memory(const Manifest& manifest, const Config& config, const PlanInputs& inputs);

// "512.0 MiB", "14.2 GiB", "16.0 KiB", "12 B".
std::string format_bytes(uint64_t bytes);

}  // namespace ringllama
