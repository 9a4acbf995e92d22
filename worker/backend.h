// A compute backend: runs the model's forward over the weights a WeightSource provides, for many
// sequences at once.
//
// The unit of work is a step (DESIGN.md "A step"): one pass over the layers for a list of
// (sequence, new tokens) items. Prefill chunks and single decode tokens of different sequences
// share the pass, so the weights are read once for all of them. Keys and values live in a paged
// cache (worker/kv_blocks.h): blocks of kv_block_tokens positions, taken from one pool as a
// sequence grows and given back when it is freed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "common/config.h"
#include "common/model_config.h"
#include "kernels/sample_common.h"
#include "worker/kv_blocks.h"
#include "worker/weights.h"

namespace ringllama {

class Backend {
 public:
  virtual ~Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  // A sequence is an id with its cached positions; a new one has none. Throws Error if the id is
  // taken (add) or unknown (free). Freeing gives the sequence's KV blocks back to the pool.
  void add_sequence(int64_t id) { kv_.add_sequence(id); }
  void free_sequence(int64_t id) { kv_.free_sequence(id); }
  bool has_sequence(int64_t id) const { return kv_.has(id); }
  int64_t cached_tokens(int64_t id) const { return kv_.length(id); }

  // One pass for `items` (at most limits().max_items, each sequence once, each item at most
  // limits().max_item_tokens tokens): every item's tokens go in at the positions after its
  // sequence's cached ones. Returns one row per item: the logits (vocab_size floats) of the item's
  // last token, or an empty row where want_logits is false. Nothing changes when it throws before
  // the pass (bad ids, context or pool exhausted); a failed pass leaves the caches unchanged.
  std::vector<std::vector<float>> step(const std::vector<StepItem>& items);
  // The same pass, but only the greedy pick of each item that wants logits comes back (-1 for the
  // others); the CUDA backend picks on the device and copies one id per item.
  std::vector<int32_t> step_greedy(const std::vector<StepItem>& items);
  // The same pass, each item that wants logits sampled with its own row of `params` (one per item,
  // from its sequence's Sampler::next_row_params(); the rows of items that want no logits are not
  // read): the rule of kernels/sample_common.h, so a temperature-0 row is the greedy pick. Returns
  // one id per item (-1 where want_logits is false). The CUDA backend samples on the device and
  // copies one id per item; the CPU backend calls sample_row on its logits rows. `logits`, when
  // given, also gets each item's row, as step() returns them (the rows the ids were drawn from).
  std::vector<int32_t> step_sample(const std::vector<StepItem>& items, const std::vector<SampleParams>& params,
                                   std::vector<std::vector<float>>* logits = nullptr);

  // One sequence (id 0) as a list of one: runs `tokens` at positions [start_pos, start_pos + n),
  // in steps of at most max_item_tokens, and returns the last position's logits. start_pos must
  // equal the cached positions. reset() forgets the sequence.
  std::vector<float> forward(const std::vector<int32_t>& tokens, int64_t start_pos);
  void reset();
  // Teacher forcing for scoring text: runs `tokens` as forward() does (sequence 0, chunks of
  // max_item_tokens) and hands the logits of every position to `row` (position, vocab_size
  // floats) in order. Only backends whose pass can return a logits row per token
  // (scores_every_row) take it; the others throw Error.
  void score(const std::vector<int32_t>& tokens, int64_t start_pos,
             const std::function<void(int64_t pos, const float* logits)>& row);
  virtual bool scores_every_row() const { return false; }

  const StepLimits& limits() const { return limits_; }
  const KvBlockPool& kv() const { return kv_; }
  const ModelConfig& model() const { return model_; }
  virtual const char* name() const = 0;

 protected:
  // Sizes the block pool for batch_size x max_context (config) and the step limits.
  Backend(const ModelConfig& m, const Config& config);

  // What a pass hands back for the layout's logits rows (layout.logit_rows, in order).
  struct StepOutput {
    std::vector<float>* logits = nullptr;  // non-null: gets logit_rows.size() x vocab floats
    std::vector<int32_t>* ids = nullptr;   // non-null: gets one id per logits row
    // With ids: null = the greedy pick (argmax); else one SampleParams per logits row to draw with.
    const std::vector<SampleParams>* sample = nullptr;
  };
  // Runs the layout's rows through every layer; the block tables already cover the new positions.
  virtual void run_step(const StepLayout& layout, const StepOutput& out) = 0;

  const ModelConfig model_;
  const StepLimits limits_;
  KvBlockPool kv_;
};

std::unique_ptr<Backend> make_cpu_backend(WeightSource& weights, const Config& config);

}  // namespace ringllama
