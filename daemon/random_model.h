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
// Speed: a 16 GB store must be generated faster than a disk can take it. Each tensor gets a table
// of 4096 normal draws (bf16); an element is a table entry picked by 12 bits of a counter-based
// hash (splitmix64 of the element's index), so any range is generated independently with one
// multiply-xorshift hash per four elements.
class RandomSource : public PackSource {
 public:
  RandomSource(const Manifest& plan, uint64_t seed);
  void fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const override;

  // The mean and standard deviation tensor `name` is drawn from.
  static void scale_of(const ModelConfig& m, const std::string& name, double* mean, double* stddev);

 private:
  static constexpr int kTableBits = 12;
  struct Table {
    uint64_t key = 0;
    std::vector<bf16_t> values;  // 1 << kTableBits entries
  };
  const Table& table(const GroupEntry& g, size_t ti) const;

  std::vector<size_t> first_table_;  // per group (store order): index of its first tensor's table
  std::vector<Table> tables_;
};

}  // namespace ringllama
