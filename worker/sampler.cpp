#include "worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/errors.h"

namespace ringllama {

void SamplingParams::validate() const {
  RL_REQUIRE(std::isfinite(temperature) && temperature >= 0, "temperature must be >= 0 (got {})", temperature);
  RL_REQUIRE(top_k >= 0, "top_k must be >= 0 (got {}; 0 turns it off)", top_k);
  RL_REQUIRE(top_p > 0 && top_p <= 1, "top_p must be in (0, 1] (got {}; 1 turns it off)", top_p);
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) { p_.validate(); }

double Sampler::uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t argmax(const float* v, int64_t n) {
  RL_REQUIRE(n > 0, "cannot choose a token from an empty row of logits");
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (v[i] > v[best] || (std::isnan(v[best]) && !std::isnan(v[i]))) best = i;
  return static_cast<int32_t>(best);
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (p_.temperature == 0) return argmax(logits, n);
  RL_REQUIRE(n > 0, "cannot choose a token from an empty row of logits");

  // Candidates in order of logit (the order of probability), ties by index; only as far as needed.
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  auto before = [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  int64_t keep = n;
  if (p_.top_k > 0 && p_.top_k < n) {
    keep = p_.top_k;
    std::partial_sort(order_.begin(), order_.begin() + keep, order_.end(), before);
  } else if (p_.top_p < 1) {
    std::sort(order_.begin(), order_.end(), before);
  } else {
    // No truncation: any fixed order will do, keep the index order, and only the maximum matters.
    std::swap(order_[0], order_[argmax(logits, n)]);
  }

  // softmax(logits / T) over the kept candidates; order_[0] is the maximum in every branch.
  const double mx = logits[order_[0]];
  prob_.resize(keep);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    prob_[i] = std::exp((static_cast<double>(logits[order_[i]]) - mx) / p_.temperature);
    sum += prob_[i];
  }
  if (p_.top_p < 1) {
    double mass = 0;
    int64_t cut = 0;
    while (cut < keep) {
      mass += prob_[cut++];
      if (mass >= p_.top_p * sum) break;
    }
    keep = cut;
    sum = mass;
  }

  // One draw from the renormalised distribution.
  const double u = uniform() * sum;
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += prob_[i];
    if (u < acc) return order_[i];
  }
  return order_[keep - 1];  // rounding left u at the very top
}

}  // namespace ringllama
