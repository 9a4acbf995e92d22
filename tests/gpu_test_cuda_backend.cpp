// The CUDA backend against the CPU backend (plain fp32) on tiny random models, and against the
// golden logits of Hugging Face transformers (tests/data/*/golden.json).
//
// Agreement is measured per logits row as max|cuda - ref| / max|ref|. The CUDA backend rounds its
// activations to bf16 before every GEMM and in the KV cache (2^-9 relative each time), and random
// models with large weights amplify that through the layers: rows agree to 0.4e-2 .. 3.5e-2, not
// 1e-6. A CPU forward in fp32 with bf16 rounding inserted at the same points reproduces the CUDA
// rows' errors to within a few percent (mha_hd128, last row: 2.60e-2 emulated, 2.62e-2 on an H100),
// so that is the precision of the design, not a fault; the kernels themselves are held to bf16
// rounding in gpu_test_kernels. Greedy tokens must agree wherever the reference's top-2 gap is
// clearly larger than that noise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/errors.h"
#include "tests/golden.h"
#include "tests/gpu_skip.h"
#include "tests/test_util.h"
#include "tests/row_compare.h"
#include "tests/tiny_model.h"
#include "worker/backend.h"
#include "worker/cuda_backend.h"

namespace ringllama {
namespace {

using test::compare_row;
using test::RowDiff;
using test::top2_gap;

constexpr const char* kGpuSuite = "the CUDA backend tests";  // in the message where there is no GPU

constexpr double kRowTolerance = 5e-2;       // max|diff| / max|ref| per row (bf16 activations)
constexpr double kScreenMargin = 4e-2;       // top-2 gap / max|logit| the CPU run of a test model must keep
constexpr int kDecodeSteps = 8;

int32_t argmax(const float* x, size_t n) {
  return static_cast<int32_t>(std::max_element(x, x + n) - x);  // first of the largest: lowest index
}


// ---------------------------------------------------------------------------------------------
// Tiny random models: CUDA against CPU

struct TinyCase {
  std::string name;
  ModelConfig model;
  int64_t prompt_len;
  int64_t prefill_chunk;  // < prompt_len: the prompt runs in chunks (the last one may be 1 token)
  TensorFormat linear = {};  // packed (fp8, int4): the GEMV for decode rows, dequant + GEMM for prefill
};

ModelConfig with_shape(int64_t dim, int64_t layers, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t ffn,
                       int64_t vocab) {
  ModelConfig m = test::tiny_config();
  m.dim = dim;
  m.n_layers = layers;
  m.n_heads = heads;
  m.n_kv_heads = kv_heads;
  m.head_dim = head_dim;
  m.ffn_dim = ffn;
  m.vocab_size = vocab;
  m.max_position_embeddings = 1024;
  return m;
}

std::vector<TinyCase> tiny_cases() {
  std::vector<TinyCase> cases;
  cases.push_back({"tiny_hd12_gqa2", test::tiny_config(), 33, 512});
  ModelConfig m = with_shape(200, 3, 6, 2, 40, 344, 301);  // GQA 3:1, head_dim 40, llama3 rope
  m.rope_theta = 500000.0;
  m.rope_scaling.type = "llama3";
  m.rope_scaling.factor = 8.0;
  m.rope_scaling.low_freq_factor = 1.0;
  m.rope_scaling.high_freq_factor = 4.0;
  m.rope_scaling.original_max_position_embeddings = 32;
  cases.push_back({"gqa3_hd40_llama3_chunked", m, 33, 16});  // chunks 16 + 16 + 1
  cases.push_back({"mha_hd128", with_shape(256, 2, 2, 2, 128, 512, 128), 300, 512});
  m = with_shape(72, 2, 8, 2, 24, 200, 389);  // GQA 4:1, head_dim 24, hidden 72
  m.tie_word_embeddings = true;
  cases.push_back({"gqa4_hd24_tied", m, 7, 512});
  // Packed linear weights: both backends multiply the same dequantized values; a 40-token prompt
  // takes the dequant + GEMM path, the decode rows the GEMV, and lm_head (untied) is packed too.
  m = with_shape(128, 2, 4, 2, 32, 256, 384);
  cases.push_back({"fp8", m, 40, 512, {DType::FP8_E4M3, 0}});
  cases.push_back({"int4_g32", m, 40, 512, {DType::INT4, 32}});
  cases.push_back({"int4_g128_chunked", m, 40, 24, {DType::INT4, 128}});
  return cases;
}

Config backend_config(int64_t prefill_chunk) {
  Config c;
  c.max_context = 512;
  c.prefill_chunk_tokens = prefill_chunk;
  return c;
}

std::vector<int32_t> random_prompt(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> v(n);
  for (auto& t : v) t = d(rng);
  return v;
}

// Greedy run of `steps` tokens after the prompt: the logits rows and the tokens picked.
struct GreedyRun {
  std::vector<std::vector<float>> rows;
  std::vector<int32_t> tokens;
};

GreedyRun greedy(Backend& b, const std::vector<int32_t>& prompt, int steps) {
  GreedyRun r;
  b.reset();
  r.rows.push_back(b.forward(prompt, 0));
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int s = 0; s <= steps; ++s) {
    const auto& last = r.rows.back();
    r.tokens.push_back(argmax(last.data(), last.size()));
    if (s == steps) break;
    r.rows.push_back(b.forward({r.tokens.back()}, pos++));
  }
  return r;
}

// The first weight seed whose CPU greedy run keeps a clear top-2 gap at every step, so that the
// token comparison tests the CUDA backend, not a coin flip between near-equal logits.
uint64_t screened_seed(const TinyCase& c, const std::vector<int32_t>& prompt, double* min_gap) {
  for (uint64_t seed = 1; seed <= 200; ++seed) {
    test::TinyModel model(c.model, seed, 0.08f, c.linear);
    test::MemoryWeights ws(model);
    auto cpu = make_cpu_backend(ws, backend_config(c.prefill_chunk));
    GreedyRun r = greedy(*cpu, prompt, kDecodeSteps);
    double g = INFINITY;
    for (const auto& row : r.rows) g = std::min(g, top2_gap(row.data(), row.size()));
    if (g >= kScreenMargin) {
      *min_gap = g;
      return seed;
    }
  }
  *min_gap = 0;
  return 1;
}

class CudaVsCpu : public ::testing::TestWithParam<TinyCase> {
 protected:
  void SetUp() override { RL_SKIP_WITHOUT_GPU(kGpuSuite); }
};

TEST_P(CudaVsCpu, PrefillAndDecodeAgree) {
  const TinyCase& c = GetParam();
  const std::vector<int32_t> prompt = random_prompt(c.prompt_len, c.model.vocab_size, 77);
  double min_gap = 0;
  const uint64_t seed = screened_seed(c, prompt, &min_gap);
  ASSERT_GE(min_gap, kScreenMargin) << "no weight seed in 1..200 keeps a clear top-2 gap on the CPU";
  test::TinyModel model(c.model, seed, 0.08f, c.linear);
  test::MemoryWeights ws(model);
  auto cpu = make_cpu_backend(ws, backend_config(c.prefill_chunk));
  auto gpu = make_cuda_backend(ws, backend_config(c.prefill_chunk));
  EXPECT_STREQ(gpu->name(), "cuda");
  EXPECT_EQ(ws.held, 0) << "every acquired layer is released";

  // Teacher-forced: both backends see the CPU's greedy tokens, so every row is comparable.
  const GreedyRun ref = greedy(*cpu, prompt, kDecodeSteps);
  gpu->reset();
  double worst = 0;
  int64_t pos = 0;
  for (size_t r = 0; r < ref.rows.size(); ++r) {
    std::vector<float> got = r == 0 ? gpu->forward(prompt, 0) : gpu->forward({ref.tokens[r - 1]}, pos);
    pos = r == 0 ? static_cast<int64_t>(prompt.size()) : pos + 1;
    ASSERT_EQ(got.size(), ref.rows[r].size());
    const RowDiff d = compare_row(got, ref.rows[r].data(), got.size());
    std::printf("  %-26s row %zu (%s): max|diff|/max|ref| = %.3e\n", c.name.c_str(), r, r == 0 ? "prefill" : "decode",
                d.ratio);
    worst = std::max(worst, d.ratio);
    EXPECT_LT(d.ratio, kRowTolerance) << c.name << " row " << r << (d.finite ? "" : " (non-finite logits)");
  }

  // Free-running greedy on the GPU: the same tokens.
  const GreedyRun run = greedy(*gpu, prompt, kDecodeSteps);
  EXPECT_EQ(run.tokens, ref.tokens) << c.name << ": greedy tokens differ";
  std::printf("  %-26s weight seed %llu, min top-2 gap %.3f, worst row %.3e, greedy tokens %s for %d steps\n",
              c.name.c_str(), static_cast<unsigned long long>(seed), min_gap, worst,
              run.tokens == ref.tokens ? "identical" : "DIFFER", kDecodeSteps + 1);
  RecordProperty("worst_row_ratio", std::to_string(worst));
  RecordProperty("greedy_identical", run.tokens == ref.tokens ? "yes" : "no");

  // Deterministic: the same prompt again gives the same bits (a race would show here).
  gpu->reset();
  const std::vector<float> again = gpu->forward(prompt, 0);
  EXPECT_EQ(0, std::memcmp(again.data(), run.rows[0].data(), again.size() * sizeof(float)))
      << "two runs of the same prompt differ";
}

INSTANTIATE_TEST_SUITE_P(Models, CudaVsCpu, ::testing::ValuesIn(tiny_cases()),
                         [](const ::testing::TestParamInfo<TinyCase>& info) { return info.param.name; });

TEST(CudaBackend, RefusesBadCalls) {
  RL_SKIP_WITHOUT_GPU(kGpuSuite);
  test::TinyModel model(test::tiny_config(), 3);
  test::MemoryWeights ws(model);
  Config cfg = backend_config(512);
  cfg.max_context = 16;
  auto gpu = make_cuda_backend(ws, cfg);
  EXPECT_THROW(gpu->forward({}, 0), Error);
  EXPECT_THROW(gpu->forward({1, 2}, 3), Error);                                      // start_pos != cached
  EXPECT_THROW(gpu->forward({static_cast<int32_t>(model.manifest.model.vocab_size)}, 0), Error);
  EXPECT_THROW(gpu->forward({-1}, 0), Error);
  EXPECT_THROW(gpu->forward(std::vector<int32_t>(17, 1), 0), Error);                  // over max_context
  EXPECT_NO_THROW(gpu->forward(std::vector<int32_t>(16, 1), 0));                      // exactly max_context
  Config bad = cfg;
  bad.gpu = cuda_device_count();
  EXPECT_THROW(make_cuda_backend(ws, bad), Error);
}

// ---------------------------------------------------------------------------------------------
// Golden fixtures: CUDA against transformers

class CudaGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { RL_SKIP_WITHOUT_GPU(kGpuSuite); }
};

