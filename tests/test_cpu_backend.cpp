// The CPU backend: its operations, its KV cache, and the whole forward against an independent
// double-precision implementation written here from the transformers LlamaForCausalLM semantics.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>

#include "common/errors.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"
#include "worker/backend.h"
#include "worker/cpu_backend.h"

namespace ringllama {
namespace {

using test::MemoryWeights;
using test::TinyModel;

Config config_with_context(int64_t max_context) {
  Config c;
  c.max_context = max_context;
  return c;
}

// Largest |a - b| relative to the largest |b|.
double rel_diff(const std::vector<float>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / std::max(den, 1e-30);
}

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// ---- An independent forward in double precision ----

std::vector<double> widen(const bf16_t* p, int64_t n) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_to_f32(p[i]);
  return v;
}

// Row o of a stored weight as the formats define it (common/quant.h).
std::vector<float> weight_row(const MatrixView& w, int64_t o) {
  std::vector<float> row(static_cast<size_t>(w.cols));
  const auto* bytes = static_cast<const uint8_t*>(w.data);
  if (w.dtype == DType::BF16) {
    for (int64_t i = 0; i < w.cols; ++i) row[i] = bf16_to_f32(w.bf16()[o * w.cols + i]);
  } else if (w.dtype == DType::FP8_E4M3) {
    float scale;
    std::memcpy(&scale, static_cast<const char*>(w.scales) + 4 * o, 4);
    dequantize_row_fp8(bytes + o * w.cols, scale, w.cols, row.data());
  } else {
    const auto* sm = static_cast<const uint16_t*>(w.scales) + o * (w.cols / w.group) * 2;
    dequantize_row_int4(bytes + o * (w.cols / 2), sm, w.cols, w.group, row.data());
  }
  return row;
}

// y = W x with W [out, in] (transformers' nn.Linear layout).
std::vector<double> linear(const MatrixView& w, int64_t out, int64_t in, const std::vector<double>& x) {
  EXPECT_EQ(w.rows, out);
  EXPECT_EQ(w.cols, in);
  std::vector<double> y(out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    const std::vector<float> row = weight_row(w, o);
    for (int64_t i = 0; i < in; ++i) y[o] += static_cast<double>(row[i]) * x[i];
  }
  return y;
}

std::vector<double> rmsnorm(const std::vector<double>& x, const bf16_t* w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = bf16_to_f32(w[i]) * x[i] * r;
  return y;
}

// Inverse frequencies written out again from transformers' _compute_llama3_parameters.
std::vector<double> naive_inv_freq(const ModelConfig& m) {
  std::vector<double> f(m.head_dim / 2);
  for (size_t i = 0; i < f.size(); ++i) f[i] = std::pow(m.rope_theta, -2.0 * i / m.head_dim);
  if (m.rope_scaling.type == "llama3") {
    const auto& s = m.rope_scaling;
    const double old = s.original_max_position_embeddings;
    for (double& v : f) {
      const double wavelen = 2 * M_PI / v;
      if (wavelen < old / s.high_freq_factor) continue;
      if (wavelen > old / s.low_freq_factor) {
        v /= s.factor;
      } else {
        const double smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        v = (1 - smooth) * v / s.factor + smooth * v;
      }
    }
  }
  return f;
}

void naive_rope(double* v, int64_t hd, int64_t pos, const std::vector<double>& f) {
  std::vector<double> x(v, v + hd);
  for (int64_t i = 0; i < hd; ++i) {
    const int64_t j = i % (hd / 2);
    const double c = std::cos(pos * f[j]), s = std::sin(pos * f[j]);
    const double rot = i < hd / 2 ? -x[i + hd / 2] : x[i - hd / 2];  // rotate_half
    v[i] = x[i] * c + rot * s;
  }
}

// Logits of every position of `tokens`, from scratch.
std::vector<std::vector<double>> naive_forward(const TinyModel& tm, const std::vector<int32_t>& tokens) {
  const ModelConfig& m = tm.manifest.model;
  const int64_t T = tokens.size(), dim = m.dim, hd = m.head_dim;
  const char* base = tm.image.data();
  const GlobalWeights g = globals_view(tm.manifest, base + tm.manifest.globals().offset);
  const auto inv = naive_inv_freq(m);
  std::vector<std::vector<double>> x(T);
  for (int64_t t = 0; t < T; ++t) x[t] = widen(g.tok_embeddings + tokens[t] * dim, dim);
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const LayerWeights w = layer_view(tm.manifest, l, base + tm.manifest.layer_offset(l));
    std::vector<std::vector<double>> q(T), k(T), v(T);
    for (int64_t t = 0; t < T; ++t) {
      auto h = rmsnorm(x[t], w.attn_norm, m.norm_eps);
      q[t] = linear(w.wq, m.q_dim(), dim, h);
      k[t] = linear(w.wk, m.kv_dim(), dim, h);
      v[t] = linear(w.wv, m.kv_dim(), dim, h);
      for (int64_t hh = 0; hh < m.n_heads; ++hh) naive_rope(q[t].data() + hh * hd, hd, t, inv);
      for (int64_t hh = 0; hh < m.n_kv_heads; ++hh) naive_rope(k[t].data() + hh * hd, hd, t, inv);
    }
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> att(m.q_dim(), 0.0);
      for (int64_t hh = 0; hh < m.n_heads; ++hh) {
        const int64_t kvh = hh / (m.n_heads / m.n_kv_heads);
        std::vector<double> s(t + 1);
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j <= t; ++j) {
          s[j] = 0;
          for (int64_t i = 0; i < hd; ++i) s[j] += q[t][hh * hd + i] * k[j][kvh * hd + i];
          s[j] /= std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t i = 0; i < hd; ++i) att[hh * hd + i] += s[j] / sum * v[j][kvh * hd + i];
      }
      auto o = linear(w.wo, dim, m.q_dim(), att);
      for (int64_t i = 0; i < dim; ++i) x[t][i] += o[i];
      auto h = rmsnorm(x[t], w.ffn_norm, m.norm_eps);
      auto gate = linear(w.w1, m.ffn_dim, dim, h);
      auto up = linear(w.w3, m.ffn_dim, dim, h);
      for (int64_t i = 0; i < m.ffn_dim; ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
      auto down = linear(w.w2, dim, m.ffn_dim, gate);
      for (int64_t i = 0; i < dim; ++i) x[t][i] += down[i];
    }
  }
  std::vector<std::vector<double>> logits(T);
  for (int64_t t = 0; t < T; ++t) logits[t] = linear(g.output, m.vocab_size, dim, rmsnorm(x[t], g.norm, m.norm_eps));
  return logits;
}

