// How much of a streamed layer the CPU computes while the GPU streams the rest (DESIGN.md "The CPU's
// share of a streamed layer (hybrid)"). Pure arithmetic over measured rates: no threads, no GPU.
//
// Each weight matrix of a streamed layer is split by output rows: the GPU takes the first rows (a
// prefix of a row-major matrix is one contiguous copy), the CPU the rest, reading them in place from
// the host's copy (worker/hybrid_cpu.h). Both run at once, so a layer costs the longer of the two.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/manifest.h"

namespace ringllama {

struct HybridRates {
  double h2d_gbs = 0;  // pinned host-to-device copy rate, GB/s (1e9 bytes)
  // The CPU kernel's rate in GB/s of weights at a few batch sizes, as ringllama-cpu-bench measures
  // it: (tokens, GB/s), tokens ascending. Empty: the roofline of the two numbers below.
  std::vector<std::pair<int, double>> cpu_gbs_by_tokens;
  double cpu_mem_gbs = 0;  // the kernel's batch-1 rate (memory-bound), GB/s of weights
  double cpu_gflops = 0;   // the kernel's compute rate at large batches, GFLOP/s
  // A forced CPU share of each matrix's rows in [0, 1] instead of the rates' choice: 0 turns the
  // CPU off (the GPU streams everything, f = 1 exactly), 1 leaves everything to the CPU.
  std::optional<double> cpu_share;
  int64_t row_granularity = 64;  // the GPU's rows of each matrix are a multiple of this (or all)
};

// Every rate positive and finite, cpu_share in [0, 1], the granularity positive; else an Error that
// names the field. The CPU's rates are not needed (nor checked) when cpu_share is 0.
void validate(const HybridRates& rates);

// The rate at which the CPU gets through the weights at a batch of `tokens`, in GB/s: from the
// measured table (linear in time per byte between its points; past its last point, compute-bound:
// the rate falls as 1/tokens), else min(cpu_mem_gbs, cpu_gflops / tokens) — a bf16 weight (2 bytes)
// costs 2 flops per token, so the compute limit is gflops / tokens GB/s.
double cpu_rate_gbs(const HybridRates& rates, int tokens);

// The GPU's share f of a layer's bytes that makes the two sides take equally long:
// f * bytes / h2d = (1 - f) * bytes / cpu, so f = h2d / (h2d + cpu). The share does not depend on
// the layer's size; bytes_per_layer is checked (positive) so that a caller with no layer notices.
// With cpu_share set: f = 1 - cpu_share exactly. Not rounded to rows (gpu_rows does that).
double choose_gpu_fraction(int64_t bytes_per_layer, int tokens, const HybridRates& rates);

// The GPU's rows of a matrix of `rows` rows at share f: f * rows rounded up to a multiple of
// `granularity`, at most `rows` (so f = 1 gives all rows, f = 0 none, and a CPU share smaller than
// one block, or a matrix smaller than one, stays on the GPU).
int64_t gpu_rows(int64_t rows, double f, int64_t granularity);

// One weight matrix of a streamed layer: bf16 [rows][in].
struct HybridMatrix {
  int64_t rows = 0;
  int64_t in = 0;
};

struct HybridSplit {
  double f = 1;                   // choose_gpu_fraction's share, before rounding
  std::vector<int64_t> gpu_rows;  // per matrix: rows [0, gpu_rows) stream to the GPU, the rest the CPU's
  int64_t gpu_bytes = 0;          // streamed bytes of the layer after rounding
  int64_t cpu_bytes = 0;          // bytes the CPU reads
  double gpu_seconds = 0;         // gpu_bytes over h2d
  double cpu_seconds = 0;         // cpu_bytes over the CPU's rate at the batch
  // The layer's time, the longer side: the copies and the CPU rows overlap, and the GPU's compute
  // is not the bound for a streamed layer at these batches.
  double seconds() const { return gpu_seconds > cpu_seconds ? gpu_seconds : cpu_seconds; }
};

// The split of one layer's matrices at a batch of `tokens`: f from the rates, rows rounded per matrix.
HybridSplit split_layer(const std::vector<HybridMatrix>& matrices, int tokens, const HybridRates& rates);

// The bound a split implies for a step that streams `streamed_layers` such layers: tokens per
// second <= tokens / (streamed_layers * split.seconds()). With the CPU off it is the plain
// streaming bound, tokens / (bytes streamed per step / h2d).
double hybrid_tokens_per_s_bound(const HybridSplit& split, int64_t streamed_layers, int tokens);

// ---- A layer's matrices in the store (what the CUDA backend's pool leaves on the host) ----

// The matrices the hybrid splits in a layer of `m`, in forward order: q|k|v [q_dim + 2 kv_dim,
// dim], o [dim, q_dim], gate|up [2 ffn, dim], down [dim, ffn]. q|k|v and gate|up are the fused
// tensors as the store lays them out (adjacent), so each side's rows are one range.
std::vector<HybridMatrix> hybrid_layer_matrices(const ModelConfig& m);

// Why layer `layer` of the store cannot be split ("" when it can): a packed matrix (the CPU
// multiplies bf16), or q|k|v or gate|up not adjacent in their group.
std::string hybrid_layer_refusal(const Manifest& man, int64_t layer);

// Why the hybrid cannot apply to a store whose layers [first_streamed, n_layers) stream through a
// pool that may hold `held_layers` host layers at once ("" when it can): a streamed layer
// hybrid_layer_refusal refuses, or fewer than 2 layers held (the layer computing, whose host copy
// the CPU reads, besides the next copy). Nothing streamed: nothing to split, also said.
std::string hybrid_refusal(const Manifest& man, int64_t first_streamed, int64_t held_layers);

// Bytes of one of a layer's groups, from the group's start.
struct HybridHostRange {
  bool ffn = false;  // in the ffn group (gate|up, down), else the attn group (q|k|v, o)
  uint64_t begin = 0, end = 0;
};

// Where the CPU's rows of each matrix lie in layer `layer`'s groups when the GPU takes the first
// gpu_rows[i] rows of matrix i (hybrid_layer_matrices' order): the bytes the pool does not copy, one
// range per matrix the CPU has rows of, in matrix order. A row-major [rows][in] bf16 matrix's rows
// [g, rows) are the bytes [offset + g·in·2, offset + rows·in·2) of its group. A layer that
// hybrid_layer_refusal refuses, or gpu_rows of another size or outside [0, rows], is an Error.
std::vector<HybridHostRange> hybrid_cpu_ranges(const Manifest& man, int64_t layer,
                                               const std::vector<int64_t>& gpu_rows);

}  // namespace ringllama
