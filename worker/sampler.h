// Choosing the next token from a row of logits (DESIGN.md "Forward": greedy, temperature, top-k,
// top-p, seed). The rule is shared with the GPU sampler (kernels/sample_common.h): for the same
// logits, seed and step both pick the same token.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/sample_common.h"

namespace ringllama {

struct SamplingParams {
  double temperature = 0;  // 0 = greedy (argmax); otherwise logits are divided by it
  int64_t top_k = 0;       // keep the k most likely tokens; 0 = all
  double top_p = 1;        // then keep the smallest most-likely prefix with this much mass; 1 = all
  uint64_t seed = 0;       // seeds the sequence's generator

  // Throws Error naming the parameter: temperature >= 0, top_k >= 0, 0 < top_p <= 1.
  void validate() const;
};

// Buffers sample_row reuses from call to call.
struct SampleScratch {
  std::vector<int32_t> order;     // candidate indices
  std::vector<uint32_t> keys;     // order key per token (sample_key)
  std::vector<uint64_t> weights;  // fixed-point weight per token (sample_weight)
};

// The selection rule of kernels/sample_common.h for one row of n logits, stateless: the draw
// depends only on the logits, p and (p.seed, p.step). Greedy: the highest logit, the lowest index on
// ties. Otherwise softmax(logits / T), the top_k most likely kept, then the smallest prefix (in
// order of probability, ties by index) whose mass reaches top_p of what top_k kept (at least one
// token), and one draw from what is left.
int32_t sample_row(const float* logits, int64_t n, const SampleParams& p, SampleScratch& scratch);

// One per sequence: its state is the seed and a step counter, so that draw s of a sequence is the
// same wherever it is made (sample() here, or launch_sample on the GPU with next_row_params()).
class Sampler {
 public:
  // first_step: the number of tokens the sequence has already sampled (0 for a new one).
  explicit Sampler(const SamplingParams& p, uint64_t first_step = 0);

  // Draws with the current step, then moves to the next.
  int32_t sample(const float* logits, int64_t n);
  int32_t sample(const std::vector<float>& logits) {
    return sample(logits.data(), static_cast<int64_t>(logits.size()));
  }

  // The current step's row for launch_sample (kernels/sample.cuh); the step moves on, as if
  // sample() had drawn.
  SampleParams next_row_params();

  const SamplingParams& params() const { return p_; }
  uint64_t step() const { return step_; }

 private:
  SampleParams row_params() const;

  SamplingParams p_;
  uint64_t step_;
  SampleScratch scratch_;
};

// Index of the largest value, the lowest index on ties; NaN counts as -inf (as launch_argmax).
int32_t argmax(const float* v, int64_t n);

}  // namespace ringllama