// ---- Thread pool ----

TEST(ThreadPool, EveryIndexRunsOnceOnAKnownThread) {
  for (int threads : {1, 2, 5}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.threads(), threads);
    for (int64_t n : {0, 1, 7, 1000}) {
      for (int round = 0; round < 20; ++round) {
        std::vector<std::atomic<int>> hits(n);
        std::atomic<int> bad_thread{0};
        pool.parallel_for(n, [&](int64_t i, int t) {
          hits[i].fetch_add(1);
          if (t < 0 || t >= threads) bad_thread.fetch_add(1);
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "threads " << threads << " n " << n;
        EXPECT_EQ(bad_thread.load(), 0);
      }
    }
  }
  EXPECT_GE(usable_cores(), 1);
  EXPECT_GE(ThreadPool().threads(), 1);
}

// ---- Operations ----

TEST(CpuOps, MatmulMatchesNaiveAtOddSizes) {
  ThreadPool pool(3);
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd;
  // Sizes that are not multiples of the vector width, the row block or the k block.
  for (auto [T, in, out] : std::vector<std::array<int64_t, 3>>{{1, 13, 37}, {5, 1030, 70}, {2, 8, 1}, {3, 600, 33}}) {
    std::vector<float> x(T * in);
    std::vector<bf16_t> w(out * in);
    for (auto& v : x) v = nd(rng);
    for (auto& v : w) v = f32_to_bf16(nd(rng));
    std::vector<float> y(T * out, -1.0f);
    cpu::matmul_bf16(&pool, x.data(), T, in, w.data(), out, y.data());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < out; ++o) {
        double ref = 0;
        for (int64_t i = 0; i < in; ++i) ref += static_cast<double>(x[t * in + i]) * bf16_to_f32(w[o * in + i]);
        ASSERT_NEAR(y[t * out + o], ref, 1e-4 * std::sqrt(static_cast<double>(in)))
            << "T=" << T << " in=" << in << " out=" << out << " t=" << t << " o=" << o;
      }
  }
}

