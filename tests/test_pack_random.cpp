// Random stores: the built-in shapes carry the published hyper-parameters, values are
// deterministic and scaled as documented, a multi-GB store is written quickly, and generation
// itself runs well above disk speed.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <set>
#include <thread>

#include "common/errors.h"
#include "common/store.h"
#include "daemon/pack.h"
#include "daemon/random_model.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;

namespace ringllama {
namespace {

using test::TempDir;

PackOptions quiet(const std::string& out) {
  PackOptions o;
  o.out = out;
  o.progress = false;
  return o;
}

TEST(RandomShapes, PublishedHyperParameters) {
  ModelConfig m8 = random_shape("llama-3.1-8b");
  EXPECT_EQ(m8.dim, 4096);
  EXPECT_EQ(m8.n_layers, 32);
  EXPECT_EQ(m8.n_heads, 32);
  EXPECT_EQ(m8.n_kv_heads, 8);
  EXPECT_EQ(m8.head_dim, 128);
  EXPECT_EQ(m8.ffn_dim, 14336);
  EXPECT_EQ(m8.vocab_size, 128256);
  EXPECT_EQ(m8.max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(m8.rope_theta, 500000.0);
  EXPECT_EQ(m8.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(m8.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(m8.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(m8.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(m8.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(m8.tie_word_embeddings);
  EXPECT_EQ(m8.bos_id, 128000);
  EXPECT_EQ(m8.eos_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_DOUBLE_EQ(m8.norm_eps, 1e-5);
  // 8.03e9 parameters, as published.
  EXPECT_NEAR(Manifest::plan(m8, "x").weights_size / 2e9, 8.03, 0.01);

  ModelConfig m1 = random_shape("llama-3.2-1b");
  EXPECT_EQ(m1.dim, 2048);
  EXPECT_EQ(m1.n_layers, 16);
  EXPECT_EQ(m1.n_heads, 32);
  EXPECT_EQ(m1.n_kv_heads, 8);
  EXPECT_EQ(m1.head_dim, 64);
  EXPECT_EQ(m1.ffn_dim, 8192);
  EXPECT_TRUE(m1.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(m1.rope_scaling.factor, 32.0);
  EXPECT_NEAR(Manifest::plan(m1, "x").weights_size / 2e9, 1.24, 0.01);

  ModelConfig m70 = random_shape("llama-3.1-70b");
  EXPECT_EQ(m70.dim, 8192);
  EXPECT_EQ(m70.n_layers, 80);
  EXPECT_EQ(m70.n_heads, 64);
  EXPECT_EQ(m70.n_kv_heads, 8);
  EXPECT_EQ(m70.head_dim, 128);
  EXPECT_EQ(m70.ffn_dim, 28672);
  EXPECT_FALSE(m70.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(m70.rope_scaling.factor, 8.0);
  EXPECT_NEAR(Manifest::plan(m70, "x").weights_size / 2e9, 70.55, 0.01);

  ModelConfig mt = random_shape("tiny");
  EXPECT_EQ(mt.dim, 64);
  EXPECT_EQ(mt.n_layers, 2);
  EXPECT_EQ(mt.n_heads, 4);
  EXPECT_EQ(mt.n_kv_heads, 2);
  EXPECT_EQ(mt.head_dim, 16);
  EXPECT_EQ(mt.ffn_dim, 172);
  EXPECT_EQ(mt.vocab_size, 512);
  EXPECT_EQ(mt.max_position_embeddings, 2048);
  EXPECT_EQ(mt.rope_scaling.type, "llama3");

  for (const std::string& name : random_shape_names()) EXPECT_NO_THROW(random_shape(name).validate()) << name;
  try {
    random_shape("llama-4");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("llama-3.1-70b"), std::string::npos);
  }
}

TEST(RandomStore, DeterministicInTheSeed) {
  TempDir d;
  pack_random("tiny", 5, 0, quiet(d / "a"));
  pack_random("tiny", 5, 0, quiet(d / "b"));
  pack_random("tiny", 6, 0, quiet(d / "c"));
  EXPECT_EQ(test::read_file(d / "a/weights.bin"), test::read_file(d / "b/weights.bin"));
  EXPECT_NE(test::read_file(d / "a/weights.bin"), test::read_file(d / "c/weights.bin"));
  EXPECT_EQ(Store::open(d / "a").manifest().source, "random:tiny seed=5");
}

TEST(RandomStore, LayersOverride) {
  TempDir d;
  WriteResult r = pack_random("tiny", 1, 5, quiet(d / "s"));
  EXPECT_EQ(r.manifest.model.n_layers, 5);
  EXPECT_EQ(Store::open(d / "s").manifest().groups.size(), 11u);
}

// Every tensor is finite, varied, and has the mean and spread that scale_of documents.
TEST(RandomStore, ValuesAreScaledAsDocumented) {
  TempDir d;
  pack_random("tiny", 3, 0, quiet(d / "s"));
  Store s = Store::open(d / "s");
  for (const GroupEntry& g : s.manifest().groups) {
    std::unique_ptr<char[]> buf(new char[g.size]);
    s.read_group(g, buf.get());
    for (const TensorEntry& t : g.tensors) {
      const auto* v = reinterpret_cast<const bf16_t*>(buf.get() + t.offset);
      const int64_t n = t.numel();
      double sum = 0, sq = 0;
      std::set<bf16_t> distinct;
      for (int64_t i = 0; i < n; ++i) {
        const double x = bf16_to_f32(v[i]);
        ASSERT_TRUE(std::isfinite(x)) << g.label() << " " << t.name;
        sum += x;
        sq += x * x;
        distinct.insert(v[i]);
      }
      const double mean = sum / n, sd = std::sqrt(std::max(0.0, sq / n - mean * mean));
      double want_mean = 0, want_sd = 0;
      RandomSource::scale_of(s.model(), t.name, &want_mean, &want_sd);
      // Sampling error: n elements drawn from a table of 131072 draws.
      const double mean_err = want_sd * std::sqrt(1.0 / 131072 + 1.0 / n);
      EXPECT_NEAR(mean, want_mean, 4.5 * mean_err) << g.label() << " " << t.name;
      EXPECT_NEAR(sd, want_sd, 0.1 * want_sd + 4 * want_sd / std::sqrt(2.0 * n)) << g.label() << " " << t.name;
      EXPECT_GT(distinct.size(), 8u) << g.label() << " " << t.name;
    }
  }
}

// One token through a plain fp32 forward (at position 0 attention returns v and RoPE is the
// identity): with 80 layers, as deep as 70B, the residual stays finite and bounded, every layer
// changes it noticeably, and the logits are spread out.
TEST(RandomStore, ActivationsStayFiniteAndVariedThroughEveryLayer) {
  ModelConfig m = random_shape("tiny");
  m.n_layers = 80;
  Manifest plan = Manifest::plan(m, "random:tiny");
  RandomSource src(plan, 9);
  auto tensor = [&](const GroupEntry& g, const std::string& name) {
    for (size_t ti = 0; ti < g.tensors.size(); ++ti)
      if (g.tensors[ti].name == name) {
        std::vector<bf16_t> raw(g.tensors[ti].numel());
        src.fill(g, ti, 0, raw.size(), raw.data());
        std::vector<float> f(raw.size());
        for (size_t i = 0; i < raw.size(); ++i) f[i] = bf16_to_f32(raw[i]);
        return f;
      }
    ADD_FAILURE() << name;
    return std::vector<float>();
  };
  auto rms = [](const std::vector<float>& x) {
    double s = 0;
    for (float v : x) s += double(v) * v;
    return std::sqrt(s / x.size());
  };
  auto norm = [&](const std::vector<float>& x, const std::vector<float>& w) {
    const double r = 1 / std::sqrt(rms(x) * rms(x) + m.norm_eps);
    std::vector<float> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = static_cast<float>(x[i] * r * w[i]);
    return y;
  };
  auto matvec = [](const std::vector<float>& w, const std::vector<float>& x) {
    std::vector<float> y(w.size() / x.size());
    for (size_t r = 0; r < y.size(); ++r) {
      double s = 0;
      for (size_t c = 0; c < x.size(); ++c) s += double(w[r * x.size() + c]) * x[c];
      y[r] = static_cast<float>(s);
    }
    return y;
  };

  std::vector<float> emb = tensor(plan.globals(), "tok_embeddings");
  std::vector<float> x(emb.begin() + 7 * m.dim, emb.begin() + 8 * m.dim);
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const GroupEntry& a = plan.attn(l);
    const GroupEntry& f = plan.ffn(l);
    std::vector<float> v = matvec(tensor(a, "wv"), norm(x, tensor(a, "attn_norm")));
    std::vector<float> heads(m.q_dim());
    const int64_t group = m.n_heads / m.n_kv_heads;
    for (int64_t h = 0; h < m.n_heads; ++h)
      for (int64_t i = 0; i < m.head_dim; ++i) heads[h * m.head_dim + i] = v[(h / group) * m.head_dim + i];
    std::vector<float> o = matvec(tensor(a, "wo"), heads);
    const double before = rms(x);
    for (int64_t i = 0; i < m.dim; ++i) x[i] += o[i];
    std::vector<float> h2 = norm(x, tensor(f, "ffn_norm"));
    std::vector<float> gate = matvec(tensor(f, "w1"), h2), up = matvec(tensor(f, "w3"), h2);
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
    std::vector<float> down = matvec(tensor(f, "w2"), gate);
    std::vector<float> update(m.dim);
    for (int64_t i = 0; i < m.dim; ++i) {
      update[i] = o[i] + down[i];
      x[i] += down[i];
    }
    ASSERT_TRUE(std::isfinite(rms(x))) << "layer " << l;
    EXPECT_LT(rms(x), 50) << "layer " << l;
    EXPECT_GT(rms(update) / before, 0.05) << "layer " << l << " barely changes the residual";
  }
  std::vector<float> logits = matvec(tensor(plan.globals(), "output"), norm(x, tensor(plan.globals(), "norm")));
  double mean = 0;
  for (float v : logits) mean += v / logits.size();
  double var = 0;
  for (float v : logits) var += (v - mean) * (v - mean) / logits.size();
  std::printf("80 layers: residual rms %.2f, logits sd %.3f\n", rms(x), std::sqrt(var));
  EXPECT_GT(std::sqrt(var), 0.3);
  EXPECT_LT(std::sqrt(var), 10);
}

// An 8B store with one layer (2.5 GB) through the binary, checked, then removed.
TEST(RandomStore, EightBillionShapeWithOneLayerIsQuick) {
  TempDir d;
  const auto t0 = std::chrono::steady_clock::now();
  test::RunResult r = test::run_bin("ringllama-pack",
                                    {"--random", "llama-3.1-8b", "--layers", "1", "--seed", "1", "--out", d / "s"});
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(r.status, 0) << r.err;
  std::printf("%s", r.out.c_str());
  EXPECT_NE(r.out.find("llama dim 4096, 1 layers, 32 heads (8 kv) x 128, ffn 14336, vocab 128256"),
            std::string::npos)
      << r.out;
  EXPECT_LT(secs, 120);
  EXPECT_EQ(fs::file_size(d / "s/weights.bin"), Store::open(d / "s").manifest().weights_size);
  test::RunResult v = test::run_bin("ringllama-pack", {"--verify", d / "s"});
  EXPECT_EQ(v.status, 0) << v.err;
  EXPECT_NE(v.out.find("3 groups, 2.5 GB, all checksums match"), std::string::npos) << v.out;
}

// Generation and hashing alone (no disk) for an 8B store of two layers, 3.0 GB: a whole 8B store
// (16 GB) must be produced faster than 1 GB/s, above what most disks take.
TEST(RandomStore, GenerationRunsAboveOneGigabytePerSecond) {
  ModelConfig m = random_shape("llama-3.1-8b");
  m.n_layers = 2;
  Manifest plan = Manifest::plan(m, "random:llama-3.1-8b");
  RandomSource src(plan, 1);
  WriteOptions w;
  w.progress = false;
  uint64_t bytes = 0;
  const auto t0 = std::chrono::steady_clock::now();
  stream_groups(plan, src, w, [&](const char*, uint64_t n) { bytes += n; });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double mbs = bytes / secs / 1e6;
  std::printf("random generation + xxh3, %u threads: %.2f GB in %.2f s = %.0f MB/s\n",
              std::max(1u, std::thread::hardware_concurrency()), bytes / 1e9, secs, mbs);
  RecordProperty("generation_mb_per_s", static_cast<int>(mbs));
  EXPECT_EQ(bytes, plan.weights_size);
  EXPECT_GT(mbs, 1000);
}

}  // namespace
}  // namespace ringllama
