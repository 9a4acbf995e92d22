#include "worker/quality.h"

#include <algorithm>
#include <cmath>

#include "common/errors.h"
#include "worker/backend.h"
#include "worker/weights.h"

namespace ringllama {

double TextScore::perplexity() const { return std::exp(mean_nll); }

TextScore score_store(const std::string& store_dir, const std::vector<int32_t>& ids) {
  RL_REQUIRE(ids.size() >= 2, "scoring needs at least 2 tokens (got {})", ids.size());
  std::unique_ptr<WeightSource> ws = open_store_weights(store_dir);
  const ModelConfig& m = ws->manifest().model;
  RL_REQUIRE(static_cast<int64_t>(ids.size()) <= m.max_position_embeddings,
             "{} tokens exceed the model's {} positions", ids.size(), m.max_position_embeddings);
  Config c;
  c.batch_size = 1;
  c.max_context = static_cast<int64_t>(ids.size());
  auto backend = make_cpu_backend(*ws, c);
  TextScore s;
  s.predictions = static_cast<int64_t>(ids.size()) - 1;
  s.top1.resize(static_cast<size_t>(s.predictions));
  const int64_t V = m.vocab_size;
  double nll = 0;
  // The last position predicts nothing in the text: it is not run.
  const std::vector<int32_t> input(ids.begin(), ids.end() - 1);
  backend->score(input, 0, [&](int64_t pos, const float* logits) {
    const float* best = std::max_element(logits, logits + V);
    // log-softmax in double around the largest logit.
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(logits[v]) - *best);
    nll += std::log(sum) - (static_cast<double>(logits[ids[static_cast<size_t>(pos) + 1]]) - *best);
    s.top1[static_cast<size_t>(pos)] = static_cast<int32_t>(best - logits);
  });
  s.mean_nll = nll / static_cast<double>(s.predictions);
  return s;
}

double top1_agreement(const TextScore& a, const TextScore& ref) {
  RL_REQUIRE(a.top1.size() == ref.top1.size() && !a.top1.empty(), "agreement of scores of {} and {} positions",
             a.top1.size(), ref.top1.size());
  size_t same = 0;
  for (size_t i = 0; i < a.top1.size(); ++i) same += a.top1[i] == ref.top1[i];
  return static_cast<double>(same) / static_cast<double>(a.top1.size());
}

}  // namespace ringllama