// A row's result is the same bits whether it is computed alone (decode) or with other rows
// (prefill): chunked prefill and decode reproduce a full forward exactly.
TEST(CpuOps, MatmulRowDoesNotDependOnTheTokenCount) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd;
  for (int64_t in : {8, 172, 1030}) {
    const int64_t out = 45, T = 5;
    ThreadPool pool(2);
    std::vector<float> x(T * in);
    std::vector<bf16_t> w(out * in);
    for (auto& v : x) v = nd(rng);
    for (auto& v : w) v = f32_to_bf16(nd(rng));
    std::vector<float> all(T * out), one(out);
    cpu::matmul_bf16(&pool, x.data(), T, in, w.data(), out, all.data());
    for (int64_t t = 0; t < T; ++t) {
      cpu::matmul_bf16(nullptr, x.data() + t * in, 1, in, w.data(), out, one.data());
      EXPECT_TRUE(std::equal(one.begin(), one.end(), all.begin() + t * out)) << "in=" << in << " t=" << t;
    }
  }
}

TEST(CpuOps, RopeRotatesHalves) {
  ModelConfig m = test::tiny_config();
  auto inv = cpu::rope_inv_freq_f32(m);
  std::vector<float> v(m.head_dim);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.1f * (i + 1);
  std::vector<double> ref(v.begin(), v.end());
  cpu::rope(v.data(), 1, m.head_dim, 7, inv);
  naive_rope(ref.data(), m.head_dim, 7, naive_inv_freq(m));
  for (int64_t i = 0; i < m.head_dim; ++i) EXPECT_NEAR(v[i], ref[i], 1e-5) << i;
  // Position 0 leaves the vector alone.
  std::vector<float> z = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  auto z0 = z;
  cpu::rope(z.data(), 1, 12, 0, inv);
  EXPECT_EQ(z, z0);
}

TEST(CpuOps, RmsNormMatchesFormula) {
  std::vector<float> x = {1, -2, 3, 0.5f};
  std::vector<bf16_t> w = {f32_to_bf16(1), f32_to_bf16(2), f32_to_bf16(0.5f), f32_to_bf16(-1)};
  std::vector<float> y(4);
  cpu::rms_norm(x.data(), w.data(), 1, 4, 1e-5f, y.data());
  const double r = 1 / std::sqrt((1 + 4 + 9 + 0.25) / 4 + 1e-5);
  EXPECT_NEAR(y[0], 1 * r, 1e-6);
  EXPECT_NEAR(y[1], -4 * r, 1e-6);
  EXPECT_NEAR(y[2], 1.5 * r, 1e-6);
  EXPECT_NEAR(y[3], -0.5 * r, 1e-6);
}

// ---- The whole forward ----

void expect_matches_naive(const ModelConfig& m, int64_t n_tokens, uint64_t seed, TensorFormat linear = {}) {
  TinyModel tm(m, seed, 0.08f, linear);
  for (const TensorEntry& t : tm.manifest.attn(0).tensors) {
    if (tensor_packable(t.name)) ASSERT_EQ(t.dtype, linear.dtype) << t.name;
  }
  MemoryWeights ws(tm);
  auto backend = make_cpu_backend(ws, config_with_context(m.max_position_embeddings));
  auto tokens = test::random_tokens(n_tokens, m.vocab_size, seed + 100);
  auto ref = naive_forward(tm, tokens);
  // One prefill gives the last position; decoding one by one gives every position.
  auto last = backend->forward(tokens, 0);
  EXPECT_LT(rel_diff(last, ref.back()), 1e-4);
  backend->reset();
  for (int64_t t = 0; t < n_tokens; ++t) {
    auto row = backend->forward({tokens[t]}, t);
    EXPECT_LT(rel_diff(row, ref[t]), 1e-4) << "position " << t;
  }
}

