// The sampler: greedy, temperature, top-k, top-p, seeds and parameter checks; the random numbers
// and the selection rule it shares with the GPU sampler (kernels/sample_common.h).
#include "worker/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
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

// ---------------------------------------------------------------------------------------------
// The shared generator and rule.

TEST(SampleRng, PhiloxKnownAnswers) {
  // Random123's kat_vectors for philox4x32 10: counter, key, output.
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const Philox4x32 got = philox4x32_10(Philox4x32{{k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]}}, k.key[0], k.key[1]);
    for (int j = 0; j < 4; ++j) EXPECT_EQ(got.v[j], k.out[j]) << "word " << j;
  }
}

TEST(SampleRng, DeterministicAndInRange) {
  for (uint64_t seed : {uint64_t{0}, uint64_t{1}, uint64_t{42}, ~uint64_t{0}}) {
    std::set<double> seen;
    for (uint64_t step = 0; step < 1000; ++step) {
      const double u = uniform01(seed, step);
      ASSERT_EQ(u, uniform01(seed, step));
      ASSERT_GE(u, 0.0);
      ASSERT_LT(u, 1.0);
      ASSERT_EQ(u, static_cast<double>(random_bits53(seed, step)) * 0x1.0p-53);
      seen.insert(u);
    }
    EXPECT_EQ(seen.size(), 1000u) << "seed " << seed;
  }
  // The high halves of seed and step matter too.
  EXPECT_NE(uniform01(1, 5), uniform01(1 + (uint64_t{1} << 32), 5));
  EXPECT_NE(uniform01(1, 5), uniform01(1, 5 + (uint64_t{1} << 32)));
  EXPECT_NE(uniform01(7, 0), uniform01(8, 0));
}

TEST(SampleRng, RoughlyUniform) {
  // Along a sequence's steps, and across seeds at one step.
  for (bool across_seeds : {false, true}) {
    const int draws = 200000, bins = 50;
    std::vector<int> h(bins);
    double sum = 0;
    for (int i = 0; i < draws; ++i) {
      const double u = across_seeds ? uniform01(static_cast<uint64_t>(i), 3) : uniform01(12345, static_cast<uint64_t>(i));
      sum += u;
      ++h[static_cast<int>(u * bins)];
    }
    double chi2 = 0;
    const double expect = static_cast<double>(draws) / bins;
    for (int c : h) chi2 += (c - expect) * (c - expect) / expect;
    EXPECT_LT(chi2, 100.0) << "49 degrees of freedom";  // p < 1e-4 for a fair generator
    EXPECT_NEAR(sum / draws, 0.5, 0.005);
  }
}

TEST(SampleRng, DrawPointIsFloorOfProduct) {
  EXPECT_EQ(sample_draw_point(0, 12345), 0u);
  EXPECT_EQ(sample_draw_point((uint64_t{1} << 53) - 1, 1000), 999u);
  EXPECT_EQ(sample_draw_point(uint64_t{1} << 52, 1001), 500u);  // u = 1/2
  const uint64_t big = (uint64_t{1} << 63) - 1;
  EXPECT_LT(sample_draw_point((uint64_t{1} << 53) - 1, big), big);
  for (uint64_t step = 0; step < 1000; ++step) {
    const uint64_t x = random_bits53(9, step), total = 1 + (random_bits53(10, step) >> 10);  // < 2^43
    // u * total in long double is exact here: 53 + 43 bits is more than 64, so compare bounds.
    const uint64_t r = sample_draw_point(x, total);
    ASSERT_LT(r, total);
    const unsigned __int128 prod = static_cast<unsigned __int128>(x) * total;
    ASSERT_LE(static_cast<unsigned __int128>(r) << 53, prod);
    ASSERT_GT((static_cast<unsigned __int128>(r) + 1) << 53, prod);
  }
}

TEST(SampleRule, KeyOrdersLikeTheLogits) {
  const std::vector<float> v = {-INFINITY, -1e30f, -2.5f, -1e-40f, 0.0f, 1e-40f, 1.0f, 3.5f, 1e30f, INFINITY};
  for (size_t a = 0; a < v.size(); ++a)
    for (size_t b = 0; b < v.size(); ++b) EXPECT_EQ(sample_key(v[a]) < sample_key(v[b]), v[a] < v[b]) << a << " " << b;
  EXPECT_EQ(sample_key(-0.0f), sample_key(0.0f));
  EXPECT_EQ(sample_key(NAN), sample_key(-INFINITY));
  EXPECT_EQ(sample_key(-NAN), sample_key(-INFINITY));
  EXPECT_GT(sample_key(-INFINITY), 0u);  // key 0 is below every token: SampleCut{0, n - 1} keeps all
}

TEST(SampleRule, WeightsAreFixedPoint) {
  EXPECT_EQ(sample_weight(3.0f, 3.0, 0.7), uint64_t{1} << 40);
  EXPECT_EQ(sample_weight(2.0f, 3.0, 1.0), static_cast<uint64_t>(std::exp(-1.0) * 0x1.0p40 + 0.5));
  EXPECT_EQ(sample_weight(-30.0f, 0.0, 1.0), 0u);
  EXPECT_EQ(sample_weight(NAN, 0.0, 1.0), 0u);
  EXPECT_EQ(sample_weight(-INFINITY, 0.0, 1.0), 0u);
  EXPECT_EQ(sample_top_p_target(0.5, 10), 5u);
  EXPECT_EQ(sample_top_p_target(0.51, 10), 6u);
  EXPECT_EQ(sample_top_p_target(1e-300, 10), 1u);
  EXPECT_EQ(sample_top_p_target(1.0, 10), 10u);
}

