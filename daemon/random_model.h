// Built-in model shapes with random weights: stores for tests, demos and benchmarks without a
// download. The real shapes carry the published hyper-parameters, so that a random 70B store
// streams exactly the bytes a real one would.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/manifest.h"
#include "daemon/pack_writer.h"

namespace ringllama {

// "tiny", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b".
std::vector<std::string> random_shape_names();

// The shape's config. Throws Error naming the shapes there are.
ModelConfig random_shape(const std::string& name);

// Random values, deterministic in (seed, group, tensor, element) whatever the threads and chunks.
//
// Scales keep activations finite and varied through every layer: norm weights 1 ± small noise,
// embeddings ~N(0, 1), projections ~N(0, 1/sqrt(in)), and wo / w2
// (which add to the residual stream) at half that, so the residual grows slowly with depth.
//
// Speed: a 16 GB store must be generated faster than a disk can take it. Values come from tables
// of 65536 pairs of normal draws (bf16), one table per distinct scale and one of four variants;
// a pair is picked by 16 bits of a counter-based hash (splitmix64 of the pair's index under the
// tensor's own key), so any range is generated independently, with one hash per eight elements.
class RandomSource : public PackSource {
 public:
  RandomSource(const Manifest& plan, uint64_t seed);
  void fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const override;

  // The mean and standard deviation tensor `name` is drawn from.
  static void scale_of(const ModelConfig& m, const std::string& name, double* mean, double* stddev);

 private:
  static constexpr int kTableBits = 16;  // pairs per table: 1 << kTableBits
  struct TensorKey {
    uint64_t key = 0;                   // the tensor's hash key
    const uint32_t* pairs = nullptr;    // its table: two bf16 values per entry, low one first
  };
  const TensorKey& tensor_key(const GroupEntry& g, size_t ti) const;

  std::vector<std::vector<uint32_t>> tables_;
  std::vector<size_t> first_key_;  // per group (store order): index of its first tensor's key
  std::vector<TensorKey> keys_;
};

}  // namespace ringllama