TEST(CpuBackend, OneLayerMatchesNaiveDouble) {
  ModelConfig m = test::tiny_config();
  m.n_layers = 1;
  m.dim = 16;
  m.n_heads = 2;
  m.n_kv_heads = 1;
  m.head_dim = 8;
  m.ffn_dim = 24;
  m.vocab_size = 11;
  expect_matches_naive(m, 5, 7);
}

TEST(CpuBackend, TinyModelMatchesNaiveDouble) { expect_matches_naive(test::tiny_config(), 12, 11); }

TEST(CpuBackend, Llama3RopeScalingAndTiedEmbeddingsMatchNaive) {
  ModelConfig m = test::tiny_config();
  m.rope_theta = 500000.0;
  m.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 16};  // short original context: all three bands occur
  m.tie_word_embeddings = true;
  m.head_dim = 16;
  m.n_heads = 3;
  m.n_kv_heads = 1;
  expect_matches_naive(m, 20, 13);
}

// ---- Packed weights (fp8, int4): the forward of the dequantized weights ----

ModelConfig packable_config() {
  ModelConfig m = test::tiny_config();
  m.dim = 64;
  m.head_dim = 16;
  m.ffn_dim = 96;  // every input count a multiple of 32
  return m;
}

TEST(CpuBackend, Fp8StoreMatchesNaiveDouble) { expect_matches_naive(packable_config(), 9, 21, {DType::FP8_E4M3, 0}); }

TEST(CpuBackend, Int4StoreMatchesNaiveDouble) { expect_matches_naive(packable_config(), 9, 22, {DType::INT4, 32}); }

TEST(CpuBackend, Int4Group128StoreMatchesNaiveDouble) {
  ModelConfig m = packable_config();
  m.dim = 128;
  m.head_dim = 32;
  m.ffn_dim = 256;
  expect_matches_naive(m, 6, 23, {DType::INT4, 128});
}

// Logits of every position, by decoding one token at a time.
std::vector<std::vector<float>> all_logits(WeightSource& ws, const std::vector<int32_t>& tokens) {
  auto b = make_cpu_backend(ws, config_with_context(64));
  std::vector<std::vector<float>> rows;
  for (size_t t = 0; t < tokens.size(); ++t) rows.push_back(b->forward({tokens[t]}, static_cast<int64_t>(t)));
  return rows;
}

TEST(CpuBackend, PackedStoresStayCloseToTheBf16Store) {
  const ModelConfig m = packable_config();
  const auto tokens = test::random_tokens(16, m.vocab_size, 77);
  TinyModel bf16(m, 31), fp8(m, 31, 0.08f, {DType::FP8_E4M3, 0}), int4(m, 31, 0.08f, {DType::INT4, 32});
  MemoryWeights wb(bf16), wf(fp8), wi(int4);
  const auto ref = all_logits(wb, tokens), f = all_logits(wf, tokens), q = all_logits(wi, tokens);
  double worst_f = 0, worst_q = 0;
  for (size_t t = 0; t < tokens.size(); ++t) {
    worst_f = std::max(worst_f, rel_diff(f[t], to_double(ref[t])));
    worst_q = std::max(worst_q, rel_diff(q[t], to_double(ref[t])));
  }
  std::cout << "largest logit difference from bf16, relative: fp8 " << worst_f << ", int4 g32 " << worst_q << "\n";
  // Random weights through two layers magnify the rounding (fp8 ~3% per weight, int4 g32 ~10%);
  // the naive-double tests above hold the forward itself to 1e-4.
  EXPECT_GT(worst_f, 0.0);  // the weights really are other values
  EXPECT_LT(worst_f, 0.2);
  EXPECT_GT(worst_q, worst_f);
  EXPECT_LT(worst_q, 0.6);
}

