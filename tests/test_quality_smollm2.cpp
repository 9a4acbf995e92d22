// Packed weights on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, fetched once by
// scripts/fetch-smollm2.sh into the build folder) packed as bf16, fp8 and int4, each reading a
// prefix of tests/data/quality_essay.txt teacher-forced on the CPU backend (ringllama-quality
// reads all of it; DESIGN.md "Packed weights" has the full-text table).
//
// The goals are top-1 agreement with the bf16 store >= 99% and perplexity within 1% for fp8,
// >= 95% and within 5% for int4. int4 in groups of 32 (the GGUF's own blocks) meets them and is
// held to them. fp8 (per-row e4m3: 2.6% RMS noise on every weight) and int4 requantized in groups
// of 128 (w2 only: 9.0% RMS noise with the scale search, 10.1% with the plain min/max rule) do not
// on a model this small; they are held to the figures measured here, with a margin, so that a
// regression in the packing or the forward shows, and the search must beat the plain rule.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>

#include "common/store.h"
#include "common/tokenizer.h"
#include "tests/test_util.h"
#include "worker/quality.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;

constexpr size_t kPrefixTokens = 384;

TEST(QualitySmolLM2, PackedStoresPredictAsTheBf16Store) {
  test::TempDir tmp;
  std::string why;
  const std::string gguf = test::fetch_smollm2(tmp / "fetch.log", &why);
  if (!why.empty()) GTEST_SKIP() << why;
  ASSERT_TRUE(fs::is_regular_file(gguf)) << gguf;

  struct Variant {
    std::string name;
    std::vector<std::string> args;
    double min_agreement, max_ppl_change;  // measured on this prefix: see below
  };
  // Measured on this prefix: fp8 90.1%, -0.3%; g128 81.2%, +11.4%; g128 with the plain min/max
  // rule 76.2%, +19.8%.
  const std::vector<Variant> variants = {
      {"bf16", {}, 1.0, 0.0},
      {"fp8", {"--weights", "fp8"}, 0.85, 0.02},
      {"int4-g32", {"--weights", "int4"}, 0.95, 0.05},
      {"int4-g128", {"--weights", "int4", "--group-size", "128"}, 0.78, 0.15},
      {"int4-g128-minmax", {"--weights", "int4", "--group-size", "128", "--scales", "minmax"}, 0.70, 0.30}};
  for (const Variant& v : variants) {
    std::vector<std::string> args = {"--gguf", gguf, "--out", tmp / v.name, "--quiet"};
    args.insert(args.end(), v.args.begin(), v.args.end());
    auto p = test::run_bin("ringllama-pack", args);
    ASSERT_EQ(p.status, 0) << v.name << ": " << p.err;
  }
  // int4 takes the GGUF's blocks as they are at group size 32; at 128 only the tensors whose inputs
  // split into groups of 128 (w2: 1536) are requantized, the others stay bf16.
  const Manifest g32 = Store::open(tmp / "int4-g32").manifest();
  const Manifest g128 = Store::open(tmp / "int4-g128").manifest();
  EXPECT_EQ(g32.attn(0).tensor("wq").group_size, 32);
  EXPECT_EQ(g128.ffn(0).tensor("w2").group_size, 128);
  EXPECT_EQ(g128.attn(0).tensor("wq").dtype, DType::BF16);

  const auto tok = Tokenizer::require_store(tmp / "bf16");
  std::vector<int32_t> ids = tok->encode(read_regular_file(test::data_dir() + "/quality_essay.txt", 1 << 20));
  ASSERT_GE(ids.size(), 2000u) << "the essay should be at least 2000 tokens";
  ids.resize(kPrefixTokens);

  const TextScore ref = score_store(tmp / "bf16", ids);
  // A model that reads English prose: a perplexity far from 1 and from the vocabulary's size.
  EXPECT_GT(ref.perplexity(), 2.0);
  EXPECT_LT(ref.perplexity(), 100.0);
  std::cout << "SmolLM2-135M, first " << ids.size() << " tokens of quality_essay.txt\n"
            << "  bf16              perplexity " << ref.perplexity() << "\n";
  std::map<std::string, std::pair<double, double>> measured;  // name: agreement, perplexity change
  for (size_t i = 1; i < variants.size(); ++i) {
    const Variant& v = variants[i];
    const TextScore got = score_store(tmp / v.name, ids);
    const double agree = top1_agreement(got, ref);
    const double change = got.perplexity() / ref.perplexity() - 1.0;
    std::cout << "  " << v.name << std::string(18 - v.name.size(), ' ') << "perplexity " << got.perplexity()
              << " (" << 100 * change << "%), top-1 agreement " << 100 * agree << "%\n";
    EXPECT_GE(agree, v.min_agreement) << v.name;
    EXPECT_LE(std::fabs(change), v.max_ppl_change) << v.name;
    EXPECT_NE(got.mean_nll, ref.mean_nll) << v.name << ": packed weights should change something";
    measured[v.name] = {agree, std::fabs(change)};
  }
  // int4's scale search must beat the plain rule it replaced, on the same text.
  const auto search = measured["int4-g128"], plain = measured["int4-g128-minmax"];
  EXPECT_GT(search.first, plain.first) << "top-1 agreement: the search should beat min/max";
  EXPECT_LT(search.second, plain.second) << "perplexity change: the search should beat min/max";
}

}  // namespace
}  // namespace ringllama
