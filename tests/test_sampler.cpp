// The sampler: greedy, temperature, top-k, top-p, seeds and parameter checks.
#include "worker/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "common/errors.h"

namespace ringllama {
namespace {

std::vector<float> random_logits(int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// Logits whose softmax at temperature 1 is exactly `p`.
std::vector<float> logits_of(const std::vector<double>& p) {
  std::vector<float> v;
  for (double x : p) v.push_back(static_cast<float>(std::log(x)));
  return v;
}

std::map<int32_t, int> histogram(Sampler& s, const std::vector<float>& logits, int draws) {
  std::map<int32_t, int> h;
  for (int i = 0; i < draws; ++i) ++h[s.sample(logits)];
  return h;
}

SamplingParams params(double t, int64_t k, double p, uint64_t seed) {
  SamplingParams sp;
  sp.temperature = t;
  sp.top_k = k;
  sp.top_p = p;
  sp.seed = seed;
  return sp;
}

TEST(Sampler, GreedyIsArgmaxLowestIndexOnTies) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample({0.1f, 3.0f, -1.0f, 3.0f}), 1);
  EXPECT_EQ(s.sample({5.0f}), 0);
  EXPECT_EQ(s.sample({-2.0f, -1.0f, -1.0f}), 1);
  auto l = random_logits(1000, 4);
  EXPECT_EQ(s.sample(l), std::max_element(l.begin(), l.end()) - l.begin());
}

TEST(Sampler, SameSeedSameTokens) {
  Sampler a(params(0.9, 0, 1, 42)), b(params(0.9, 0, 1, 42));
  Sampler c(params(0.9, 40, 0.9, 42)), d(params(0.9, 40, 0.9, 42));
  for (int i = 0; i < 300; ++i) {
    auto l = random_logits(500, i);
    ASSERT_EQ(a.sample(l), b.sample(l)) << i;
    ASSERT_EQ(c.sample(l), d.sample(l)) << i;
  }
}

TEST(Sampler, DifferentSeedsDiffer) {
  Sampler a(params(1.0, 0, 1, 1)), b(params(1.0, 0, 1, 2));
  auto l = random_logits(200, 7);
  int same = 0;
  const int draws = 500;
  for (int i = 0; i < draws; ++i) same += a.sample(l) == b.sample(l);
  EXPECT_LT(same, draws / 4);
}

TEST(Sampler, TopK1EqualsGreedy) {
  Sampler greedy(SamplingParams{});
  Sampler k1(params(1.5, 1, 1, 3)), k1p(params(0.7, 1, 0.3, 9));
  for (int i = 0; i < 100; ++i) {
    auto l = random_logits(300, 100 + i);
    const int32_t g = greedy.sample(l);
    EXPECT_EQ(k1.sample(l), g);
    EXPECT_EQ(k1p.sample(l), g);
  }
  // Ties: the lowest index, as greedy.
  EXPECT_EQ(k1.sample({1.0f, 2.0f, 2.0f, 0.0f}), 1);
}

TEST(Sampler, TopKRestrictsTheSupport) {
  auto l = random_logits(50, 11);
  std::vector<int32_t> idx(50);
  for (int i = 0; i < 50; ++i) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](int a, int b) { return l[a] > l[b]; });
  // A high temperature flattens the distribution so that every kept token shows up.
  Sampler s(params(20.0, 5, 1, 5));
  auto h = histogram(s, l, 5000);
  const std::set<int32_t> allowed(idx.begin(), idx.begin() + 5);
  for (auto [tok, n] : h) EXPECT_TRUE(allowed.count(tok)) << "token " << tok << " drawn " << n << " times";
  for (int32_t tok : allowed) EXPECT_GT(h[tok], 5000 / 5 / 3) << "token " << tok;
}

TEST(Sampler, TopPKeepsTheSmallestPrefixWithTheMass) {
  const auto l = logits_of({0.05, 0.5, 0.1, 0.3, 0.05});
  {
    Sampler s(params(1.0, 0, 0.75, 1));  // 0.5 + 0.3 reaches 0.75
    auto h = histogram(s, l, 4000);
    EXPECT_EQ(h.size(), 2u);
    // Renormalised: 0.5 / 0.8 and 0.3 / 0.8.
    EXPECT_NEAR(h[1] / 4000.0, 0.625, 0.04);
    EXPECT_NEAR(h[3] / 4000.0, 0.375, 0.04);
  }
  {
    Sampler s(params(1.0, 0, 0.85, 2));  // needs the 0.1 as well
    auto h = histogram(s, l, 4000);
    EXPECT_EQ((std::set<int32_t>{1, 3, 2}), [&] {
      std::set<int32_t> k;
      for (auto [t, n] : h) k.insert(t);
      return k;
    }());
    EXPECT_GT(h[2], 4000 / 9 / 2);
  }
  {
    Sampler s(params(1.0, 0, 0.01, 3));  // always at least the most likely token
    auto h = histogram(s, l, 200);
    EXPECT_EQ(h.size(), 1u);
    EXPECT_EQ(h[1], 200);
  }
}

