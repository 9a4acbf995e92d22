// Choosing the next token from a row of logits (DESIGN.md "Forward": greedy, temperature, top-k,
// top-p, seed).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace ringllama {

struct SamplingParams {
  double temperature = 0;  // 0 = greedy (argmax); otherwise logits are divided by it
  int64_t top_k = 0;       // keep the k most likely tokens; 0 = all
  double top_p = 1;        // then keep the smallest most-likely prefix with this much mass; 1 = all
  uint64_t seed = 0;       // seeds the sequence's generator

  // Throws Error naming the parameter: temperature >= 0, top_k >= 0, 0 < top_p <= 1.
  void validate() const;
};

// One per sequence: the draws depend only on the seed and the logits seen so far.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);

  // Greedy: the highest logit, the lowest index on ties. Otherwise softmax(logits / T), the top_k
  // most likely kept, then the smallest prefix (in order of probability, ties by index) whose
  // renormalised mass reaches top_p (at least one token), renormalised, and one draw.
  int32_t sample(const float* logits, int64_t n);
  int32_t sample(const std::vector<float>& logits) {
    return sample(logits.data(), static_cast<int64_t>(logits.size()));
  }

  const SamplingParams& params() const { return p_; }

 private:
  // Uniform in [0, 1) from the top 53 bits of one mt19937_64 output: the same on every platform
  // (std::uniform_real_distribution is not specified bit for bit).
  double uniform();

  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<int32_t> order_;    // scratch: candidate indices
  std::vector<double> weights_;   // scratch: exp((logit - max) / T) per token
};

// Index of the largest value, the lowest index on ties (NaN never wins).
int32_t argmax(const float* v, int64_t n);

}  // namespace ringllama
