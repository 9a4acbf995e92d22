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

  // Unnormalised probabilities exp((logit - max) / T), in double.
  const double mx = logits[argmax(logits, n)];
  weights_.resize(n);
  for (int64_t i = 0; i < n; ++i) weights_[i] = std::exp((static_cast<double>(logits[i]) - mx) / p_.temperature);
  auto weight = [this](int32_t i) { return weights_[i]; };

  // Candidates in order of logit (the order of probability), ties by index; sorted only as far as
  // needed: a nucleus is usually a few dozen tokens of a vocabulary of 128k.
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  auto before = [logits](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  int64_t keep = n, sorted = 0;
  if (p_.top_k > 0 && p_.top_k < n) {
    keep = sorted = p_.top_k;
    std::partial_sort(order_.begin(), order_.begin() + keep, order_.end(), before);
  }
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += weight(order_[i]);

  if (p_.top_p < 1) {
    // The smallest prefix whose mass reaches top_p of what top_k kept (at least one token).
    const double target = p_.top_p * total;
    double mass = 0;
    int64_t cut = 0;
    for (int64_t span = 64; cut < keep;) {
      if (sorted < keep) {
        const int64_t upto = std::min(keep, sorted + span);
        // The next best `span` candidates: select them (linear), then order just those.
        std::nth_element(order_.begin() + sorted, order_.begin() + upto - 1, order_.begin() + keep, before);
        std::sort(order_.begin() + sorted, order_.begin() + upto, before);
        sorted = upto;
        span *= 4;
      }
      while (cut < sorted && mass < target) mass += weight(order_[cut++]);
      if (mass >= target) break;
    }
    keep = std::max<int64_t>(cut, 1);
    total = mass;
  }

  // One draw from the renormalised distribution over order_[0, keep).
  const double u = uniform() * total;
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += weight(order_[i]);
    if (u < acc) return order_[i];
  }
  return order_[keep - 1];  // rounding left u at the very top
}

}  // namespace ringllama