TEST(CpuBackend, ScoreGivesEveryPositionsLogits) {
  const ModelConfig m = packable_config();
  TinyModel tm(m, 41, 0.08f, {DType::INT4, 32});
  MemoryWeights ws(tm);
  const auto tokens = test::random_tokens(11, m.vocab_size, 5);
  const auto want = all_logits(ws, tokens);
  Config c = config_with_context(64);
  c.prefill_chunk_tokens = 4;  // three chunks
  auto b = make_cpu_backend(ws, c);
  int64_t next = 0;
  b->score(tokens, 0, [&](int64_t pos, const float* logits) {
    ASSERT_EQ(pos, next++);
    const std::vector<float> row(logits, logits + m.vocab_size);
    EXPECT_EQ(row, want[static_cast<size_t>(pos)]) << "position " << pos;  // rows do not depend on the batch
  });
  EXPECT_EQ(next, 11);
  EXPECT_EQ(b->cached_tokens(0), 11);
}

TEST(CpuOps, PackedMatmulRowDoesNotDependOnTheTokenCount) {
  TinyModel tm(packable_config(), 51, 0.08f, {DType::FP8_E4M3, 0});
  const LayerWeights w = layer_view(tm.manifest, 0, tm.image.data() + tm.manifest.layer_offset(0));
  const int64_t in = w.w1.cols, out = w.w1.rows, T = 5;
  std::vector<float> x(T * in), all(T * out), one(out);
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (float& v : x) v = n(rng);
  ThreadPool pool(2);
  cpu::matmul(&pool, x.data(), T, in, w.w1, out, all.data());
  for (int64_t t = 0; t < T; ++t) {
    cpu::matmul(nullptr, x.data() + t * in, 1, in, w.w1, out, one.data());
    EXPECT_EQ(std::vector<float>(all.begin() + t * out, all.begin() + (t + 1) * out), one) << t;
  }
  EXPECT_THROW(cpu::matmul(nullptr, x.data(), 1, in + 1, w.w1, out, one.data()), Error);
  EXPECT_THROW(w.w1.bf16(), Error);
}

TEST(CpuBackend, DecodeAfterPrefillEqualsFullForward) {
  ModelConfig m = test::tiny_config();
  TinyModel tm(m, 5);
  MemoryWeights ws(tm);
  const Config c = config_with_context(m.max_position_embeddings);
  auto inc = make_cpu_backend(ws, c);
  auto full = make_cpu_backend(ws, c);
  auto tokens = test::random_tokens(20, m.vocab_size, 9);
  const int64_t prompt = 7;
  std::vector<float> row = inc->forward(std::vector<int32_t>(tokens.begin(), tokens.begin() + prompt), 0);
  for (int64_t p = prompt; p <= 20; ++p) {
    full->reset();
    auto ref = full->forward(std::vector<int32_t>(tokens.begin(), tokens.begin() + p), 0);
    EXPECT_LT(rel_diff(row, to_double(ref)), 1e-4) << "position " << p - 1;
    if (p < 20) row = inc->forward({tokens[p]}, p);
  }
  // A prefill in chunks agrees too.
  full->reset();
  full->forward(std::vector<int32_t>(tokens.begin(), tokens.begin() + 9), 0);
  auto chunked = full->forward(std::vector<int32_t>(tokens.begin() + 9, tokens.end()), 9);
  EXPECT_LT(rel_diff(chunked, to_double(row)), 1e-4);
  // In fact every position's arithmetic is the same whatever the chunking: the bits agree.
  EXPECT_EQ(chunked, row);
  EXPECT_EQ(ws.held, 0);
  EXPECT_EQ(ws.passes, ws.ended);
}

TEST(CpuBackend, UsesEveryLayerOncePerPass) {
  ModelConfig m = test::tiny_config();
  TinyModel tm(m);
  MemoryWeights ws(tm);
  auto b = make_cpu_backend(ws, config_with_context(32));
  b->forward({1, 2, 3}, 0);
  b->forward({4}, 3);
  EXPECT_EQ(ws.passes, 2);
  EXPECT_EQ(ws.ended, 2);
  EXPECT_EQ(ws.acquired, 2 * m.n_layers);
  EXPECT_EQ(ws.held, 0);
  EXPECT_STREQ(b->name(), "cpu");
}

