// A compute backend: runs the model's forward over the weights a WeightSource provides.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/config.h"
#include "worker/weights.h"

namespace ringllama {

class Backend {
 public:
  virtual ~Backend() = default;
  // Runs `tokens` at positions [start_pos, start_pos + tokens.size()) of the one sequence,
  // appending their keys and values to its cache; returns the logits (vocab_size floats) of the
  // last position. start_pos must equal the number of positions already cached.
  virtual std::vector<float> forward(const std::vector<int32_t>& tokens, int64_t start_pos) = 0;
  // Forgets the sequence (empties the cache).
  virtual void reset() = 0;
  virtual const char* name() const = 0;
};

std::unique_ptr<Backend> make_cpu_backend(WeightSource& weights, const Config& config);

}  // namespace ringllama
