#include "worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/errors.h"

namespace ringllama {

void SamplingParams::validate() const {
  RL_REQUIRE(std::isfinite(temperature) && temperature >= 0, "temperature must be >= 0 (got {})", temperature);
  RL_REQUIRE(top_k >= 0, "top_k must be >= 0 (got {}; 0 turns it off)", top_k);
  RL_REQUIRE(top_p > 0 && top_p <= 1, "top_p must be in (0, 1] (got {}; 1 turns it off)", top_p);
}

int32_t argmax(const float* v, int64_t n) {
  RL_REQUIRE(n > 0, "cannot choose a token from an empty row of logits");
  int64_t best = 0;
  uint32_t best_key = sample_key(v[0]);
  for (int64_t i = 1; i < n; ++i) {
    const uint32_t k = sample_key(v[i]);
    if (k > best_key) {
      best = i;
      best_key = k;
    }
  }
  return static_cast<int32_t>(best);
}

int32_t sample_row(const float* logits, int64_t n, const SampleParams& p, SampleScratch& scratch) {
  RL_REQUIRE(n > 0, "cannot choose a token from an empty row of logits");
  RL_REQUIRE(n <= kSampleMaxVocab, "a row of {} logits is more than the sampler's limit of {}", n, kSampleMaxVocab);
  const int32_t best = argmax(logits, n);
  const double mx = logits[best];
  // Parameters out of range act as the GPU sampler treats them: no temperature is greedy, top_k
  // outside (0, n) and top_p >= 1 (or NaN) are off.
  if (!(p.temperature > 0) || !std::isfinite(mx)) return best;

  std::vector<uint32_t>& key = scratch.keys;
  std::vector<uint64_t>& w = scratch.weights;
  key.resize(n);
  w.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    key[i] = sample_key(logits[i]);
    w[i] = sample_weight(logits[i], mx, p.temperature);
  }

  // Candidates order[0, keep), in no particular order until the top_p step sorts a prefix.
  std::vector<int32_t>& order = scratch.order;
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&key](int32_t a, int32_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); };
  // The kept tokens: those ranked at or before `cut`; `total` their weight.
  int64_t keep = n;
  SampleCut cut{0, static_cast<int32_t>(n - 1)};
  if (p.top_k > 0 && p.top_k < n) {
    keep = p.top_k;
    std::nth_element(order.begin(), order.begin() + keep - 1, order.end(), before);
    cut = SampleCut{key[order[keep - 1]], order[keep - 1]};
  }
  uint64_t total = 0;
  for (int64_t i = 0; i < keep; ++i) total += w[order[i]];

  if (p.top_p < 1) {
    const uint64_t target = sample_top_p_target(p.top_p, total);
    // The shortest ranked prefix that reaches the target, sorted only as far as needed: a nucleus
    // is usually a few dozen tokens of a vocabulary of 128k.
    uint64_t mass = 0;
    int64_t taken = 0, sorted = 0;
    for (int64_t span = 64; mass < target && taken < keep;) {
      if (taken == sorted) {
        const int64_t upto = std::min(keep, sorted + span);
        span *= 4;
        // The next best candidates: select them (linear), then order just those.
        std::nth_element(order.begin() + sorted, order.begin() + upto - 1, order.begin() + keep, before);
        std::sort(order.begin() + sorted, order.begin() + upto, before);
        sorted = upto;
      }
      mass += w[order[taken++]];
    }
    cut = SampleCut{key[order[taken - 1]], order[taken - 1]};
    total = mass;
  }

  // The draw walks the kept tokens in index order, as the GPU does (sample_common.h, step 5).
  const uint64_t r = sample_draw_point(random_bits53(p.seed, p.step), total);
  uint64_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!sample_kept(cut, key[i], static_cast<int32_t>(i))) continue;
    acc += w[i];
    if (acc > r) return static_cast<int32_t>(i);
  }
  return best;  // not reached: r < total, and total >= the best token's 2^40
}

Sampler::Sampler(const SamplingParams& p, uint64_t first_step) : p_(p), step_(first_step) { p_.validate(); }

SampleParams Sampler::row_params() const {
  SampleParams r{};
  r.temperature = p_.temperature;
  r.top_p = p_.top_p;
  r.seed = p_.seed;
  r.step = step_;
  // Any top_k beyond int32 is beyond every vocabulary: off.
  r.top_k = p_.top_k <= std::numeric_limits<int32_t>::max() ? static_cast<int32_t>(p_.top_k) : 0;
  r.reserved = 0;
  return r;
}

SampleParams Sampler::next_row_params() {
  const SampleParams r = row_params();
  ++step_;
  return r;
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  const int32_t tok = sample_row(logits, n, row_params(), scratch_);
  ++step_;
  return tok;
}

}  // namespace ringllama