TEST(CpuBackend, RejectsBadTokensAndContext) {
  ModelConfig m = test::tiny_config();
  TinyModel tm(m);
  MemoryWeights ws(tm);
  auto b = make_cpu_backend(ws, config_with_context(8));
  auto msg = [&](const std::vector<int32_t>& t, int64_t pos) -> std::string {
    try {
      b->forward(t, pos);
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_NE(msg({-1}, 0).find("outside the vocabulary"), std::string::npos);
  EXPECT_NE(msg({1, static_cast<int32_t>(m.vocab_size)}, 0).find("outside the vocabulary [0, 97)"),
            std::string::npos);
  EXPECT_NE(msg({}, 0).find("at least one token"), std::string::npos);
  EXPECT_NE(msg(std::vector<int32_t>(9, 1), 0).find("exceeds max_context (8)"), std::string::npos);
  EXPECT_NE(msg({1}, 3).find("cached positions"), std::string::npos);
  // Nothing was cached by the failures; the sequence can still grow to exactly max_context.
  EXPECT_NO_THROW(b->forward(std::vector<int32_t>(5, 1), 0));
  EXPECT_NE(msg(std::vector<int32_t>(4, 1), 5).find("a context of 9 tokens exceeds max_context (8)"),
            std::string::npos);
  EXPECT_NO_THROW(b->forward(std::vector<int32_t>(3, 1), 5));
  EXPECT_NE(msg({1}, 8).find("exceeds max_context"), std::string::npos);
  EXPECT_EQ(ws.held, 0);
  EXPECT_EQ(ws.passes, ws.ended);
}

// A source whose layer 1 cannot be had: the pass ends and the layer taken is given back.
TEST(CpuBackend, WeightErrorsPropagateAndReleaseTheLayer) {
  struct Failing : MemoryWeights {
    using MemoryWeights::MemoryWeights;
    LayerWeights acquire_layer(int64_t layer) override {
      if (layer == 1) throw Error("layer 1: checksum mismatch");
      return MemoryWeights::acquire_layer(layer);
    }
  };
  ModelConfig m = test::tiny_config();
  TinyModel tm(m);
  Failing ws(tm);
  auto b = make_cpu_backend(ws, config_with_context(16));
  EXPECT_THROW(b->forward({1, 2}, 0), Error);
  EXPECT_EQ(ws.held, 0);
  EXPECT_EQ(ws.passes, 1);
  EXPECT_EQ(ws.ended, 1);
}

// ---- The store source ----

TEST(StoreWeights, ReadsTheStoreAndMatchesMemory) {
  ModelConfig m = test::tiny_config();
  TinyModel tm(m, 21);
  test::TempDir dir;
  tm.write_store(dir.path());
  auto ws = open_store_weights(dir.path());
  MemoryWeights mem(tm);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ws->globals().tok_embeddings) % kGroupAlign, 0u);
  auto a = make_cpu_backend(*ws, config_with_context(16));
  auto b = make_cpu_backend(mem, config_with_context(16));
  EXPECT_EQ(a->forward({3, 4, 5}, 0), b->forward({3, 4, 5}, 0));
  EXPECT_THROW(ws->acquire_layer(m.n_layers), Error);
}

TEST(StoreWeights, ChecksumMismatchIsAStoreError) {
  ModelConfig m = test::tiny_config();
  TinyModel tm(m);
  test::TempDir dir;
  tm.write_store(dir.path());
  {
    std::fstream f(dir / kWeightsFile, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(tm.manifest.ffn(1).offset + 10));
    f.put('\x7f');
  }
  try {
    open_store_weights(dir.path());
    FAIL() << "no error";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("checksum mismatch in layer 1 ffn"), std::string::npos) << e.what();
  }
  EXPECT_THROW(open_store_weights(dir / "missing"), StoreError);
}

TEST(StoreWeights, TiedOutputIsTheEmbedding) {
  ModelConfig m = test::tiny_config();
  m.tie_word_embeddings = true;
  TinyModel tm(m);
  MemoryWeights ws(tm);
  EXPECT_EQ(ws.globals().output.data, ws.globals().tok_embeddings);
  m.tie_word_embeddings = false;
  TinyModel tm2(m);
  MemoryWeights ws2(tm2);
  EXPECT_NE(ws2.globals().output.data, ws2.globals().tok_embeddings);
}

}  // namespace
}  // namespace ringllama