// The rule written the plain way: a full sort by rank, the cuts, the kept tokens in index order.
int32_t reference_pick(const std::vector<float>& l, const SampleParams& p) {
  const int n = static_cast<int>(l.size());
  const int32_t best = argmax(l.data(), n);
  if (!(p.temperature > 0) || !std::isfinite(l[best])) return best;
  std::vector<int32_t> rank(n);
  std::iota(rank.begin(), rank.end(), 0);
  std::sort(rank.begin(), rank.end(), [&](int a, int b) {
    return sample_key(l[a]) > sample_key(l[b]) || (sample_key(l[a]) == sample_key(l[b]) && a < b);
  });
  auto w = [&](int i) { return sample_weight(l[i], l[best], p.temperature); };
  int keep = p.top_k > 0 && p.top_k < n ? p.top_k : n;
  if (p.top_p < 1) {
    uint64_t total = 0;
    for (int j = 0; j < keep; ++j) total += w(rank[j]);
    const uint64_t target = sample_top_p_target(p.top_p, total);
    uint64_t mass = 0;
    int j = 0;
    while (mass < target) mass += w(rank[j++]);
    keep = j;
  }
  std::vector<int32_t> kept(rank.begin(), rank.begin() + keep);
  std::sort(kept.begin(), kept.end());
  uint64_t total = 0;
  for (int32_t i : kept) total += w(i);
  const uint64_t r = sample_draw_point(random_bits53(p.seed, p.step), total);
  uint64_t acc = 0;
  for (int32_t i : kept)
    if ((acc += w(i)) > r) return i;
  return -1;
}

SampleParams row(double t, int32_t k, double p, uint64_t seed, uint64_t step) {
  SampleParams r{};
  r.temperature = t;
  r.top_k = k;
  r.top_p = p;
  r.seed = seed;
  r.step = step;
  return r;
}

TEST(SampleRule, SampleRowFollowsThePlainRule) {
  SampleScratch scratch;
  std::mt19937_64 rng(5);
  for (int c = 0; c < 400; ++c) {
    const int n = 1 + static_cast<int>(rng() % 3000);
    auto l = random_logits(n, 1000 + c);
    // Ties and odd values: quantised logits, a NaN, a -inf.
    if (c % 3 == 0)
      for (auto& x : l) x = std::round(x * 2) / 2;
    if (c % 5 == 0) l[rng() % n] = NAN;
    if (c % 7 == 0) l[rng() % n] = -INFINITY;
    const double temps[] = {0.0, 0.3, 1.0, 2.5};
    const int32_t ks[] = {0, 1, 2, 40, 700};
    const double ps[] = {1.0, 0.95, 0.5, 0.05};
    const SampleParams p = row(temps[rng() % 4], ks[rng() % 5], ps[rng() % 4], rng(), rng() % 1000);
    ASSERT_EQ(sample_row(l.data(), n, p, scratch), reference_pick(l, p))
        << "case " << c << " n " << n << " T " << p.temperature << " k " << p.top_k << " p " << p.top_p;
  }
}

TEST(SampleRule, SamplerStateIsSeedAndStep) {
  const SamplingParams sp = params(0.8, 20, 0.9, 31);
  Sampler a(sp);
  auto l = random_logits(1000, 3);
  std::vector<int32_t> picks;
  for (int i = 0; i < 50; ++i) picks.push_back(a.sample(l));
  EXPECT_EQ(a.step(), 50u);
  // A sampler that starts at step 20 continues the sequence; the rows for the GPU carry the steps.
  Sampler b(sp, 20);
  SampleScratch scratch;
  for (int i = 20; i < 50; ++i) {
    const SampleParams p = b.next_row_params();
    EXPECT_EQ(p.step, static_cast<uint64_t>(i));
    EXPECT_EQ(p.seed, 31u);
    EXPECT_EQ(p.top_k, 20);
    EXPECT_EQ(sample_row(l.data(), 1000, p, scratch), picks[i]) << "step " << i;
  }
  EXPECT_EQ(b.step(), 50u);
}

TEST(SampleRule, ArgmaxTreatsNanAsMinusInfinity) {
  EXPECT_EQ(argmax(std::vector<float>{NAN, -INFINITY}.data(), 2), 0);
  EXPECT_EQ(argmax(std::vector<float>{NAN, -1.0f, NAN}.data(), 3), 1);
  EXPECT_EQ(argmax(std::vector<float>{-0.0f, 0.0f}.data(), 2), 0);
  // A row without a finite maximum falls back to the argmax when sampling too.
  SampleScratch scratch;
  const std::vector<float> l = {1.0f, INFINITY, 2.0f, INFINITY};
  EXPECT_EQ(sample_row(l.data(), 4, row(1.0, 0, 1.0, 1, 1), scratch), 1);
}

}  // namespace
}  // namespace ringllama
