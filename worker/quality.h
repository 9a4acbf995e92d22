// How much a packed store changes the model (DESIGN.md "The packed store"): text read
// teacher-forced on the CPU backend, each position's next-token prediction against the text and
// against a reference store's (bf16) prediction.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ringllama {

struct TextScore {
  int64_t predictions = 0;    // positions scored: the text's tokens less one
  double mean_nll = 0;        // mean negative log-likelihood of the actual next token, nats
  std::vector<int32_t> top1;  // [predictions] the most likely next token at each position
  double perplexity() const;  // exp(mean_nll)
};

// Scores `ids` (at least 2) with the store at store_dir on the CPU backend. Throws Error.
TextScore score_store(const std::string& store_dir, const std::vector<int32_t>& ids);

// The fraction of positions where `a` and `ref` predict the same token (both of the same text).
double top1_agreement(const TextScore& a, const TextScore& ref);

}  // namespace ringllama