TEST_P(CudaGolden, MatchesTransformers) {
  const test::Golden g = test::load_golden(GetParam());
  const std::vector<int32_t>& prompt = g.prompt_ids;
  const std::vector<int32_t>& want = g.tokens;
  const int64_t vocab = g.vocab_size;
  const int64_t rows = g.rows;
  ASSERT_EQ(g.logits_bytes, static_cast<size_t>(rows * vocab) * sizeof(float));
  const std::vector<float>& golden = g.logits;

  test::TempDir tmp;
  const std::string store = tmp / "store";
  auto pack = test::run_bin("ringllama-pack", {"--hf", g.hf_dir(), "--out", store, "--quiet"});
  ASSERT_EQ(pack.status, 0) << "ringllama-pack failed:\n" << pack.err << pack.out;
  auto ws = open_store_weights(store);
  Config cfg;
  cfg.max_context = static_cast<int64_t>(prompt.size()) + rows + 1;
  auto gpu = make_cuda_backend(*ws, cfg);

  // Teacher-forced with the golden tokens: row i after tokens[0..i-1].
  double worst = 0;
  int agree = 0, real_mismatch = 0;
  int64_t first_miss = rows;  // greedy decoding reproduces transformers' tokens up to here
  int64_t pos = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> got = r == 0 ? gpu->forward(prompt, 0) : gpu->forward({want[r - 1]}, pos);
    pos = r == 0 ? static_cast<int64_t>(prompt.size()) : pos + 1;
    ASSERT_EQ(static_cast<int64_t>(got.size()), vocab);
    const float* ref = golden.data() + r * vocab;
    const RowDiff d = compare_row(got, ref, vocab);
    worst = std::max(worst, d.ratio);
    EXPECT_LT(d.ratio, kRowTolerance) << GetParam() << " row " << r;
    const int32_t pick = argmax(got.data(), got.size());
    if (pick == want[r]) {
      ++agree;
    } else {
      first_miss = std::min(first_miss, r);
      // A flip between two logits closer than twice the measured error is rounding, not a bug.
      const double gap = static_cast<double>(ref[want[r]]) - ref[pick];
      const bool real = gap > 2 * d.max_diff;
      real_mismatch += real;
      std::printf("  %s row %lld: cuda picks %d, transformers %d (gap %.3g, max|diff| %.3g)%s\n", GetParam().c_str(),
                  static_cast<long long>(r), pick, want[r], gap, d.max_diff, real ? "" : ": near tie");
    }
  }
  std::printf("  golden %-22s rows %lld, worst max|diff|/max|golden| %.3e, greedy picks agree %d/%lld\n",
              GetParam().c_str(), static_cast<long long>(rows), worst, agree, static_cast<long long>(rows));
  RecordProperty("worst_row_ratio", std::to_string(worst));
  RecordProperty("tokens_agree", std::to_string(agree) + "/" + std::to_string(rows));
  EXPECT_EQ(real_mismatch, 0) << "picks differ where the golden gap exceeds twice the error";
  EXPECT_GE(first_miss, std::min<int64_t>(rows, kDecodeSteps)) << "greedy picks differ within the first 8 steps";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaGolden, ::testing::ValuesIn(test::golden_fixture_names()),
                         test::FixtureTestName());
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(CudaGolden);

}  // namespace
}  // namespace ringllama