// A nucleus of hundreds of tokens out of thousands: only those are ever drawn, and the boundary
// tokens on both sides of the cut behave.
TEST(Sampler, TopPOnALargeVocabulary) {
  const int n = 5000;
  std::vector<float> l(n);
  std::mt19937_64 rng(8);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& x : l) x = nd(rng);
  for (double top_p : {0.3, 0.9}) {
    std::vector<int> idx(n);
    for (int i = 0; i < n; ++i) idx[i] = i;
    std::sort(idx.begin(), idx.end(), [&](int a, int b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    double total = 0;
    for (float x : l) total += std::exp(static_cast<double>(x));
    double mass = 0;
    size_t cut = 0;
    while (cut < idx.size() && mass < top_p * total) mass += std::exp(static_cast<double>(l[idx[cut++]]));
    ASSERT_GT(cut, 64u);  // past the first partial sort
    const std::set<int32_t> nucleus(idx.begin(), idx.begin() + cut);
    Sampler s(params(1.0, 0, top_p, 17));
    auto h = histogram(s, l, 4000);
    for (auto [tok, count] : h) EXPECT_TRUE(nucleus.count(tok)) << "token " << tok << " outside the nucleus";
    EXPECT_GT(h.size(), std::min<size_t>(cut / 2, 1000)) << "top_p " << top_p;
  }
}

TEST(Sampler, TopKThenTopP) {
  // top_k = 3 keeps {1, 3, 2} (0.5, 0.3, 0.1, renormalised /0.9); top_p = 0.8 of that needs 1 and 3.
  const auto l = logits_of({0.05, 0.5, 0.1, 0.3, 0.05});
  Sampler s(params(1.0, 3, 0.8, 4));
  auto h = histogram(s, l, 3000);
  EXPECT_EQ(h.size(), 2u);
  EXPECT_GT(h[1], 0);
  EXPECT_GT(h[3], 0);
}

TEST(Sampler, TemperatureShapesTheDistribution) {
  const std::vector<float> l = {0.0f, 1.0f, 2.0f, 3.0f};
  for (double t : {0.5, 1.0, 2.0}) {
    Sampler s(params(t, 0, 1, 77));
    const int draws = 20000;
    auto h = histogram(s, l, draws);
    double z = 0;
    for (float x : l) z += std::exp(x / t);
    double chi2 = 0;
    for (int i = 0; i < 4; ++i) {
      const double expect = draws * std::exp(l[i] / t) / z;
      chi2 += (h[i] - expect) * (h[i] - expect) / expect;
    }
    EXPECT_LT(chi2, 25.0) << "temperature " << t;  // 3 degrees of freedom: 25 is far in the tail
  }
}

TEST(Sampler, RejectsBadParameters) {
  auto msg = [](SamplingParams p) -> std::string {
    try {
      Sampler s(p);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_NE(msg(params(-0.5, 0, 1, 0)).find("temperature must be >= 0"), std::string::npos);
  EXPECT_NE(msg(params(NAN, 0, 1, 0)).find("temperature"), std::string::npos);
  EXPECT_NE(msg(params(1, -1, 1, 0)).find("top_k must be >= 0"), std::string::npos);
  EXPECT_NE(msg(params(1, 0, 0, 0)).find("top_p must be in (0, 1]"), std::string::npos);
  EXPECT_NE(msg(params(1, 0, 1.5, 0)).find("top_p"), std::string::npos);
  EXPECT_EQ(msg(params(0, 0, 1, 0)), "(no error)");
  Sampler s(params(1, 0, 1, 0));
  EXPECT_THROW(s.sample(std::vector<float>{}), Error);
  Sampler g(SamplingParams{});
  EXPECT_THROW(g.sample(std::vector<float>{}), Error);
}

}  // namespace
}  // namespace ringllama
